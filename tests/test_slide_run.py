"""``zseg run`` on a 2D multiplex slide from given flows: the layers and the table equal the
whole-slide reference chain (:func:`zseg.engine.multiplex.segment_reference`) bit for bit for
any chunking, with the flow check removing cells, uninformative patches skipping cells and cells
without a nucleus; bad inputs are refused with one line and exit 2, nothing written."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from zseg.engine import multiplex as MX
from zseg.engine.synth import flows_from_labels, synth_multiplex
from zseg.params import build_params
from zseg.run.entry import run_local
from zseg.storage.arrays import create_array, open_array
from zseg.storage.omezarr import write_ome_zarr

SHAPE = (200, 230)
DIAMETER = 18
PATCH = 32
NITER = 120


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A synthetic slide with a dark corner (uninformative patches), noisy whole-cell flows (the
    flow check removes cells) and nuclear flows missing some nuclei (cells without a nucleus)."""
    root = tmp_path_factory.mktemp("slide")
    s = synth_multiplex(SHAPE, diameter=DIAMETER, markers=3, seed=1)
    image = s["image"].copy()
    image[0, :70, :70] = 0  # no DAPI in the corner: its patches are empty
    write_ome_zarr(str(root / "slide.ome.zarr"), image, axes="cyx", voxel_size=(0.5, 0.5), unit="micrometer",
                   chunks=(1, 64, 64), channel_names=s["channel_names"])
    rng = np.random.default_rng(3)
    f = flows_from_labels(s["cells"]).astype(np.float32)
    f[:2] += rng.normal(0, 1.5, f[:2].shape).astype(np.float32)
    nuclei = s["nuclei"].copy()
    nuclei[np.isin(nuclei, rng.choice(np.unique(nuclei[nuclei > 0]), 12, replace=False))] = 0
    nf = flows_from_labels(nuclei).astype(np.float32)
    for name, data in (("flows.zarr", f), ("nuclear_flows.zarr", nf)):
        a = create_array(str(root / name), shape=data.shape, chunks=(3, 64, 64), dtype="float32")
        a[...] = data
    return {"root": root, "image": image, "names": s["channel_names"], "flows": f, "nuclear_flows": nf}


def _args(slide, out, **kw):
    root = slide["root"]
    return dict(input=str(root / "slide.ome.zarr"), output=str(out), compartment="both", nuclear_channel="DAPI",
                membrane_channels="Membrane", flows=str(root / "flows.zarr"),
                nuclear_flows=str(root / "nuclear_flows.zarr"), diameter=DIAMETER, niter=NITER, patch_size=PATCH, **kw)


def _reference(slide, compartment="both", keep_unmatched_cells=False):
    image = slide["image"]
    stats = MX.patch_stats({"nuclear": image[0], "membrane": image[1]}, origin=(0, 0), slide_shape=SHAPE,
                           patch_size=PATCH)
    informative = MX.patch_flags(stats)["is_informative"]
    return MX.segment_reference(image, slide["names"], compartment=compartment, flows=slide["flows"],
                                nuclear_flows=slide["nuclear_flows"], niter=NITER, flow_threshold=0.4, min_size=15,
                                seed_allowed=MX.seed_allowed(SHAPE, PATCH, informative),
                                keep_unmatched_cells=keep_unmatched_cells, pixel_size_um=(0.5, 0.5))


@pytest.fixture(scope="module")
def reference(slide):
    return _reference(slide)


def _layer(out, name):
    return np.asarray(open_array(os.path.join(out, "labels.zarr", name, "0"))[...])


def _table(out):
    return pq.read_table(os.path.join(out, "cells.parquet")).to_pydict()


def _assert_table_equal(got: dict, want: dict):
    assert list(got) == list(want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[k], np.float64), np.asarray(v, np.float64), err_msg=k)


@pytest.mark.parametrize("chunk", [(256, 256), (64, 64), (37, 150)])
def test_a_slide_run_equals_the_whole_slide_reference_for_any_chunking(slide, reference, tmp_path, chunk):
    out = str(tmp_path / "out")
    report = run_local(build_params(**_args(slide, out, chunk_shape=chunk)))
    assert report["chunk_exact"]
    comp = report["compartments"]["cells"]
    # the case is not vacuous: cells were removed by the flow check and skipped, nuclei are missing
    assert comp["flow_check"]["removed"] > 0 and comp["skipped_cells"] > 0
    assert 0 < report["matching"]["cells"]["unmatched"] < report["matching"]["cells"]["total"]
    assert report["matching"] == reference["matching"]
    for name, want in reference["layers"].items():
        np.testing.assert_array_equal(_layer(out, name), want, err_msg=name)
    _assert_table_equal(_table(out), reference["table"])
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())
    assert manifest["complete"] and manifest["result"]["matching"] == reference["matching"]
    assert manifest["channels"]["names"] == slide["names"]


def test_the_table_is_direct_numpy_on_the_whole_image(slide, reference, tmp_path):
    """Per-cell means of every channel in each compartment, against np.bincount on the layers."""
    out = str(tmp_path / "out")
    run_local(build_params(**_args(slide, out, chunk_shape=(64, 64))))
    t = _table(out)
    labels = np.asarray(t["label"], np.int64)
    for layer, comp in (("cells", "cell"), ("nuclei", "nucleus"), ("cytoplasm", "cytoplasm")):
        lab = _layer(out, layer).astype(np.int64).ravel()
        area = np.bincount(lab, minlength=labels.max() + 1)[labels]
        np.testing.assert_array_equal(np.asarray(t[f"area_{comp}"]), area)
        for c, name in enumerate(slide["names"]):
            sums = np.bincount(lab, weights=slide["image"][c].ravel().astype(np.float64), minlength=labels.max() + 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                want = np.where(area > 0, sums[labels] / area, np.nan)
            np.testing.assert_allclose(np.asarray(t[f"{name}_{comp}_mean"]), want, rtol=1e-12, equal_nan=True)


def test_unmatched_cells_and_layers_kept_on_request(slide, tmp_path):
    out = str(tmp_path / "out")
    report = run_local(build_params(**_args(slide, out, chunk_shape=(64, 64), keep_unmatched_cells=True,
                                            keep_unmatched_layers=True)))
    want = _reference(slide, keep_unmatched_cells=True)
    for name, layer in want["layers"].items():
        np.testing.assert_array_equal(_layer(out, name), layer, err_msg=name)
    _assert_table_equal(_table(out), want["table"])
    assert report["cells"] == want["matching"]["cells"]["total"] > want["matching"]["cells"]["matched"]
    for name, key in (("cells_unmatched", "cells"), ("nuclei_unmatched", "nuclei")):
        np.testing.assert_array_equal(_layer(out, name), want["masks"][key])


@pytest.mark.parametrize("compartment", ["whole-cell", "nuclear"])
def test_a_single_compartment(slide, tmp_path, compartment):
    out = str(tmp_path / "out")
    args = _args(slide, out, chunk_shape=(64, 100))
    if compartment == "nuclear":
        args.update(membrane_channels=None, flows=None)
    else:
        args.update(nuclear_flows=None)
    report = run_local(build_params(**{**args, "compartment": compartment}))
    want = _reference(slide, compartment=compartment)
    (name, layer), = want["layers"].items()
    np.testing.assert_array_equal(_layer(out, name), layer)
    _assert_table_equal(_table(out), want["table"])
    assert report["outputs"]["layers"] == [name] and "matching" not in report


def test_patches_table(slide, tmp_path):
    out = str(tmp_path / "out")
    run_local(build_params(**_args(slide, out, chunk_shape=(64, 64))))
    t = pq.read_table(os.path.join(out, "patches.parquet")).to_pydict()
    assert list(t) == list(MX.PATCH_COLUMNS)
    image = slide["image"]
    stats = MX.patch_stats({"nuclear": image[0], "membrane": image[1]}, origin=(0, 0), slide_shape=SHAPE,
                           patch_size=PATCH)
    for k, v in {**stats, **MX.patch_flags(stats)}.items():
        np.testing.assert_array_equal(np.asarray(t[k]), v, err_msg=k)
    assert 0 < sum(t["is_informative"]) < len(t["is_informative"])


# -- bad inputs: one line, exit 2, nothing written -------------------------------------------------
def _argv(slide, out, *extra):
    root = slide["root"]
    return ["run", str(root / "slide.ome.zarr"), str(out), "--flows", str(root / "flows.zarr"),
            "--nuclear-flows", str(root / "nuclear_flows.zarr"), "--diameter", "18", *extra]


@pytest.mark.parametrize("extra, expect", [
    (["--nuclear-channel", "DAPI", "--membrane-channels", "CD45"], "'CD45' is not in slide"),
    (["--nuclear-channel", "DAPI", "--membrane-channels", "DAPI"], "both --nuclear-channel and one of"),
    (["--nuclear-channel", "0", "--membrane-channels", "1", "--anisotropy", "2"], "--anisotropy"),
    (["--nuclear-channel", "0", "--membrane-channels", "1", "--channels", "0,1"], "--channels"),
    (["--nuclear-channel", "0", "--membrane-channels", "1", "--chunk-shape", "1,64,64"], "--chunk-shape"),
    (["--nuclear-channel", "0", "--membrane-channels", "1", "--flow3D-smooth", "1"], "--flow3D-smooth"),
    (["--nuclear-channel", "0", "--membrane-channels", "1", "--norm-per-plane"], "--norm-per-plane"),
    (["--nuclear-channel", "0", "--membrane-channels", "1", "--no-resample"], "--no-resample"),
    (["--nuclear-channel", "DAPI", "--membrane-channels", "1", "--patch-mean-threshold", "1e9"],
     "no informative patch"),
])
def test_bad_slide_inputs_are_refused_and_nothing_is_written(slide, tmp_path, refused, extra, expect):
    out = tmp_path / "out"
    refused(_argv(slide, out, *extra), expect)
    assert not out.exists()


def test_flows_of_another_shape_are_refused(slide, tmp_path, refused):
    bad = create_array(str(tmp_path / "bad.zarr"), shape=(3, 10, 10), chunks=(3, 10, 10), dtype="float32")
    bad[...] = 0
    out = tmp_path / "out"
    argv = _argv(slide, out, "--nuclear-channel", "DAPI", "--membrane-channels", "Membrane")
    argv[argv.index("--flows") + 1] = str(tmp_path / "bad.zarr")
    refused(argv, "--flows: flow store", "(3, 200, 230)")
    assert not out.exists()


# -- with a network: each compartment is Cellpose's own 2D eval ----------------------------------
@pytest.fixture(scope="module")
def blob_slide(tmp_path_factory):
    """Two channels of nucleus-like blobs (a 'DAPI' and a 'Membrane' of wider blobs) and a network
    whose weights compute real flows (predict_support.gradient_cpsam)."""
    import torch

    from tests.predict_support import blobs, gradient_cpsam

    root = tmp_path_factory.mktemp("blob_slide")
    nuc = blobs((12, 150, 170), seed=3)[6]
    mem = blobs((12, 150, 170), seed=3, sigma=3.0)[6]
    image = np.stack([nuc, mem])
    write_ome_zarr(str(root / "slide.ome.zarr"), image, axes="cyx", chunks=(1, 64, 64),
                   channel_names=["DAPI", "Membrane"])
    torch.save(gradient_cpsam(bsize=64), root / "gradient.pt")
    return {"root": root, "image": image}


@pytest.mark.filterwarnings("ignore:Sparse invariant checks", "ignore::RuntimeWarning")
@pytest.mark.parametrize("threshold", [0.0, 0.8])
def test_with_a_network_each_compartment_is_cellposes_2d_eval_for_any_chunking(blob_slide, tmp_path, threshold):
    """Flow check off, and at 0.8 (this hand-set network's flows are gradients, not diffusion
    flows: 0.8 removes some whole cells and every nucleus, so the nuclei are compared with it off)."""
    from cellpose.metrics import average_precision

    from tests.predict_support import gradient_cpsam, load
    from zseg.engine.cellpose_ref import cellpose_eval_2d

    root = blob_slide["root"]
    runs = {}
    for chunk in ((150, 170), (64, 48)):
        out = tmp_path / f"out{chunk[1]}"
        report = run_local(build_params(
            input=str(root / "slide.ome.zarr"), output=str(out), compartment="both", nuclear_channel="DAPI",
            membrane_channels="Membrane", model=str(root / "gradient.pt"), diameter=20, chunk_shape=chunk,
            use_bfloat16=False, flow_threshold=threshold, skip_uninformative=False, skip_empty=False))
        assert report["chunk_exact"]
        runs[chunk] = out
    net = load(gradient_cpsam(bsize=64)).eval()
    compared = []
    for name, planes in (("cells", [1, 0]), ("nuclei", [0])):
        whole = runs[(150, 170)] / "work" / name
        labels = np.asarray(open_array(str(whole / "labels.zarr" / "0"))[...])[0]
        chunked = np.asarray(open_array(str(runs[(64, 48)] / "work" / name / "labels.zarr" / "0"))[...])[0]
        np.testing.assert_array_equal(chunked, labels, err_msg=name)  # any chunking: identical
        r = json.loads((whole / "work" / "percentiles.json").read_text())
        lowhigh = np.stack([r["low"], r["high"]], axis=1)
        theirs, _ = cellpose_eval_2d(net, blob_slide["image"][planes].astype(np.float32), lowhigh, diameter=20.0,
                                     compute_masks=True, flow_threshold=threshold, min_size=15)
        if theirs.max() == 0:
            assert labels.max() == 0, name
            continue
        ap = average_precision([theirs.astype(np.int64)], [labels.astype(np.int64)])[0][0]
        assert ap[0] >= 0.99, (name, ap, theirs.max(), labels.max())
        compared.append((name, int(theirs.max())))
    assert compared[0][0] == "cells" and compared[0][1] > 100
    if threshold == 0:
        assert [c[0] for c in compared] == ["cells", "nuclei"] and compared[1][1] > 100
    else:
        report = json.loads((runs[(150, 170)] / "work" / "cells" / "run.json").read_text())["result"]
        assert report["flow_check"]["removed"] > 0


def _rings(geometry):
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return [r for p in polys for r in p]


def test_anndata_and_geojson_outputs(slide, tmp_path):
    import anndata as ad

    from zseg.engine.outlines import ring_area

    out = str(tmp_path / "out")
    report = run_local(build_params(**_args(slide, out, chunk_shape=(64, 64), anndata=True, geojson=True)))
    t = _table(out)
    names = slide["names"]
    a = ad.read_h5ad(report["outputs"]["anndata"])
    assert list(a.var_names) == names and a.shape == (len(t["label"]), len(names))
    np.testing.assert_array_equal(a.X, np.stack([t[f"{n}_cell_mean"] for n in names], axis=1))
    np.testing.assert_array_equal(a.layers["nucleus"], np.stack([t[f"{n}_nucleus_mean"] for n in names], axis=1))
    np.testing.assert_array_equal(a.obsm["spatial"], np.stack([t["centroid_x_um"], t["centroid_y_um"]], axis=1))
    gj = json.loads(open(report["outputs"]["geojson"]).read())
    feats = gj["features"]
    assert [int(f["id"]) for f in feats] == list(t["label"])
    for f, area_cell, area_nucleus in zip(feats, t["area_cell"], t["area_nucleus"]):
        assert f["properties"]["objectType"] == "cell"
        assert sum(ring_area(r) for r in _rings(f["geometry"])) == area_cell  # the outline is the pixels
        assert sum(ring_area(r) for r in _rings(f["nucleusGeometry"])) == area_nucleus
        assert f["properties"]["measurements"]["area_cell"] == area_cell


def test_the_qc_report_shows_outlines_patches_matching_and_sizes(slide, tmp_path):
    out = tmp_path / "out"
    report = run_local(build_params(**_args(slide, str(out), chunk_shape=(64, 64))))
    page = (out / "qc" / "report.html").read_text()
    assert report["outputs"]["qc"] == str(out / "qc" / "report.html")
    for png in ("cells.png", "nuclei.png", "patches.png", "cell_areas.png", "nucleus_areas.png"):
        assert f'src="{png}"' in page and (out / "qc" / png).stat().st_size > 1000, png
    assert f"{report['matching']['matched_fraction']:.4g}"[:5] in page and "removed by the flow check" in page


def test_the_stages_one_by_one_as_nextflow_runs_them(slide, reference, tmp_path):
    """zseg plan, then each stage command of the slide and of its compartments, shard by shard:
    what the Nextflow pipeline runs, giving what zseg run gives."""
    from zseg.cli import main
    from zseg.workspace.stages import STAGES

    out = str(tmp_path / "out")
    a = _args(slide, out, chunk_shape=(64, 64))
    flags = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in a.items() if k not in ("input", "output")]
    emit = tmp_path / "plan.json"
    assert main(["plan", a["input"], out, *flags, "--emit", str(emit)]) == 0
    plan = json.loads(emit.read_text())
    assert plan["kind"] == "slide" and plan["nchunks"] == 16

    def stage(run, name, kind):
        phase, _, sub = name.partition(":")
        argv = [phase, "--run", run] + (["--stage", sub] if sub and sub != "reduce" else [])
        if kind == "map":
            for i in range(4):
                assert main(argv + ["--shard", f"{i}/4"]) == 0, name
        else:
            assert main(argv + (["--reduce"] if sub == "reduce" else [])) == 0, name

    stage(out, "slide:inputs", "map")
    stage(out, "slide:compartments", "reduce")
    for c in json.loads((tmp_path / "out" / "work" / "compartments.json").read_text())["compartments"]:
        for name, st in STAGES.items():
            stage(c["run"], name, st.kind)
    for name, kind in (("match:decide", "map"), ("match:number", "reduce"), ("slide:layers", "map"),
                       ("slide:report", "reduce")):
        stage(out, name, kind)
    for name, want in reference["layers"].items():
        np.testing.assert_array_equal(_layer(out, name), want, err_msg=name)
    _assert_table_equal(_table(out), reference["table"])


def test_a_killed_slide_run_resumes_to_the_same_result(slide, reference, tmp_path, monkeypatch):
    from zseg.run import tasks

    out = str(tmp_path / "out")
    real = tasks.FUNCTIONS["slide:layers"]

    def dies_at_chunk_5(run, index):
        if index == 5:
            raise RuntimeError("killed")
        return real(run, index)

    monkeypatch.setitem(tasks.FUNCTIONS, "slide:layers", dies_at_chunk_5)
    with pytest.raises(RuntimeError, match="killed"):
        run_local(build_params(**_args(slide, out, chunk_shape=(64, 64))))
    monkeypatch.setitem(tasks.FUNCTIONS, "slide:layers", real)
    report = run_local(build_params(**_args(slide, out, chunk_shape=(64, 64))))
    assert report["skipped"]["cells"] == report["skipped"]["nuclei"] == "done"
    assert report["skipped"]["match:number"] == "done" and report["skipped"]["slide:layers"].startswith("0-4")
    for name, want in reference["layers"].items():
        np.testing.assert_array_equal(_layer(out, name), want, err_msg=name)
    _assert_table_equal(_table(out), reference["table"])


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_labels_zarr_is_an_ngff_labels_group_of_image_labels(slide, tmp_path, zarr_format):
    """Each layer validates as an NGFF image-label (0.5 on zarr v3, 0.4 on v2) with a pyramid whose
    levels are the mode of 2x2 windows of the level below, in micrometres."""
    import zarr

    from zseg.engine.pyramid import downsample_mode

    if zarr_format == 3:
        from ome_zarr_models.v05.image_label import ImageLabel
    else:
        from ome_zarr_models.v04.image_label import ImageLabel
    out = tmp_path / "out"
    run_local(build_params(**_args(slide, str(out), chunk_shape=(64, 64), zarr_format=zarr_format)))
    root = zarr.open_group(str(out / "labels.zarr"), mode="r")
    attrs = root.attrs.asdict()
    assert (attrs.get("ome", attrs))["labels"] == ["cells", "nuclei", "cytoplasm"]
    for name in ("cells", "nuclei", "cytoplasm"):
        label = ImageLabel.from_zarr(zarr.open_group(str(out / "labels.zarr" / name), mode="r"))
        a = label.attributes.model_dump(by_alias=True)
        ms = (a.get("ome", a))["multiscales"][0]
        assert [ax["name"] for ax in ms["axes"]] == ["y", "x"]
        scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
        assert scales[0] == [0.5, 0.5] and scales[1] == [1.0, 1.0]
        level0 = _layer(str(out), name)
        level1 = np.asarray(open_array(str(out / "labels.zarr" / name / "1"))[...])
        np.testing.assert_array_equal(level1, downsample_mode(level0, (2, 2)))


def test_a_cellpose3_network_on_a_slide_gives_cellpose3s_own_2d_masks(tmp_path):
    """The Cellpose 3 family through a slide run: the fixture network (tests/fixtures/cp3, made by
    Cellpose 3.1.1.3's own 2D eval) on its 48 x 64 image, cut into 4 chunks."""
    from tests.test_cp3 import FIXTURE, ap50

    img = np.load(FIXTURE / "cp3.npz")["img2"]
    write_ome_zarr(str(tmp_path / "slide.ome.zarr"), img[None], axes="cyx", chunks=(1, 24, 32), channel_names=["DAPI"])
    out = tmp_path / "out"
    report = run_local(build_params(
        input=str(tmp_path / "slide.ome.zarr"), output=str(out), compartment="nuclear", nuclear_channel="DAPI",
        model=str(FIXTURE / "gradient_net.pt"), diameter=30, chunk_shape=(24, 32), percentiles=(0, 100),
        min_size=-1, niter=200, flow_threshold=0, skip_uninformative=False, skip_empty=False, device="cpu"))
    assert report["chunk_exact"]
    ref = np.load(FIXTURE / "cp3.npz")["gmasks2"]
    assert ref.max() > 5 and ap50(ref, _layer(str(out), "nuclei")) >= 0.99


def test_the_table_streamed_in_small_passes_is_the_same(slide, reference, tmp_path, monkeypatch):
    """The report merges the chunks' partial statistics a range of labels at a time (memory: one
    range); ranges of 7 labels give the same table, GeoJSON and AnnData as one pass."""
    from zseg.outputs import slide as O

    runs = {}
    for rows in (O.TABLE_ROWS, 7):
        monkeypatch.setattr(O, "TABLE_ROWS", rows)
        out = tmp_path / f"out{rows}"
        run_local(build_params(**_args(slide, str(out), chunk_shape=(64, 64), geojson=True)))
        runs[rows] = out
    _assert_table_equal(_table(str(runs[7])), reference["table"])
    assert (runs[7] / "cells.geojson").read_text() == (runs[O.TABLE_ROWS] / "cells.geojson").read_text()
    assert pq.read_metadata(str(runs[7] / "cells.parquet")).num_row_groups > 10


@pytest.mark.parametrize("axes", ["cyx", "yxc"])
def test_a_plain_array_slide_with_axes_runs(slide, reference, tmp_path, axes):
    """`--axes cyx` / `yxc` on a plain zarr array (the issue's inputs): the same result as the OME-Zarr."""
    image = slide["image"] if axes == "cyx" else np.ascontiguousarray(slide["image"].transpose(1, 2, 0))
    arr = create_array(str(tmp_path / "plain.zarr"), shape=image.shape, chunks=image.shape, dtype=image.dtype)
    arr[...] = image
    out = str(tmp_path / "out")
    args = _args(slide, out, chunk_shape=(64, 64), axes=axes)
    args.update(input=str(tmp_path / "plain.zarr"), nuclear_channel=0, membrane_channels="1")
    run_local(build_params(**args))
    for name, want in reference["layers"].items():
        np.testing.assert_array_equal(_layer(out, name), want, err_msg=name)


def test_a_finished_or_different_slide_run_is_not_resumed(slide, tmp_path, refused):
    """The output-folder rules of the volume plan (one shared check): a finished run is refused
    without --overwrite, an unfinished one with other parameters too, nothing is changed."""
    from zseg.run import tasks

    out = tmp_path / "out"
    argv = _argv(slide, out, "--nuclear-channel", "DAPI", "--membrane-channels", "Membrane", "--chunk-shape", "64,64")
    real = tasks.FUNCTIONS["slide:report"]
    tasks.FUNCTIONS["slide:report"] = lambda run: (_ for _ in ()).throw(RuntimeError("killed"))
    try:
        with pytest.raises(RuntimeError, match="killed"):
            run_local(build_params(**_args(slide, str(out), chunk_shape=(64, 64))))
    finally:
        tasks.FUNCTIONS["slide:report"] = real
    before = (out / "run.json").read_text()
    refused([*argv, "--flow-threshold", "0.5"], "other parameters", "flow_threshold")
    assert (out / "run.json").read_text() == before
    run_local(build_params(**_args(slide, str(out), chunk_shape=(64, 64))))
    refused(argv, "already holds a finished run")


def test_a_slide_whose_nuclear_flows_changed_is_not_resumed(slide, tmp_path, refused):
    """A slide run records the fingerprint of its slide and flow stores; the same command after
    the nuclear flows were rewritten in place is refused, naming the store and the chunk."""
    import shutil

    import zarr

    from zseg.phases.slide import plan_slide

    data = tmp_path / "data"
    shutil.copytree(slide["root"], data)
    mine = {**slide, "root": data}
    out = tmp_path / "out"
    run = plan_slide(build_params(**_args(mine, out)))
    assert set(run.manifest["fingerprint"]) == {"input", "flows", "nuclear_flows"}
    arr = zarr.open_array(str(data / "nuclear_flows.zarr"), mode="r+")
    arr[:, :8, :8] = np.asarray(arr[:, :8, :8])[:, ::-1]
    refused(_argv(mine, out, "--nuclear-channel", "DAPI", "--membrane-channels", "Membrane", "--niter", str(NITER),
                  "--patch-size", str(PATCH)),
            "nuclear_flows", "1 stored object(s) changed: c/0/0/0 (rewritten) since this run was planned")


def test_a_slide_task_reading_a_changed_chunk_is_refused_and_others_are_not(slide, tmp_path, refused):
    """Each slide task checks the stored objects of the slide under the boxes it reads (one HEAD
    each, no listing): after one chunk of the slide was rewritten in place, the network-input task
    of a chunk over it is refused with one line naming the object; another chunk's task runs."""
    import shutil

    import zarr

    from zseg.cli import main
    from zseg.phases.slide import plan_slide

    data = tmp_path / "data"
    shutil.copytree(slide["root"], data)
    mine = {**slide, "root": data}
    out = tmp_path / "out"
    run = plan_slide(build_params(**_args(mine, out, chunk_shape=(64, 64))))
    arr = zarr.open_array(str(data / "slide.ome.zarr" / "0"), mode="r+")
    assert arr.chunks == (1, 64, 64)
    arr[0, 64:128, 64:128] = np.asarray(arr[0, 64:128, 64:128])[::-1]  # the DAPI chunk (1, 1), same size
    over = 1 * run.grid.grid_shape[1] + 1  # the grid chunk whose core is that chunk
    assert main(["slide", "--run", str(out), "--stage", "inputs", "--chunks", "0"]) == 0
    refused(["slide", "--run", str(out), "--stage", "inputs", "--chunks", str(over)],
            f"input {str(data / 'slide.ome.zarr' / '0')!r}: stored object c/0/1/1 changed since this run was planned")


def test_slide_flows_changed_before_the_compartments_are_planned_are_refused(slide, tmp_path, refused):
    """Each compartment fingerprints the flows it reads when it is planned; flows rewritten
    between the slide's plan and that moment are refused there, not taken as the run's own."""
    import shutil

    import zarr

    from zseg.cli import main
    from zseg.phases.slide import plan_slide

    data = tmp_path / "data"
    shutil.copytree(slide["root"], data)
    out = tmp_path / "out"
    plan_slide(build_params(**_args({**slide, "root": data}, out)))
    assert main(["slide", "--run", str(out), "--stage", "inputs"]) == 0
    arr = zarr.open_array(str(data / "flows.zarr"), mode="r+")
    arr[:, :8, :8] = np.asarray(arr[:, :8, :8])[:, ::-1]
    refused(["slide", "--run", str(out), "--stage", "compartments"],
            f"flows {str(data / 'flows.zarr')!r}: 1 stored object(s) changed: c/0/0/0 (", "since this run was planned")
    assert not (out / "work" / "cells" / "run.json").exists()


#: A slide run's own stages, and stages of its compartments' one-plane runs (under work/cells),
#: each killed by SIGKILL: (stage, the folder of its markers under OUT/work, the file its reduce
#: is killed before, or None for its result).
SLIDE_KILLED = [("slide:inputs", "", None), ("slide:compartments", "", None), ("seeds:follow", "cells", None),
                ("finalize:holes", "cells", None), ("finalize:number", "cells", None), ("match:decide", "", None),
                ("match:number", "", None), ("slide:layers", "", None), ("slide:report", "", "run.json")]


@pytest.fixture(scope="module")
def slide_done(slide, tmp_path_factory):
    """An uninterrupted `zseg run` of the slide in 16 chunks: its folder."""
    from zseg.cli import main

    out = tmp_path_factory.mktemp("slide_done") / "out"
    assert main(_argv(slide, out, *KILL_ARGS)) == 0
    return out


KILL_ARGS = ("--nuclear-channel", "DAPI", "--membrane-channels", "Membrane", "--niter", str(NITER),
             "--patch-size", str(PATCH), "--chunk-shape", "64,64")


@pytest.mark.slow
@pytest.mark.parametrize("stage, under, file", SLIDE_KILLED)
def test_a_killed_slide_run_resumes_to_identical_layers_and_table(slide, slide_done, tmp_path, stage, under, file):
    """`zseg run` of a slide killed inside one of its stages (or one of its compartments'), then
    the same command again: the same layers, table and patch table, byte for byte in value."""
    import subprocess
    import sys

    from tests import test_reliability as R
    from zseg.outputs.verify import verify_output
    from zseg.workspace.stages import SLIDE_STAGES, STAGES

    st = {**STAGES, **SLIDE_STAGES}[stage]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zseg", *_argv(slide, out, *KILL_ARGS)]
    markers = out / "work" / under if under else out
    R.kill_inside(cmd, tmp_path, stage, lambda: 2 <= len(R._markers(markers, st.marker_dir)) <= 12, file=file)
    if st.kind == "map":
        assert 2 <= len(R._markers(markers, st.marker_dir)) < 16
    else:
        assert not (markers / "work" / st.result).exists()
    assert not json.loads((out / "run.json").read_text())["complete"]
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed" in again.stderr
    for name in ("cells", "nuclei", "cytoplasm"):
        np.testing.assert_array_equal(_layer(out, name), _layer(slide_done, name), err_msg=name)
    _assert_table_equal(_table(out), _table(slide_done))
    assert pq.read_table(out / "patches.parquet").equals(pq.read_table(slide_done / "patches.parquet"))
    assert verify_output(str(out))["ok"]


def test_a_slide_plan_killed_midway_resumes_to_identical_layers_and_table(slide, slide_done, tmp_path):
    """What a slide's plan writes after run.json (the fingerprint tables, the patch table, the
    inputs store, the label layers), each left half-written as a SIGKILL leaves it: the same
    command finishes the plan and the run, identical to an uninterrupted one."""
    import shutil

    from zseg.cli import main
    from zseg.outputs.verify import verify_output

    out = tmp_path / "out"
    argv = _argv(slide, out, *KILL_ARGS)
    assert main(["plan", *argv[1:]]) == 0
    (out / "work" / "fingerprint" / "input.zarr" / "zarr.json").unlink()
    shutil.rmtree(out / "work" / "fingerprint" / "flows.zarr" / "c")
    (out / "patches.parquet").unlink()
    (out / "work" / "inputs.zarr" / "zarr.json").unlink()
    (out / "labels.zarr" / "cytoplasm" / "1" / "zarr.json").unlink()
    assert main(argv) == 0
    for name in ("cells", "nuclei", "cytoplasm"):
        np.testing.assert_array_equal(_layer(out, name), _layer(slide_done, name), err_msg=name)
    _assert_table_equal(_table(out), _table(slide_done))
    assert pq.read_table(out / "patches.parquet").equals(pq.read_table(slide_done / "patches.parquet"))
    assert verify_output(str(out))["ok"]


def test_verify_checks_a_slide_run_layer_by_layer(slide, slide_done, tmp_path):
    """`zseg verify` of a slide run: every layer's chunks against the digests its tasks recorded,
    the first layer's IDs 1..N, the table's rows; an altered chunk of one layer is named with the
    command that writes it again, and an unfinished slide run lists its missing stages."""
    import shutil

    import zarr

    from zseg.errors import UserError
    from zseg.outputs.verify import verify_output
    from zseg.phases.slide import plan_slide

    out = tmp_path / "out"
    shutil.copytree(slide_done, out)
    ok = verify_output(str(out))
    assert ok["ok"] and ok["digests_checked"] and ok["layers"] == ["cells", "nuclei", "cytoplasm"]
    arr = zarr.open_array(str(out / "labels.zarr" / "nuclei" / "0"), mode="r+")
    block = np.asarray(arr[64:128, 64:128])
    assert block.any()
    arr[64:128, 64:128] = block[::-1]  # the same IDs, moved: only the digest can tell
    with pytest.raises(UserError) as e:
        verify_output(str(out))
    text = "\n".join(e.value.problems)
    assert f"{out / 'labels.zarr' / 'nuclei'}/0: 1 chunk(s) differ from what the run wrote (5)" in text, text
    assert f"zseg slide --run {out} --stage layers --chunks" in text
    unfinished = tmp_path / "unfinished"
    plan_slide(build_params(**_args(slide, unfinished, chunk_shape=(64, 64))))
    with pytest.raises(UserError) as e:
        verify_output(str(unfinished))
    text = "\n".join(e.value.problems)
    assert "the run is not finished" in text and "slide:inputs: 16 of 16 chunk(s) not done" in text, text
