"""The outputs people open: labels.zarr (NGFF, pyramid), cells.parquet, qc/report.html, run.json."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.ndimage as ndi
import zarr

from tests.volumes import write_volume
from zseg.engine import pyramid as P
from zseg.engine import stats as S
from zseg.engine.synth import flows_from_labels, synth_cells
from zseg.outputs import labels as O
from zseg.params import build_params
from zseg.run.entry import run_local
from zseg.storage.arrays import create_array, open_array
from zseg.storage.omezarr import write_ome_zarr
from zseg.workspace import usage

SHAPE = (24, 64, 64)
DIAMETER = 12.0
VOXEL = (2.0, 0.5, 0.5)  # micrometres; the run is told anisotropy 1 (the cells are isotropic in voxels)


# -- engine: pyramid --------------------------------------------------------------------------------
def test_downsample_mode_takes_the_most_frequent_label_and_prefers_cells_on_ties():
    a = np.array([[1, 1, 2, 0],
                  [1, 3, 0, 2],
                  [0, 0, 5, 0],
                  [0, 4, 0, 0]], np.uint32)
    out = P.downsample_mode(a, (2, 2))
    # 1 wins 3:1; {2:2, 0:2} tie goes to the cell; {0:3, 4:1} -> 0; {5:1, 0:3} -> 0
    np.testing.assert_array_equal(out, [[1, 2], [0, 0]])
    tie = np.array([[7, 3], [3, 7]], np.uint16)
    assert P.downsample_mode(tie, (2, 2))[0, 0] == 3  # equal counts, both cells: the smaller label


def test_downsample_mode_of_partial_windows_counts_only_voxels_that_exist():
    a = np.array([[4, 4, 9]], np.uint8)
    np.testing.assert_array_equal(P.downsample_mode(a, (1, 2)), [[4, 9]])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int32, np.int64])
def test_downsample_mode_keeps_dtype_and_input(dtype):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(7, 9, 10)).astype(dtype)
    before = a.copy()
    out = P.downsample_mode(a, (2, 2, 3))
    assert out.dtype == dtype and out.shape == (4, 5, 4)
    np.testing.assert_array_equal(a, before)
    assert set(np.unique(out)) <= set(np.unique(a))


@pytest.mark.parametrize("block", [(4, 6, 8), (2, 2, 2), (6, 12, 4)])
def test_downsample_mode_of_aligned_blocks_equals_the_whole(block):
    rng = np.random.default_rng(1)
    a = ndi.zoom(rng.integers(0, 30, size=(5, 7, 7)), (3, 3.3, 3.1), order=0).astype(np.uint32)[:13, :21, :19]
    f = (2, 2, 2)
    whole = P.downsample_mode(a, f)
    pieces = np.zeros_like(whole)
    for z in range(0, a.shape[0], block[0]):
        for y in range(0, a.shape[1], block[1]):
            for x in range(0, a.shape[2], block[2]):
                part = P.downsample_mode(a[z:z + block[0], y:y + block[1], x:x + block[2]], f)
                pieces[z // 2:z // 2 + part.shape[0], y // 2:y // 2 + part.shape[1], x // 2:x // 2 + part.shape[2]] = part
    np.testing.assert_array_equal(pieces, whole)


def test_level_factors_keep_coarse_z_until_the_voxels_are_isotropic():
    f = P.level_factors((100, 2000, 2000), (4.0, 1.0, 1.0), target=256)
    assert f[:2] == [(1, 2, 2), (1, 2, 2)] and f[2] == (2, 2, 2)
    shape = (100, 2000, 2000)
    for k in f:
        shape = P.downsampled_shape(shape, k)
    assert max(shape) <= 256
    assert P.level_factors((10, 200, 200), None, target=256) == []


def test_upsample_nearest_repeats_voxels_and_the_last_one_past_the_end():
    a = np.array([[1, 2], [3, 4]], np.uint32)
    out = P.upsample_nearest(a, (2, 2), (5, 4))
    np.testing.assert_array_equal(out, [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4], [3, 3, 4, 4]])
    with pytest.raises(ValueError, match="does not fit"):
        P.upsample_nearest(a, (2, 2), (7, 4))


# -- engine: statistics ---------------------------------------------------------------------------
def _scipy_table(labels, image):
    ids = np.unique(labels)
    ids = ids[ids != 0]
    ones = np.ones(labels.shape)
    out = {
        "label": ids,
        "count": ndi.sum_labels(ones, labels, ids).astype(np.int64),
        "centroid": np.array(ndi.center_of_mass(ones, labels, ids)),
        "objects": [ndi.find_objects((labels == i).astype(np.uint8))[0] for i in ids],
        "mean": np.stack([ndi.mean(image[c], labels, ids) for c in range(len(image))], axis=1),
        "max": np.stack([ndi.maximum(image[c], labels, ids) for c in range(len(image))], axis=1),
    }
    return out


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_block_stats_merged_over_many_blocks_equal_scipy_on_the_whole(dtype):
    rng = np.random.default_rng(2)
    labels = ndi.zoom(rng.integers(0, 40, size=(4, 5, 6)), (5, 4, 3.5), order=0).astype(np.uint32)[:19, :20, :21]
    labels[labels % 7 == 0] = 0
    labels[0, 0, 0] = labels[-1, -1, -1] = 3  # one cell in two far-apart pieces
    image = rng.integers(0, 60000 if dtype == np.uint16 else 2**30, size=(2, *labels.shape)).astype(dtype)
    if dtype == np.int32:
        image[1] -= 2**29  # negative intensities too
    parts = []
    for z in range(0, 19, 5):
        for y in range(0, 20, 6):
            for x in range(0, 21, 4):
                box = (slice(z, z + 5), slice(y, y + 6), slice(x, x + 4))
                parts.append(S.block_stats(labels[box], image[(slice(None), *box)], offset=(z, y, x)))
    merged = S.merge_stats(parts)
    table = S.cell_table(merged, (2.0, 0.5, 0.25))
    ref = _scipy_table(labels, image)
    np.testing.assert_array_equal(table["label"], ref["label"])
    np.testing.assert_array_equal(table["volume_voxels"], ref["count"])
    np.testing.assert_array_equal(np.stack([table[f"centroid_{a}"] for a in "zyx"], 1), ref["centroid"])
    np.testing.assert_array_equal(table["centroid_x_um"], ref["centroid"][:, 2] * 0.25)
    starts = np.array([[s.start for s in o] for o in ref["objects"]])
    stops = np.array([[s.stop for s in o] for o in ref["objects"]])
    np.testing.assert_array_equal(np.stack([table[f"bbox_{a}_start"] for a in "zyx"], 1), starts)
    np.testing.assert_array_equal(np.stack([table[f"bbox_{a}_stop"] for a in "zyx"], 1), stops)
    for c in range(2):
        np.testing.assert_array_equal(table[f"max_intensity_c{c}"], ref["max"][:, c])
        if dtype == np.float32:  # float sums: equal up to rounding in the last bits
            np.testing.assert_allclose(table[f"mean_intensity_c{c}"], ref["mean"][:, c], rtol=1e-12)
        else:  # integer sums are exact
            np.testing.assert_array_equal(table[f"mean_intensity_c{c}"], ref["mean"][:, c])


def test_block_stats_does_not_modify_its_inputs():
    labels = np.arange(24, dtype=np.uint32).reshape(2, 3, 4) % 5
    image = np.arange(48, dtype=np.uint16).reshape(2, 2, 3, 4)
    before = labels.copy(), image.copy()
    S.block_stats(labels, image)
    np.testing.assert_array_equal(labels, before[0])
    np.testing.assert_array_equal(image, before[1])


def test_peak_memory_is_measured_per_task():
    with usage.measure() as big:
        x = np.ones(200 * 2**20 // 8)  # 200 MiB, touched
        del x
    with usage.measure() as small:
        pass
    assert big["peak_rss_mib"] - small["peak_rss_mib"] > 150 or not os.path.exists("/proc/self/clear_refs")
    assert small["peak_rss_mib"] > 0


def test_task_seconds_cover_the_task():
    """``seconds`` is the task's own wall time: at least what it slept (a lower bound only)."""
    with usage.measure() as slept:
        time.sleep(0.05)
    assert slept["seconds"] >= 0.05


# -- the pipeline ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """Two channels (a cell stain and independent noise), anisotropic voxel size, exact flows."""
    root = tmp_path_factory.mktemp("outputs")
    image, labels = synth_cells(SHAPE, diameter=DIAMETER, seed=5)
    other = np.random.default_rng(9).integers(0, 4000, size=SHAPE).astype(np.uint16)
    raw = np.stack([image, other])
    written = write_volume(str(root), raw, flows_from_labels(labels), chunks=(8, 32, 32), axes="czyx",
                           voxel_size=VOXEL, channel_names=["cells", "noise"])
    return {"root": root, **written, "raw": raw}


def _run(volume, out, monkeypatch=None, **kw):
    params = build_params(input=volume["image"], output=str(out), flows=volume["flows"], diameter=DIAMETER,
                          anisotropy=1.0, channels=["cells", "noise"], **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(O, "PYRAMID_TARGET", 8)  # a pyramid on a small volume: 4 levels below level 0
        report = run_local(params)
    return {"out": str(out), "report": report, "manifest": json.loads((out / "run.json").read_text())}


@pytest.fixture(scope="module")
def many(volume, tmp_path_factory):
    """48 chunks: every cell spans several; the pyramid is built entirely by the report."""
    return _run(volume, tmp_path_factory.mktemp("many") / "out", chunk_shape=(8, 16, 16))


@pytest.fixture(scope="module")
def fused(volume, tmp_path_factory):
    """12 chunks, zarr v2 (NGFF 0.4): pyramid level 1 made inside the chunk tasks; with a CSV."""
    return _run(volume, tmp_path_factory.mktemp("fused") / "out", chunk_shape=(8, 32, 32), zarr_format=2,
                cells_csv=True)


@pytest.fixture(scope="module")
def whole(volume, tmp_path_factory):
    """One chunk: the whole-volume reference (every level made in the one task)."""
    return _run(volume, tmp_path_factory.mktemp("whole") / "out", chunk_shape=SHAPE)


def _levels(run) -> list[np.ndarray]:
    group = zarr.open_group(os.path.join(run["out"], "labels.zarr"), mode="r")
    attrs = group.attrs.asdict()
    ms = attrs.get("ome", attrs)["multiscales"][0]
    return [np.asarray(group[d["path"]][...]) for d in ms["datasets"]]


def _table(run) -> dict[str, np.ndarray]:
    t = pq.read_table(os.path.join(run["out"], "cells.parquet"))
    return {k: t.column(k).to_numpy() for k in t.column_names}


def test_layout_uses_fused_and_reduced_levels_as_planned(many, fused, whole):
    roles = {name: [lv["role"] for lv in r["manifest"]["result"]["outputs"]["levels"]]
             for name, r in (("many", many), ("fused", fused), ("whole", whole))}
    assert roles["many"] == ["segmented", "reduced", "reduced", "reduced", "reduced"]
    assert roles["fused"] == ["segmented", "fused", "reduced", "reduced", "reduced"]
    assert roles["whole"] == ["segmented", "fused", "fused", "fused", "fused"]


def test_cell_table_equals_scipy_on_the_whole_volume(volume, many):
    assert many["manifest"]["grid"]["nchunks"] == 48
    labels = _levels(many)[0]
    t = _table(many)
    order = np.argsort(t["label"])
    t = {k: v[order] for k, v in t.items()}
    ref = _scipy_table(labels, volume["raw"])
    np.testing.assert_array_equal(t["label"], ref["label"])  # exactly one row per label
    np.testing.assert_array_equal(t["volume_voxels"], ref["count"])
    assert t["volume_voxels"].sum() == np.count_nonzero(labels)
    np.testing.assert_array_equal(np.stack([t[f"centroid_{a}"] for a in "zyx"], 1), ref["centroid"])
    np.testing.assert_array_equal(np.stack([t[f"centroid_{a}_um"] for a in "zyx"], 1), ref["centroid"] * VOXEL)
    np.testing.assert_array_equal(t["volume_um3"], ref["count"] * np.prod(VOXEL))
    np.testing.assert_array_equal(np.stack([t[f"bbox_{a}_start"] for a in "zyx"], 1),
                                  [[s.start for s in o] for o in ref["objects"]])
    np.testing.assert_array_equal(np.stack([t[f"bbox_{a}_stop"] for a in "zyx"], 1),
                                  [[s.stop for s in o] for o in ref["objects"]])
    for c in range(2):
        np.testing.assert_array_equal(t[f"mean_intensity_c{c}"], ref["mean"][:, c])
        np.testing.assert_array_equal(t[f"max_intensity_c{c}"], ref["max"][:, c])
    meta = json.loads(pq.read_schema(os.path.join(many["out"], "cells.parquet")).metadata[b"zseg"])
    assert meta["voxel_size_um"] == list(VOXEL)
    assert [c["name"] for c in meta["channels"]] == ["cells", "noise"]


def test_outputs_do_not_depend_on_the_chunking(many, fused, whole):
    assert whole["report"]["chunk_exact"] and many["report"]["chunk_exact"] and fused["report"]["chunk_exact"]
    ref_levels, ref_table = _levels(whole), _table(whole)
    order = np.argsort(ref_table["label"])
    for run in (many, fused):
        levels = _levels(run)
        assert len(levels) == len(ref_levels) == 5
        for a, b in zip(levels, ref_levels):
            np.testing.assert_array_equal(a, b)
        t = _table(run)
        o = np.argsort(t["label"])
        for k in ref_table:
            np.testing.assert_array_equal(t[k][o], ref_table[k][order], err_msg=k)


def test_every_pyramid_level_holds_a_subset_of_level_0s_labels(many):
    levels = _levels(many)
    base = set(np.unique(levels[0]).tolist())
    shapes = [lv.shape for lv in levels]
    assert shapes == [(24, 64, 64), (24, 32, 32), (24, 16, 16), (12, 8, 8), (6, 4, 4)]
    for lv in levels[1:]:
        assert set(np.unique(lv).tolist()) <= base
    # each level is the mode of the one below (the rule, checked on the whole arrays)
    steps = [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    for lo, hi, f in zip(levels, levels[1:], steps):
        np.testing.assert_array_equal(hi, P.downsample_mode(lo, f))


@pytest.mark.parametrize("which", ["many", "fused"])
def test_labels_validate_against_ngff_and_open_with_ome_zarr(which, request):
    run = request.getfixturevalue(which)
    uri = os.path.join(run["out"], "labels.zarr")
    group = zarr.open_group(uri, mode="r")
    fmt = group.metadata.zarr_format
    if fmt == 3:
        from ome_zarr_models.v05.image_label import ImageLabel
    else:
        from ome_zarr_models.v04.image_label import ImageLabel
    label = ImageLabel.from_zarr(group)
    attrs = label.attributes.model_dump(by_alias=True)
    attrs = attrs.get("ome", attrs)
    ms = attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"micrometer"}
    scales = [next(t for t in d["coordinateTransformations"] if t["type"] == "scale")["scale"] for d in ms["datasets"]]
    assert scales[0] == list(VOXEL) and scales[1] == [2.0, 1.0, 1.0] and scales[-1] == [8.0, 8.0, 8.0]
    assert attrs["image-label"]["source"]["image"] == os.path.relpath(run["manifest"]["params"]["input"], uri)

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(uri))())
    labels_node = next(n for n in nodes if "image-label" in n.zarr.root_attrs)
    assert [tuple(d.shape) for d in labels_node.data] == [lv.shape for lv in _levels(run)]
    np.testing.assert_array_equal(np.asarray(labels_node.data[0]), _levels(run)[0])
    # the source image is found through image-label.source (napari then shows both)
    assert any("multiscales" in n.zarr.root_attrs and "image-label" not in n.zarr.root_attrs for n in nodes)


def test_labels_are_chunked_and_sharded_for_viewers_and_tasks(many, fused):
    seg = open_array(os.path.join(many["out"], "labels.zarr", "0"))
    assert seg.chunks == (8, 16, 16) and seg.shards is None  # the core is already viewer-sized
    whole = zarr.open_array(os.path.join(fused["out"], "labels.zarr", "0"), mode="r")
    assert whole.chunks == (8, 32, 32)  # zarr v2: chunks that tile a core, no shards


def test_cells_csv_on_request_holds_the_parquet_rows(fused, many):
    import pandas as pd

    csv = pd.read_csv(os.path.join(fused["out"], "cells.csv"))
    parquet = pd.read_parquet(os.path.join(fused["out"], "cells.parquet"))
    pd.testing.assert_frame_equal(csv, parquet, check_dtype=False)
    assert not os.path.exists(os.path.join(many["out"], "cells.csv"))
    assert parquet["label"].is_unique and len(parquet) == fused["report"]["cells"]


def test_run_json_records_provenance_time_and_memory(many):
    m = many["manifest"]
    assert m["complete"] and m["params"]["chunk_shape"] == [8, 16, 16]
    for pkg in ("zseg", "cellpose", "torch", "zarr"):
        assert m["versions"][pkg]
    assert m["input"]["shape"] == list(SHAPE) and m["input"]["dtype"] == "uint16"
    assert m["grid"]["grid_shape"] == [3, 4, 4]
    result = m["result"]
    assert result["cells"] == result["table"]["rows"] > 20
    assert result["table"]["labelled_voxels"] == np.count_nonzero(_levels(many)[0])
    used = result["usage"]
    from zseg.workspace.context import RunContext
    from zseg.workspace.stages import STAGES

    run = RunContext.open(many["out"])
    assert set(used) == {name for name, s in STAGES.items() if s.applies(run)}
    for name, u in used.items():
        assert u["seconds"] >= 0 and u["peak_rss_mib"] > 10, (name, u)
        assert u["tasks"] == (48 if u["kind"] == "map" else 1)
    assert set(result["usage_by_phase"]) == {"percentiles", "seeds", "number", "masks", "finalize"}
    marker = json.loads(open(os.path.join(many["out"], "work", "labels", "c0000000.json")).read())
    assert marker["peak_rss_mib"] > 10 and marker["seconds"] > 0


def test_full_resolution_labels_when_a_downsampled_level_was_segmented(tmp_path):
    image, labels = synth_cells((16, 32, 32), diameter=DIAMETER, seed=11)
    full = np.repeat(np.repeat(image, 2, axis=1), 2, axis=2)  # level 1 (2x2 means) is `image` again
    uri = str(tmp_path / "big.ome.zarr")
    write_ome_zarr(uri, full, axes="zyx", voxel_size=(1.0, 0.25, 0.25), chunks=(8, 32, 32), levels=2)
    arr = create_array(str(tmp_path / "flows.zarr"), shape=(4, 16, 32, 32), chunks=(4, 8, 16, 16), dtype="float16")
    arr[...] = flows_from_labels(labels).astype(np.float16)
    params = build_params(input=uri, output=str(tmp_path / "out"), flows=str(tmp_path / "flows.zarr"),
                          diameter=DIAMETER, anisotropy=1.0, level=1, chunk_shape=(8, 16, 16))
    run_local(params)
    group = zarr.open_group(str(tmp_path / "out" / "labels.zarr"), mode="r")
    ms = group.attrs["ome"]["multiscales"][0]
    src = zarr.open_group(uri, mode="r").attrs["ome"]["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"] == src["datasets"][0]["coordinateTransformations"]
    assert ms["datasets"][1]["coordinateTransformations"] == src["datasets"][1]["coordinateTransformations"]
    hi, seg = np.asarray(group["0"][...]), np.asarray(group["1"][...])
    assert hi.shape == full.shape and seg.shape == labels.shape
    np.testing.assert_array_equal(hi, np.repeat(np.repeat(seg, 2, axis=1), 2, axis=2))
    from ome_zarr_models.v05.image_label import ImageLabel

    ImageLabel.from_zarr(group)


# -- the QC report --------------------------------------------------------------------------------
def test_report_links_only_local_files(many):
    qc = os.path.join(many["out"], "qc")
    page = open(os.path.join(qc, "report.html")).read()
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    for src in re.findall(r'src="([^"]+)"', page):
        assert "/" not in src and os.path.getsize(os.path.join(qc, src)) > 1000, src
    assert {"slice_xy.png", "slice_xz.png", "slice_yz.png", "mip_xy.png", "mip_xz.png", "mip_yz.png",
            "sizes.png", "chunks.png"} <= set(os.listdir(qc))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-extensions",
                  # no network: every host name fails to resolve and every connection goes to a dead proxy
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]


@pytest.mark.skipif(_chromium() is None, reason="no chromium on the PATH (scripts/env.sh installs it with apt-get)")
def test_report_renders_offline_in_headless_chromium(many, tmp_path):
    from PIL import Image

    page = "file://" + os.path.join(many["out"], "qc", "report.html")
    base = [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1320,2400"]
    shot = tmp_path / "report.png"
    run = subprocess.run([*base, f"--screenshot={shot}", page], capture_output=True, text=True, timeout=120)
    assert shot.exists(), run.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1320)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200  # pictures, not a blank or an error page
    saturated = (img.max(axis=2).astype(int) - img.min(axis=2)) > 120
    assert saturated.mean() > 0.002  # coloured label outlines are on screen
    dom = subprocess.run([*base, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded and loaded.group(1) == loaded.group(2) == "8", dom[:500]


def test_layout_shards_each_core_and_fuses_levels_that_tile_it(tmp_path):
    from zseg.phases.plan import plan

    src = str(tmp_path / "vol.zarr")
    create_array(src, shape=(40, 300, 260), chunks=(20, 100, 100), dtype="uint8")
    flows = str(tmp_path / "flows.zarr")
    create_array(flows, shape=(4, 40, 300, 260), chunks=(4, 20, 100, 100), dtype="float16")  # never read here
    run = plan(build_params(input=src, output=str(tmp_path / "out"), chunk_shape=(20, 128, 128), flows=flows,
                            voxel_size=(2.0, 1.0, 1.0), diameter=10))
    lay = O.plan_layout(run, "uint32")
    seg, level1 = lay.levels
    assert (seg.role, seg.chunks, seg.shards) == ("segmented", (20, 64, 64), (20, 128, 128))
    assert (level1.role, level1.shape, level1.factor) == ("fused", (40, 150, 130), (1, 2, 2))
    assert level1.chunks == (20, 64, 64) and level1.shards is None  # a core's share is one viewer chunk
    assert level1.scale == (2.0, 2.0, 2.0) and level1.translation == (0.0, 0.5, 0.5)
    O.create_labels(run, "uint32")
    core_labels = np.arange(20 * 128 * 128, dtype=np.uint32).reshape(20, 128, 128) // 1000
    O.write_levels(run, 1, core_labels)  # chunk 1: z 0:20, y 0:128, x 128:256
    arr = open_array(str(tmp_path / "out" / "labels.zarr" / "0"))
    assert arr.shards == (20, 128, 128)
    np.testing.assert_array_equal(arr[0:20, 0:128, 128:256], core_labels)
    np.testing.assert_array_equal(open_array(str(tmp_path / "out" / "labels.zarr" / "1"))[0:20, 0:64, 64:128],
                                  P.downsample_mode(core_labels, (1, 2, 2)))
