"""Stitch mode (--stitch-threshold, Cellpose's do_3D=False + stitch_threshold): the replay of
Cellpose's stitch3D (engine/stitch.py) against Cellpose's own, and the pipeline against Cellpose's
eval, identical for any chunking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cellpose import dynamics as CD
from cellpose import utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from tests.predict_support import blobs, gradient_cpsam, load
from zseg.cli import main
from zseg.engine import stitch as ST
from zseg.engine.cellpose_ref import cellpose_eval_stitch
from zseg.engine.synth import flows_from_labels
from zseg.storage.arrays import create_array, open_array
from zseg.storage.omezarr import write_ome_zarr

STRIDE = 1 << 20  # provisional IDs of the test: plane * STRIDE + the plane's own label


def first_pixel_order(m: np.ndarray) -> np.ndarray:
    """Each plane's labels renumbered 1..n in raster order of their first pixel (Cellpose's 2D numbering)."""
    out = np.zeros_like(m)
    for z in range(m.shape[0]):
        u, first = np.unique(m[z].ravel(), return_index=True)
        u, first = u[u != 0], first[u != 0]
        lut = np.zeros(int(m[z].max()) + 1, m.dtype)
        lut[u[np.argsort(first)]] = np.arange(1, len(u) + 1)
        out[z] = lut[m[z]]
    return out


def replayed(m: np.ndarray, threshold: float) -> np.ndarray:
    """zseg's replay on the table a chunked run would gather (here from the whole stack)."""
    ids, plane, first, area = [], [], [], []
    for z in range(m.shape[0]):
        u, f, n = np.unique(m[z].ravel(), return_index=True, return_counts=True)
        keep = u != 0
        ids.extend((z * STRIDE + u[keep].astype(np.int64)).tolist())
        plane.extend([z] * int(keep.sum()))
        first.extend(f[keep].tolist())
        area.extend(n[keep].tolist())
    up, low, cnt = [], [], []
    for z in range(m.shape[0] - 1):
        a, b, n = ST.overlaps(m[z + 1], m[z])
        up.extend(((z + 1) * STRIDE + a).tolist())
        low.extend((z * STRIDE + b).tolist())
        cnt.extend(n.tolist())
    lab = ST.replay(ids, plane, first, area, (up, low, cnt), threshold, m.shape[0])
    out = np.zeros(m.shape, np.int64)
    for i, z, s in zip(ids, plane, lab):
        out[z][m[z] == i % STRIDE] = s
    return out


def cellpose_resets(m: np.ndarray) -> bool:
    """Whether Cellpose's stitch3D restarts its numbering here (a plane with masks, then an empty
    plane, before any two planes were stitched): the one documented difference."""
    empty, seen = False, m[0].max() > 0
    for i in range(m.shape[0] - 1):
        if m[i + 1].max() == 0 or m[i].max() == 0:
            if not empty and m[i + 1].max() > 0 and seen:
                return True
        else:
            empty = True
        seen = seen or m[i + 1].max() > 0
    return False


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), nz=st.integers(2, 7), ny=st.integers(6, 28), nx=st.integers(6, 28),
       threshold=st.sampled_from([0.05, 0.25, 0.5, 0.9]), level=st.floats(0.45, 0.6))
def test_replay_equals_cellposes_stitch3d(seed, nz, ny, nx, threshold, level):
    rng = np.random.default_rng(seed)
    m = np.zeros((nz, ny, nx), np.uint32)
    for z in range(nz):
        if rng.random() > 0.15:
            m[z] = ndi.label(ndi.gaussian_filter(rng.random((ny, nx)), 1.5) > level)[0]
    m = first_pixel_order(m)
    if cellpose_resets(m):
        return  # test_a_gap_after_the_first_plane_does_not_merge_unrelated_cells
    ref = utils.stitch3D(m.copy(), stitch_threshold=threshold)
    np.testing.assert_array_equal(replayed(m, threshold), ref.astype(np.int64))


def test_two_masks_tied_on_one_label_both_take_it_as_in_cellpose():
    """Two masks of plane 1 with the same IoU over the one mask of plane 0: both keep it."""
    m = np.zeros((2, 6, 12), np.uint32)
    m[0, 1:5, 2:10] = 1
    m[1, 1:5, 2:6], m[1, 1:5, 6:10] = 1, 2
    ref = utils.stitch3D(m.copy(), stitch_threshold=0.25)
    got = replayed(m, 0.25)
    np.testing.assert_array_equal(got, ref.astype(np.int64))
    assert set(np.unique(got[1])) == {0, 1}


def test_a_gap_after_the_first_plane_does_not_merge_unrelated_cells():
    """Cellpose keeps plane 2's own labels after an empty plane 1 (no stitch yet), so its mask
    shares label 1 with plane 0's unrelated mask; zseg gives it a new label."""
    m = np.zeros((3, 10, 10), np.uint32)
    m[0, 1:4, 1:4] = 1
    m[2, 6:9, 6:9] = 1
    ref = utils.stitch3D(m.copy(), stitch_threshold=0.25)
    assert ref[0, 2, 2] == ref[2, 7, 7] == 1  # Cellpose: one cell in two distant pieces
    got = replayed(m, 0.25)
    assert got[0, 2, 2] == 1 and got[2, 7, 7] == 2


def test_overlaps_count_each_pair():
    up = np.array([[1, 1, 2], [0, 2, 2]])
    low = np.array([[5, 0, 5], [7, 7, 5]])
    a, b, n = ST.overlaps(up, low)
    assert list(zip(a.tolist(), b.tolist(), n.tolist())) == [(1, 5, 1), (2, 5, 2), (2, 7, 1)]


# -- the pipeline -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    img = blobs((16, 64, 64), seed=0, spacing=14)
    write_ome_zarr(str(root / "image.ome.zarr"), img, axes="zyx", voxel_size=(2.0, 1.0, 1.0), chunks=(8, 32, 32))
    torch.save(gradient_cpsam(), root / "net.pt")
    return {"img": img, "uri": str(root / "image.ome.zarr"), "net": str(root / "net.pt")}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_stitch_mode_equals_cellposes_and_is_identical_for_any_chunking(stack, tmp_path):
    """Chunkings cut Z and YX (cores of 3 and 5 planes, 17 and 27 pixels): the same labels, and
    Cellpose's own eval(do_3D=False, stitch_threshold=0.25, flow_threshold=0.65) on the whole stack
    (AP@0.5 and @0.9). At 0.65 the 2D flow check removes most of the 224 2D masks of this network's
    flows, so it is exercised per plane."""
    from cellpose.metrics import average_precision

    labels = []
    for chunk in ("16,64,64", "5,27,40", "3,64,17"):
        out = tmp_path / chunk.replace(",", "_")
        assert main(["run", stack["uri"], str(out), "--model", stack["net"], "--diameter", "30", "--chunk-shape",
                     chunk, "--no-use-bfloat16", "--stitch-threshold", "0.25", "--flows-dtype", "float32",
                     "--flow-threshold", "0.65"]) == 0
        labels.append(np.asarray(open_array(str(out / "labels.zarr" / "0"))[...]))
        r = json.loads((out / "run.json").read_text())
        assert r["result"]["chunk_exact"] and r["grid"]["halo"][0] == 0
        assert r["result"]["flow_check"]["removed"] > 100 and r["result"]["flow_check"]["undecided"] == 0
        assert r["result"]["stitch"]["masks"] > r["result"]["stitch"]["cells"] > 0  # 2D masks were stitched
    for other in labels[1:]:
        np.testing.assert_array_equal(other, labels[0])
    pr = json.loads((out / "work" / "percentiles.json").read_text())
    flows = np.asarray(open_array(str(out / "work" / "flows.zarr"))[...])
    masks, ref = cellpose_eval_stitch(load(gradient_cpsam()), stack["img"][None],
                                      np.stack([pr["low"], pr["high"]], 1), diameter=30.0, stitch_threshold=0.25,
                                      flow_threshold=0.65, min_size=15)
    assert np.all(flows[0] == 0)  # 2D flows: no Z component
    np.testing.assert_allclose(flows[1:], ref, rtol=1e-4, atol=2e-5)
    assert masks.max() >= 10
    ap, *_ = average_precision([masks], [labels[0]], threshold=[0.5, 0.9])
    assert ap[0][0] >= 0.99 and ap[0][1] >= 0.99, ap


def test_a_2d_mask_enclosed_by_another_in_its_plane_goes_before_stitching_as_in_cellpose(tmp_path):
    """A tube holding a rod, plane by plane a ring holding a disk, with exact 2D flows: Cellpose
    fills each plane's ring over the disk before stitching (its 2D masks), so the rod is not a
    cell. zseg's labels are the same partition as Cellpose's own per-plane masks, stitch3D and
    final fill (eval's do_3D=False path), for chunkings that cut Z and YX."""
    shape = (12, 64, 80)
    yy, xx = np.mgrid[:64, :80]
    truth = np.zeros(shape, np.uint32)
    r = np.hypot(yy - 32, xx - 40)
    for z in range(2, 10):
        truth[z][(r <= 14) & (r > 8)] = 1
        truth[z][r <= 4] = 2
    for i, (cy, cx) in enumerate([(8, 8), (55, 10), (10, 70), (54, 70)]):
        truth[1 + i:8 + i][:, np.hypot(yy - cy, xx - cx) <= 5] = 3 + i
    f = np.zeros((4, *shape), np.float32)  # dZ, dY, dX, cellprob: no Z component in stitch mode
    f[3] = -5
    for z in range(shape[0]):
        if truth[z].any():
            f[1:, z] = flows_from_labels(truth[z])
    planes = np.stack([CD.resize_and_compute_masks(f[1:3, z], f[3, z], niter=200, do_3D=False, min_size=-1,
                                                   flow_threshold=0.4, device=torch.device("cpu"))
                       for z in range(shape[0])])
    want = utils.fill_holes_and_remove_small_masks(utils.stitch3D(planes, stitch_threshold=0.25), min_size=15)
    assert len(np.unique(want)) - 1 == 5 and want[5, 32, 40] == want[5, 32, 28] != 0  # the rod went
    write_ome_zarr(str(tmp_path / "image.ome.zarr"), (truth > 0).astype(np.uint16) * 1000, axes="zyx",
                   voxel_size=(1.0, 1.0, 1.0))
    create_array(str(tmp_path / "flows.zarr"), shape=f.shape, chunks=f.shape, dtype="float32")[...] = f
    for chunk in ("12,64,80", "3,24,24", "5,37,50"):
        out = tmp_path / chunk.replace(",", "_")
        assert main(["run", str(tmp_path / "image.ome.zarr"), str(out), "--flows", str(tmp_path / "flows.zarr"),
                     "--diameter", "18", "--niter", "200", "--chunk-shape", chunk, "--stitch-threshold", "0.25"]) == 0
        labels = np.asarray(open_array(str(out / "labels.zarr" / "0"))[...])
        assert json.loads((out / "run.json").read_text())["result"]["chunk_exact"]
        np.testing.assert_array_equal(labels > 0, want > 0)
        pairs = set(zip(labels.ravel().tolist(), want.ravel().tolist()))
        assert len(pairs) == len(np.unique(want)) == len(np.unique(labels)), chunk  # one label for one label


@pytest.mark.parametrize("args, words", [
    (["--stitch-threshold", "1.5"], "stitch_threshold = 1.5"),
    (["--stitch-threshold", "0.3", "--flow3D-smooth", "1"], "--flow3D-smooth (3D segmentation only)"),
    (["--stitch-threshold", "0.3", "--exclude-on-edges"], "--exclude-on-edges"),
])
def test_bad_stitch_options_are_refused(stack, tmp_path, refused, args, words):
    out = tmp_path / "out"
    refused(["run", stack["uri"], str(out), "--model", stack["net"], *args], words)
    assert not out.exists()
