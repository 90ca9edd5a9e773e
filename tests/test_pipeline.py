"""The pipeline end to end: CLI, plan, percentiles, and the chunk-exact dynamics phases."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.volumes import write_volume
from zseg import __version__
from zseg.cli import main
from zseg.engine.dynamics import compute_masks
from zseg.engine.synth import flows_from_labels, synth_cells
from zseg.params import build_params
from zseg.phases.plan import plan
from zseg.run.entry import run_local, run_phase
from zseg.storage.arrays import create_array, open_array
from zseg.storage.omezarr import write_ome_zarr

SHAPE = (32, 64, 64)
DIAMETER = 12.0


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A synthetic volume with cells crossing every chunk face, its truth and exact flows."""
    root = tmp_path_factory.mktemp("vol")
    image, labels = synth_cells(SHAPE, diameter=DIAMETER, seed=3)
    flows = flows_from_labels(labels)
    written = write_volume(str(root), image, flows, chunks=(16, 32, 32), labels={"cells": labels})
    return {"root": root, **written, "labels": labels, "dP": flows.astype(np.float16)}


def _segment(volume, out, **kw):
    params = build_params(input=volume["image"], output=str(out), flows=volume["flows"],
                          diameter=DIAMETER, **kw)
    report = run_local(params)
    return np.asarray(open_array(os.path.join(out, "labels.zarr", "0"))[...]), report


@pytest.fixture(scope="module")
def reference(volume, tmp_path_factory):
    """The single-chunk run every chunked run must equal."""
    return _segment(volume, tmp_path_factory.mktemp("ref") / "out", chunk_shape=SHAPE)


# -- the CLI -----------------------------------------------------------------------------------
def test_help_lists_the_phases_that_exist(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for phase in ("plan", "percentiles", "predict", "seeds", "number", "masks", "finalize", "run", "synth"):
        assert phase in out


def test_version_and_usage_errors(capsys):
    """--version prints and exits 0; a usage error (unknown option, missing argument) exits 2,
    whichever click typer brings (its own copy since typer 0.26)."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"zseg {__version__}"
    for argv in (["plan", "--bogus"], ["run"], ["seeds", "--run", "x"], ["nosuchcommand"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Usage: zseg" in err and "failed" not in err, (argv, err)


# -- chunk invariance and fidelity (issue 3) ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "chunk_shape, workers",
    [((16, 32, 32), 1), ((11, 24, 20), 1), ((8, 16, 16), 1), ((16, 32, 32), 2)],
    ids=["halves", "odd", "core-smaller-than-halo", "two-workers"],
)
def test_labels_identical_whatever_the_chunking(volume, reference, tmp_path, chunk_shape, workers):
    ref, ref_report = reference
    assert ref_report["chunk_exact"]
    labels, report = _segment(volume, tmp_path / "out", chunk_shape=chunk_shape, workers=workers)
    assert report["chunk_exact"], report
    assert report["cells"] == ref_report["cells"]
    np.testing.assert_array_equal(labels, ref)


@pytest.mark.slow
def test_smoothed_flows_give_identical_labels_whatever_the_chunking(volume, tmp_path):
    """`flow3D_smooth` (Cellpose's Gaussian on the flows before following them; its agreement with
    Cellpose is in tests/test_dynamics_engine.py): each block smooths its flows read with a margin
    of the filter's radius, so chunks give the whole volume's labels, which the engine's
    whole-volume run gives too."""
    sigma = (1.0, 1.5, 1.5)
    runs = [_segment(volume, tmp_path / f"out{i}", chunk_shape=c, flow3D_smooth=sigma)
            for i, c in enumerate([SHAPE, (11, 24, 20), (8, 16, 16)])]
    (ref, ref_report), *others = runs
    dP = volume["dP"]
    whole = compute_masks(dP[:3], dP[3], niter=int(200 * DIAMETER / 30), min_size=15, flow3D_smooth=sigma)
    np.testing.assert_array_equal(ref, whole)
    unsmoothed = compute_masks(dP[:3], dP[3], niter=int(200 * DIAMETER / 30), min_size=15)
    assert not np.array_equal(whole, unsmoothed)  # the smoothing did change the labels
    for labels, report in others:
        assert report["chunk_exact"], report
        np.testing.assert_array_equal(labels, ref)


@pytest.mark.slow
def test_exclude_on_edges_removes_the_cells_on_the_volumes_faces_whatever_the_chunking(volume, reference, tmp_path):
    """--exclude-on-edges equals Cellpose's remove_edge_masks on the full labels (a cell touching
    a face of the volume is removed, a cell touching only a chunk's face is kept), for any chunking."""
    from cellpose.utils import remove_edge_masks

    ref, ref_report = reference
    expect = remove_edge_masks(ref.astype(np.int32).copy())
    runs = [_segment(volume, tmp_path / f"out{i}", chunk_shape=c, exclude_on_edges=True)
            for i, c in enumerate([SHAPE, (11, 24, 20), (16, 32, 32)])]
    (labels, report), *others = runs
    assert 0 < report["removed_on_edges"] < ref_report["cells"]
    assert report["cells"] == ref_report["cells"] - report["removed_on_edges"] == expect.max()
    # the same cells, numbered 1..N in the same order: Cellpose renumbers keeping the order
    np.testing.assert_array_equal(labels, expect)
    for other, rep in others:
        np.testing.assert_array_equal(other, labels)
        assert rep["removed_on_edges"] == report["removed_on_edges"]


@pytest.mark.slow
def test_long_thin_protrusions_need_a_large_niter_and_a_halo_that_holds_their_trajectories(tmp_path):
    """A cell with a 2x2-voxel protrusion 132 voxels long (Cellpose's exact flows): the default
    niter (200 x 10 / 30 = 67 at diameter 10) leaves the protrusion's far voxels unfollowed, so
    they are lost; niter 1000 recovers every one. Chunked with a halo too short for those
    trajectories, the run says so (chunk_exact false, suggested_halo); with that halo it gives the
    whole volume's labels exactly."""
    lab = np.zeros((12, 24, 160), np.int32)
    zz, yy, xx = np.mgrid[:12, :24, :160]
    lab[(zz - 6) ** 2 + (yy - 12) ** 2 + (xx - 14) ** 2 <= 36] = 1
    lab[5:7, 11:13, 18:150] = 1
    protrusion = np.zeros(lab.shape, bool)
    protrusion[5:7, 11:13, 18:150] = True
    data = write_volume(str(tmp_path / "in"), (lab * 1000).astype(np.uint16), flows_from_labels(lab),
                        chunks=(12, 24, 40))

    def run(out, **kw):
        report = run_local(build_params(input=data["image"], output=str(tmp_path / out), flows=data["flows"],
                                        diameter=10.0, min_size=15, **kw))
        return np.asarray(open_array(str(tmp_path / out / "labels.zarr" / "0"))[...]), report

    default, _ = run("default", chunk_shape=lab.shape)
    assert (default[protrusion] > 0).sum() < 0.75 * protrusion.sum()  # the default niter loses the far voxels
    whole, _ = run("whole", chunk_shape=lab.shape, niter=1000)
    assert (whole[protrusion] == whole[6, 12, 14]).all() and whole.max() == 1  # all recovered, one cell
    stored = flows_from_labels(lab).astype(np.float16).astype(np.float32)  # the flow store is float16
    np.testing.assert_array_equal(whole, compute_masks(stored[:3], stored[3], niter=1000, min_size=15))
    # a halo too short for the trajectories: the run says so and suggests a larger one; a
    # trajectory cut by the block shows only part of its length, so following the suggestion can
    # take more than one run (docs: "Long cells")
    halo, tries = (6, 12, 20), []
    for attempt in range(4):
        chunked, report = run(f"chunked{attempt}", chunk_shape=(12, 24, 40), halo=halo, niter=1000)
        tries.append((halo, report["chunk_exact"]))
        if report["chunk_exact"]:
            break
        assert report["long_trajectories"] > 0
        halo = tuple(report["suggested_halo"])
    assert tries[0][1] is False and tries[-1][1] is True, tries
    assert tries[-1][0][2] > 100  # the trajectories' length along the protrusion
    np.testing.assert_array_equal(chunked, whole)


def test_single_chunk_equals_the_whole_volume_engine(volume, reference):
    ref, _ = reference
    dP = volume["dP"]
    whole = compute_masks(dP[:3], dP[3], niter=int(200 * DIAMETER / 30), min_size=15)
    np.testing.assert_array_equal(ref, whole)


def test_ground_truth_is_recovered(volume, reference):
    from cellpose.metrics import average_precision

    ref, _ = reference
    ap = average_precision([volume["labels"]], [ref.astype(np.int64)], threshold=[0.5])[0][0, 0]
    assert ap >= 0.95, ap


def test_resume_skips_done_chunks(volume, tmp_path):
    params = build_params(input=volume["image"], output=str(tmp_path / "o"), flows=volume["flows"],
                          diameter=DIAMETER, chunk_shape=(16, 32, 32))
    run = plan(params)
    first = run_phase(run.root, "percentiles", chunks="0-2")
    again = run_phase(run.root, "percentiles", chunks="0-4")
    assert first["ran"] == [0, 1, 2]
    assert again["ran"] == [3, 4] and again["skipped"] == 3


# -- plan and percentiles (issue 2) -------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("chunk_shape", [(5, 7, 9), (13, 30, 8), (20, 40, 40)])
@pytest.mark.parametrize("exclude_zeros", [False, True])
def test_percentiles_equal_numpy(tmp_path, dtype, chunk_shape, exclude_zeros):
    rng = np.random.default_rng(sum(chunk_shape))
    vol = rng.integers(0, np.iinfo(dtype).max, size=(17, 33, 29), endpoint=True).astype(dtype)
    vol[:, :5] = 0  # padding
    src = str(tmp_path / "vol.zarr")
    create_array(src, shape=vol.shape, chunks=(8, 8, 8), dtype=vol.dtype)[...] = vol
    out = str(tmp_path / "out")
    q = (0.5, 99.7)
    assert main(["plan", src, out, "--chunk-shape", ",".join(map(str, chunk_shape)),
                 "--percentiles", f"{q[0]},{q[1]}", "--exclude-zeros" if exclude_zeros else "--no-exclude-zeros"]) == 0
    assert main(["percentiles", "--run", out, "--shard", "0/2"]) == 0
    assert main(["percentiles", "--run", out, "--shard", "1/2"]) == 0
    assert main(["percentiles", "--run", out, "--reduce"]) == 0
    from zseg.workspace import work as W
    from zseg.workspace.context import RunContext

    got = W.lowhigh(RunContext.open(out))[0]
    values = vol[vol != 0] if exclude_zeros else vol
    np.testing.assert_array_equal(got, np.percentile(values, q))


def test_percentile_reduce_refuses_missing_chunks(tmp_path, capsys):
    vol = np.arange(8 * 8 * 8, dtype=np.uint16).reshape(8, 8, 8)
    src = str(tmp_path / "v.zarr")
    create_array(src, shape=vol.shape, chunks=(8, 8, 8), dtype=vol.dtype)[...] = vol
    out = str(tmp_path / "o")
    assert main(["plan", src, out, "--chunk-shape", "4,4,4"]) == 0
    assert main(["percentiles", "--run", out, "--chunks", "0-3"]) == 0
    assert main(["percentiles", "--run", out, "--reduce"]) == 2
    assert "4 of 8 chunk(s) of percentiles are not done (4-7)" in capsys.readouterr().err


@pytest.mark.s3
def test_plan_and_percentiles_on_s3(s3_server, volume, tmp_path):
    """Input and run folder on S3 give the percentiles of the same run on local files."""
    from zseg.engine.synth import synth_cells

    image, _ = synth_cells((16, 32, 32), diameter=8.0, seed=1)
    results = []
    for base in (str(tmp_path), f"{s3_server}/pct"):
        src = f"{base}/img.ome.zarr"
        write_ome_zarr(src, image, axes="zyx", voxel_size=(2.0, 0.5, 0.5), chunks=(8, 16, 16))
        out = f"{base}/run"
        assert main(["plan", src, out, "--chunk-shape", "8,16,16"]) == 0
        assert main(["percentiles", "--run", out]) == 0
        assert main(["percentiles", "--run", out, "--reduce"]) == 0
        from zseg.workspace import work as W
        from zseg.workspace.context import RunContext

        run = RunContext.open(out)
        assert run.anisotropy == 4.0
        results.append(W.lowhigh(run))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0][0], np.percentile(image, (1, 99)))


# -- bad input: one clear line, exit code 2, nothing written -----------------------------------
def _refused(refused, argv, out, expect):
    refused(argv, expect)
    assert not os.path.exists(out) or os.listdir(out) == ["keep.txt"]  # nothing written


def test_refuses_missing_input(tmp_path, refused):
    out = str(tmp_path / "o")
    _refused(refused, ["plan", str(tmp_path / "nope.zarr"), out], out, "does not exist")


def test_a_2d_array_is_a_slide_and_an_empty_one_is_refused(tmp_path, refused):
    """A plain 2D array is read as a one-channel slide (docs/architecture.md, "Multiplex slides"):
    all zeros, it has no informative patch, which is refused before anything is written."""
    src = str(tmp_path / "flat.zarr")
    create_array(src, shape=(40, 50), chunks=(20, 25), dtype="uint16")
    out = str(tmp_path / "o")
    _refused(refused, ["plan", src, out], out, "no informative patch")


def test_refuses_unknown_channel(tmp_path, refused):
    src = str(tmp_path / "two.ome.zarr")
    write_ome_zarr(src, np.zeros((2, 8, 16, 16), np.uint16), axes="czyx", voxel_size=(1.0, 1.0, 1.0),
                   chunks=(1, 8, 16, 16), channel_names=["membrane", "nucleus"])
    out = str(tmp_path / "o")
    _refused(refused, ["plan", src, out, "--channels", "golgi"], out, "golgi")


@pytest.mark.parametrize("bad", ["0,64,64", "32,-1,64"])
def test_refuses_chunk_side_of_zero_or_less(tmp_path, refused, bad):
    src = str(tmp_path / "v.zarr")
    create_array(src, shape=(8, 8, 8), chunks=(8, 8, 8), dtype="uint16")
    out = str(tmp_path / "o")
    _refused(refused, ["plan", src, out, "--chunk-shape", bad], out, "chunk_shape")


def test_refuses_unsupported_dtype(tmp_path, refused):
    src = str(tmp_path / "b.zarr")
    create_array(src, shape=(8, 8, 8), chunks=(8, 8, 8), dtype="bool")
    out = str(tmp_path / "o")
    _refused(refused, ["plan", src, out], out, "bool")


def test_refuses_existing_output_without_overwrite(tmp_path, refused):
    src = str(tmp_path / "v.zarr")
    create_array(src, shape=(8, 8, 8), chunks=(8, 8, 8), dtype="uint16")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _refused(refused, ["plan", src, str(out)], str(out), "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"


def test_refuses_bad_parameter_values_one_line_each(tmp_path, capsys):
    src = str(tmp_path / "v.zarr")
    create_array(src, shape=(8, 8, 8), chunks=(8, 8, 8), dtype="uint16")
    out = str(tmp_path / "o")
    code = main(["plan", src, out, "--diameter", "-3", "--percentiles", "99,1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2
    assert any("diameter" in e and "-3" in e for e in err)
    assert any("percentiles" in e and "1,99" in e for e in err)
    assert not os.path.exists(out)


def test_run_without_flows_needs_the_model(tmp_path, refused, volume, monkeypatch):
    """Without --flows the network runs: a missing model stops the run before it writes anything
    (tests/test_predict_pipeline.py tests the network phase itself)."""
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "models"))
    monkeypatch.setenv("ZSEG_MODEL_URL", "http://127.0.0.1:9/")  # never download in a test
    out = str(tmp_path / "o")
    _refused(refused, ["run", volume["image"], out], out, "put the weights file at")


def test_config_file_then_flags(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("diameter: 20\nniter: 50\nchunk-shape: [8, 16, 16]\n")
    p = build_params(str(cfg), input="a", output="b", niter=70)
    assert p.diameter == 20 and p.niter == 70 and p.chunk_shape == (8, 16, 16)


@pytest.mark.s3
@pytest.mark.parametrize("where", ["local", "s3"])
def test_plan_and_percentiles_on_every_format(where, request, tmp_path):
    """`zseg plan` and `zseg percentiles` on OME-Zarr 0.4/0.5, zarr v2/v3 and TIFF, local and on S3."""
    from tests.volumes import SOURCE, VOXEL, write_format
    from zseg.storage.volume import FORMATS
    from zseg.workspace import work as W
    from zseg.workspace.context import RunContext

    base = request.getfixturevalue("s3_server") + "/every" if where == "s3" else str(tmp_path)
    for fmt in FORMATS:
        src = write_format(fmt, base, tmp_path)
        out = f"{base}/run-{fmt}"
        assert main(["plan", src, out, "--channels", "1,0", "--chunk-shape", "5,7,9"]) == 0, fmt
        assert main(["percentiles", "--run", out]) == 0
        assert main(["percentiles", "--run", out, "--reduce"]) == 0
        run = RunContext.open(out)
        assert run.manifest["input"]["format"] == fmt
        if fmt != "zarr-v2" and fmt != "zarr-v3":
            assert run.anisotropy == VOXEL[0] / VOXEL[1], fmt
        got = W.lowhigh(run)
        for row, channel in zip(got, (1, 0)):
            np.testing.assert_array_equal(row, np.percentile(SOURCE[channel], (1, 99)))


@pytest.mark.slow
def test_anisotropic_volume_recovers_truth_and_is_chunk_invariant(tmp_path):
    from cellpose.metrics import average_precision

    image, labels = synth_cells((24, 64, 64), diameter=DIAMETER, anisotropy=2.0, seed=5)
    vol = write_volume(str(tmp_path), image, flows_from_labels(labels), chunks=(12, 32, 32), voxel_size=(2.0, 1.0, 1.0))
    whole, report = _segment(vol, tmp_path / "whole", chunk_shape=(24, 64, 64))
    chunked, chunked_report = _segment(vol, tmp_path / "chunked", chunk_shape=(8, 24, 40))
    assert report["chunk_exact"] and chunked_report["chunk_exact"]
    np.testing.assert_array_equal(chunked, whole)
    ap = average_precision([labels.astype(np.int64)], [whole.astype(np.int64)], threshold=[0.5])[0][0, 0]
    assert ap >= 0.95, ap


def test_a_halo_too_small_is_reported_not_silent(volume, tmp_path):
    _, report = _segment(volume, tmp_path / "out", chunk_shape=(16, 32, 32), halo=(3, 3, 3))
    assert not report["chunk_exact"]
    assert report["long_trajectories"] > 0
    assert all(s > 3 for s in report["suggested_halo"])
    from zseg.workspace.context import RunContext

    assert RunContext.open(str(tmp_path / "out")).manifest["result"]["suggested_halo"] == report["suggested_halo"]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device (trajectories then run on it)")
def test_labels_on_cuda_identical_whatever_the_chunking(volume, tmp_path):
    whole, _ = _segment(volume, tmp_path / "whole", chunk_shape=SHAPE, device="cuda")
    chunked, report = _segment(volume, tmp_path / "chunked", chunk_shape=(11, 24, 20), device="cuda")
    assert report["chunk_exact"]
    np.testing.assert_array_equal(chunked, whole)


@pytest.mark.slow
def test_cli_run_with_two_workers_and_a_cold_numba_cache(volume, reference, tmp_path):
    """The README's demo command on a fresh machine: workers compile numba kernels themselves."""
    import subprocess
    import sys

    out = tmp_path / "out"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "zseg", "run", volume["image"], str(out), "--flows", volume["flows"],
         "--diameter", str(DIAMETER), "--chunk-shape", "16,32,32", "--workers", "2"],
        env=env, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    labels = np.asarray(open_array(os.path.join(out, "labels.zarr", "0"))[...])
    np.testing.assert_array_equal(labels, reference[0])


def test_a_cell_enclosed_by_another_is_filled_over_as_cellpose_does_whatever_the_chunking(tmp_path):
    """A hollow sphere holding a ball: Cellpose fills the sphere's hole over the ball, which
    disappears. zseg decides it once for the enclosing cell (finalize:holes), so the labels are
    Cellpose's own (resize_and_compute_masks on the same flows) for every chunking, IDs 1..N."""
    import torch
    from cellpose import dynamics as CD

    shape = (24, 48, 48)
    zz, yy, xx = np.mgrid[:24, :48, :48]
    truth = np.zeros(shape, np.uint32)
    r = np.sqrt((zz - 12) ** 2 + (yy - 24) ** 2 + (xx - 24) ** 2)
    truth[(r <= 10) & (r > 6)] = 1
    truth[r <= 3] = 2  # inside the shell, with a gap around it
    for i, (cz, cy, cx) in enumerate([(5, 6, 6), (18, 40, 8), (6, 40, 40)]):
        truth[np.sqrt((zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2) <= 4] = 3 + i
    dP = flows_from_labels(truth)
    write_ome_zarr(str(tmp_path / "image.ome.zarr"), (truth > 0).astype(np.uint16) * 1000, axes="zyx",
                   voxel_size=(1.0, 1.0, 1.0))
    arr = create_array(str(tmp_path / "flows.zarr"), shape=dP.shape, chunks=dP.shape, dtype="float32")
    arr[...] = dP
    cellpose = CD.resize_and_compute_masks(dP[:3], dP[3], niter=200, do_3D=True, min_size=15,
                                           device=torch.device("cpu"))
    assert cellpose.max() == 4 and cellpose[12, 24, 24] == cellpose[12, 24, 16] != 0  # the ball went
    volume = {"image": str(tmp_path / "image.ome.zarr"), "flows": str(tmp_path / "flows.zarr")}
    for i, chunk in enumerate([shape, (8, 16, 16), (11, 20, 13)]):
        labels, report = _segment(volume, tmp_path / f"out{i}", chunk_shape=chunk, niter=200, halo=(24, 28, 28))
        assert report["chunk_exact"], report
        assert report["filled_over"] == {"cells": 1, "voxels": 123}  # the ball, r <= 3
        np.testing.assert_array_equal(labels, cellpose)
