"""`--no-resample` (Cellpose's ``resample=False``): the flows are followed at the network's scale,
on a grid of their own (``run.json`` ``network_grid``), and the masks are resized back to the
volume by nearest neighbour before hole filling and ``min_size``, as Cellpose does. The labels
equal Cellpose's and are the same bytes for any chunking of either grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.predict_support import blobs, gradient_cpsam, load
from tests.volumes import write_volume
from zseg.cli import main
from zseg.engine.cellpose_ref import cellpose_eval
from zseg.engine.synth import flows_from_labels, synth_cells
from zseg.storage.arrays import open_array
from zseg.storage.grid import nearest_indices, owned_box, owner_voxels
from zseg.storage.omezarr import write_ome_zarr

SHAPE = (16, 48, 48)
NET = (24, 40, 40)  # Z subsampled on the way back (24 -> 16), Y and X stretched (40 -> 48)


def _labels(out) -> np.ndarray:
    return np.asarray(open_array(f"{out}/labels.zarr/0")[...])


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """The same cells, whatever their IDs: the pairs (a, b) are one-to-one."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


@pytest.fixture(scope="module")
def net_flows(tmp_path_factory):
    """Exact flows of synthetic cells drawn at the network's scale, and an image of the volume's."""
    _, cells = synth_cells(NET, diameter=9, seed=3)
    flows = flows_from_labels(cells).astype(np.float32)
    image, _ = synth_cells(SHAPE, diameter=8, seed=3)
    data = write_volume(str(tmp_path_factory.mktemp("noresample")), image, flows)
    return data, flows.astype(np.float16).astype(np.float32)  # as stored


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_given_network_scale_flows_give_cellposes_masks_for_any_chunking(net_flows, tmp_path):
    """Cellpose's own steps after the network with ``resample=False`` (``resize_and_compute_masks``
    at the network's scale, resized to the volume, holes and ``min_size`` there) against zseg on
    four chunkings, one of a single chunk: the same cells, and the same bytes every time."""
    from cellpose import dynamics

    data, flows = net_flows
    ref = dynamics.resize_and_compute_masks(flows[:3], flows[3], niter=200, do_3D=True, min_size=15, resize=SHAPE)
    assert ref.max() > 50  # enough cells for the comparison to mean something
    first = None
    for chunk in ("16,48,48", "8,16,16", "5,13,21", "3,48,7"):
        out = tmp_path / chunk.replace(",", "x")
        assert main(["run", data["image"], str(out), "--flows", data["flows"], "--no-resample", "--diameter", "8",
                     "--chunk-shape", chunk]) == 0
        run = json.loads((out / "run.json").read_text())
        assert run["niter"] == 200  # Cellpose's unscaled default without resampling
        assert run["network_grid"]["shape"] == list(NET) and run["flows_scale"] == "network"
        labels = _labels(out)
        assert _same_partition(labels, ref), chunk
        if first is None:
            first = labels
        np.testing.assert_array_equal(labels, first, err_msg=chunk)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_no_resample_gives_cellposes_flows_and_masks_on_anisotropic_rescaled_input(tmp_path):
    """A network computing real flows on anisotropic (voxel size 2,1,1), rescaled (diameter 36)
    blobs: the flow store is Cellpose's ``eval(resample=False)`` flows at the network's scale, and
    the labels Cellpose's masks, the same bytes for two chunkings."""
    from cellpose.metrics import average_precision

    img = blobs((12, 48, 60), spacing=14.0, sigma=3.0, seed=2)
    uri = str(tmp_path / "image.ome.zarr")
    write_ome_zarr(uri, img, axes="zyx", voxel_size=(2.0, 1.0, 1.0), chunks=(6, 24, 30))
    torch.save(gradient_cpsam(), tmp_path / "gradient.pt")
    outs = []
    for chunk in ("12,48,60", "5,20,25"):
        out = tmp_path / chunk.replace(",", "x")
        assert main(["run", uri, str(out), "--model", str(tmp_path / "gradient.pt"), "--diameter", "36",
                     "--chunk-shape", chunk, "--no-use-bfloat16", "--no-resample", "--flows-dtype", "float32"]) == 0
        outs.append(out)
    lowhigh = json.loads((outs[0] / "work" / "percentiles.json").read_text())
    lowhigh = np.stack([lowhigh["low"], lowhigh["high"]], axis=1)
    masks, ref = cellpose_eval(load(gradient_cpsam()), img[None], lowhigh, diameter=36.0, anisotropy=2.0,
                               compute_masks=True, min_size=15, resample=False)
    assert ref.shape[1:] == (20, 40, 50) and masks.shape == img.shape  # Cellpose's network scale, masks resized back
    flows = np.asarray(open_array(str(outs[0] / "work" / "flows.zarr"))[...])
    np.testing.assert_allclose(flows, ref, rtol=1e-4, atol=1e-4)
    labels = _labels(outs[0])
    assert masks.max() >= 10
    ap, *_ = average_precision([masks], [labels], threshold=[0.5, 0.9])
    assert ap[0][0] >= 0.99 and ap[0][1] >= 0.9, ap
    assert _same_partition(labels, masks)  # here even every voxel: the dynamics run on Cellpose's flows
    np.testing.assert_array_equal(_labels(outs[1]), labels)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 300), source=st.integers(1, 300), data=st.data())
def test_the_nearest_map_is_opencvs_and_ownership_is_a_partition(size, source, data):
    """The resize back is OpenCV's nearest neighbour (as Cellpose's masks), and every network-scale
    sample has exactly one owner voxel, the samples a box owns being a box."""
    import cv2

    row = np.arange(source, dtype=np.float32).reshape(1, source)
    want = cv2.resize(row, (size, 1), interpolation=cv2.INTER_NEAREST)[0].astype(np.int64)
    np.testing.assert_array_equal(nearest_indices(size, source, 0, size), want)
    col = cv2.resize(row.T, (1, size), interpolation=cv2.INTER_NEAREST)[:, 0].astype(np.int64)  # the other axis
    np.testing.assert_array_equal(nearest_indices(size, source, 0, size), col)
    owner = owner_voxels(np.arange(source)[:, None], (size,), (source,))[:, 0]
    assert owner.min() >= 0 and owner.max() < size and np.all(np.diff(owner) >= 0)
    a = data.draw(st.integers(0, size - 1))
    b = data.draw(st.integers(a + 1, size))
    box = owned_box((slice(a, b),), (size,), (source,))[0]
    np.testing.assert_array_equal(np.flatnonzero((owner >= a) & (owner < b)), np.arange(box.start, box.stop))


def test_bad_no_resample_in_stitch_mode_is_refused(net_flows, tmp_path, refused):
    data, _ = net_flows
    refused(["run", data["image"], str(tmp_path / "out"), "--flows", data["flows"], "--no-resample",
             "--stitch-threshold", "0.5"], "--no-resample", "--stitch-threshold")
    assert not (tmp_path / "out").exists()


def test_bad_no_resample_on_a_single_plane_is_refused(tmp_path, refused):
    image, cells = synth_cells((1, 48, 48), diameter=8, seed=1)
    data = write_volume(str(tmp_path / "data"), image, flows_from_labels(cells[:, :40, :40]), chunks=(1, 16, 16))
    refused(["run", data["image"], str(tmp_path / "out"), "--flows", data["flows"], "--no-resample"],
            "--no-resample", "single z plane")
    assert not (tmp_path / "out").exists()


def test_the_stages_one_by_one_in_shards_as_nextflow_runs_them(net_flows, tmp_path):
    """zseg plan, then every stage command with the same count of shards for both grids (as the
    Nextflow pipeline runs them: each stage divides its own grid's chunks): what `zseg run` gives."""
    from zseg.workspace.stages import STAGES

    data, _ = net_flows
    args = [data["image"], "--flows", data["flows"], "--no-resample", "--diameter", "8", "--chunk-shape", "8,20,20"]
    whole = tmp_path / "whole"
    assert main(["run", args[0], str(whole), *args[1:]]) == 0
    out = tmp_path / "out"
    emit = tmp_path / "plan.json"
    assert main(["plan", args[0], str(out), *args[1:], "--emit", str(emit)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["grid"]["nchunks"] == 18 and run["network_grid"]["nchunks"] == 12  # 2x3x3 and 3x2x2
    for name, st in STAGES.items():
        phase, _, sub = name.partition(":")
        argv = [phase, "--run", str(out)] + (["--stage", sub] if sub and sub != "reduce" else [])
        if st.kind == "map":
            for i in range(4):
                assert main(argv + ["--shard", f"{i}/4"]) == 0, name
        else:
            assert main(argv + (["--reduce"] if sub == "reduce" else [])) == 0, name
    np.testing.assert_array_equal(_labels(out), _labels(whole))
