"""The predict phase end to end: `zseg run` without --flows, `zseg predict --shard`, the model,
skipped blocks, and Cellpose's own run as the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.predict_support import blobs, gradient_cpsam, load, random_cpsam
from zseg.cli import main
from zseg.engine.cellpose_ref import cellpose_eval
from zseg.run.entry import run_phase
from zseg.storage.arrays import open_array
from zseg.storage.omezarr import write_ome_zarr

F16 = dict(rtol=2**-10, atol=1e-4)


def _lowhigh(out) -> np.ndarray:
    r = json.loads((out / "work" / "percentiles.json").read_text())
    return np.stack([r["low"], r["high"]], axis=1)


def _flows(out) -> np.ndarray:
    return np.asarray(open_array(str(out / "work" / "flows.zarr"))[...]).astype(np.float32)


def _markers(out) -> dict[int, dict]:
    d = out / "work" / "predict"
    return {int(p.stem[1:]): json.loads(p.read_text()) for p in sorted(d.glob("c*.json"))}


@pytest.fixture(scope="module")
def blob_volume(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    img = blobs((24, 48, 48), seed=0)
    write_ome_zarr(str(root / "image.ome.zarr"), img, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(12, 24, 24))
    torch.save(gradient_cpsam(), root / "gradient.pt")
    torch.save(random_cpsam(), root / "random.pt")
    return {"root": root, "image": img, "uri": str(root / "image.ome.zarr"),
            "gradient": str(root / "gradient.pt"), "random": str(root / "random.pt")}


# -- the acceptance run: flows and masks of `zseg run` against Cellpose ------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_zseg_run_gives_cellposes_flows_and_masks(blob_volume, tmp_path):
    """A network whose weights compute real flows (predict_support.gradient_cpsam) on 32 blobs."""
    from cellpose.metrics import average_precision

    out = tmp_path / "out"
    rc = main(["run", blob_volume["uri"], str(out), "--model", blob_volume["gradient"], "--diameter", "30",
               "--chunk-shape", "12,24,48", "--no-use-bfloat16", "--min-size", "15"])
    assert rc == 0
    markers = _markers(out)  # one per predict unit: together they run Cellpose's tiles, each once
    rec = json.loads((out / "run.json").read_text())["predict"]
    assert len(markers) == rec["units"] and all(m["skipped"] is None for m in markers.values())
    assert sum(m["tiles"] for m in markers.values()) == rec["cellpose_tiles"]
    masks, ref = cellpose_eval(load(gradient_cpsam()), blob_volume["image"][None], _lowhigh(out), diameter=30.0,
                               compute_masks=True, min_size=15)
    np.testing.assert_allclose(_flows(out), ref, **F16)
    labels = np.asarray(open_array(str(out / "labels.zarr" / "0"))[...])
    assert masks.max() == 32  # every blob is a cell: the comparison is meaningful
    ap, *_ = average_precision([masks], [labels], threshold=[0.5, 0.9])
    assert ap[0][0] >= 0.99 and ap[0][1] >= 0.9, ap


@pytest.mark.slow
def test_predict_shards_on_anisotropic_input_give_cellposes_flows(tmp_path):
    """Anisotropic (voxel size 2,1,1) and rescaled (diameter 24) input, predicted by two shards."""
    img = np.random.default_rng(5).gamma(2.0, 300.0, size=(10, 40, 60)).astype(np.uint16)
    write_ome_zarr(str(tmp_path / "aniso.ome.zarr"), img, axes="zyx", voxel_size=(2.0, 1.0, 1.0), chunks=(5, 20, 30))
    torch.save(random_cpsam(), tmp_path / "net.pt")
    out = tmp_path / "out"
    plan = ["plan", str(tmp_path / "aniso.ome.zarr"), str(out), "--model", str(tmp_path / "net.pt"), "--diameter", "24",
            "--chunk-shape", "5,20,30", "--no-use-bfloat16", "--predict-memory", "0.0001"]  # one tile per unit axis
    assert main([*plan, "--batch-size", "5"]) == 0
    assert json.loads((out / "run.json").read_text())["predict"]["units"] == 2
    assert main(["percentiles", "--run", str(out)]) == 0
    assert main(["percentiles", "--run", str(out), "--reduce"]) == 0
    assert main(["predict", "--run", str(out), "--shard", "1/2"]) == 0  # shards of predict units
    assert set(_markers(out)) == {1}
    refused = run_phase  # combine waits for every unit
    with pytest.raises(Exception, match="1 of 2 unit"):
        refused(str(out), "predict", stage="combine")
    # planned again with another batch size (an execution setting): the run resumes with it
    assert main([*plan, "--batch-size", "3"]) == 0
    assert json.loads((out / "run.json").read_text())["params"]["batch_size"] == 3
    assert main(["predict", "--run", str(out), "--shard", "0/2"]) == 0
    assert main(["predict", "--run", str(out), "--stage", "combine", "--shard", "0/1"]) == 0
    _, ref = cellpose_eval(load(random_cpsam()), img[None], _lowhigh(out), diameter=24.0, anisotropy=2.0)
    np.testing.assert_allclose(_flows(out), ref, **F16)
    again = run_phase(str(out), "predict", shard="0/2")
    assert again["ran"] == [] and again["skipped"] == 1  # done units are not redone


# -- the model ------------------------------------------------------------------------------------------
def _refused(refused, tmp_path, args, *, env=None, monkeypatch=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    err = refused(["run", *args[:1], str(out), *args[1:]])
    assert not out.exists(), "a refused run leaves nothing behind"
    assert err[0].startswith(("zseg: error: --model", "zseg: error: model")), err
    return err[0]


def test_a_missing_model_file_is_refused(blob_volume, tmp_path, refused):
    msg = _refused(refused, tmp_path, [blob_volume["uri"], "--model", str(tmp_path / "nets" / "mine.pt")])
    assert "no such file" in msg and "mine.pt" in msg


def test_a_missing_builtin_model_says_where_to_put_it(blob_volume, tmp_path, refused, monkeypatch):
    models = tmp_path / "models"
    env = {"CELLPOSE_LOCAL_MODELS_PATH": str(models), "ZSEG_MODEL_URL": "http://127.0.0.1:9/"}
    msg = _refused(refused, tmp_path, [blob_volume["uri"], "--model", "cpsam"], env=env, monkeypatch=monkeypatch)
    assert "could not be downloaded" in msg and f"put the weights file at {models / 'cpsam'}" in msg
    assert not any(models.iterdir()), "no partial download is left"


@pytest.mark.parametrize("model, words", [("cyto3", "neither a file nor a model"),
                                          ("cpdino", "DINOv3"),
                                          ("cp3", "Cellpose 3")])
def test_other_models_are_refused_not_replaced(blob_volume, tmp_path, refused, monkeypatch, model, words):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "models"))
    if model == "cp3":  # a CPnet-like state dict (no W2)
        model = str(tmp_path / "cyto3.pt")
        torch.save({"downsample.down.res_down_0.conv.conv_0.2.weight": torch.zeros(3)}, model)
    msg = _refused(refused, tmp_path, [blob_volume["uri"], "--model", model], monkeypatch=monkeypatch)
    assert words in msg


def test_a_model_with_fewer_blocks_loads(blob_volume, tmp_path):
    from zseg.storage.models import inspect_model, load_network

    path = tmp_path / "two.pt"
    torch.save({f"module.{k}": v for k, v in random_cpsam(depth=2).items()}, path)  # DataParallel prefix too
    info = inspect_model(str(path))
    assert info["network"]["depth"] == 2 and info["bsize"] == 64
    net = load_network(path, torch.device("cpu"), use_bfloat16=True)
    assert net.dtype == torch.bfloat16 and net.depth == 2


def test_an_unavailable_device_is_a_clear_error(blob_volume, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(["run", blob_volume["uri"], str(tmp_path / "out"), "--model", blob_volume["random"],
               "--device", "cuda:0", "--chunk-shape", "24,48,48"])
    assert rc == 2
    assert "no CUDA device" in capsys.readouterr().err


# -- predict units: each tile once, flows independent of the chunking -----------------------------------
def _run(uri, out, model, *args):
    assert main(["run", str(uri), str(out), "--model", str(model), "--no-use-bfloat16", *args]) == 0
    markers = _markers(out)
    return _flows_raw(out), markers, json.loads((out / "run.json").read_text())


def _flows_raw(out) -> np.ndarray:
    return np.asarray(open_array(str(out / "work" / "flows.zarr"))[...])


@pytest.mark.slow
def test_every_tile_runs_once_and_flows_are_the_same_bytes_for_any_chunking(tmp_path):
    """The tiles run (counted from the markers) are Cellpose's whole-volume count for chunks
    smaller than a tile, chunks that do not divide the volume, and units of any size; the flows
    are byte-identical to the one-chunk run's."""
    from zseg.engine.views import Geometry

    shape = (20, 100, 90)
    img = np.random.default_rng(7).gamma(2.0, 300.0, size=shape).astype(np.uint16)
    write_ome_zarr(str(tmp_path / "img.ome.zarr"), img, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(10, 50, 45))
    torch.save(random_cpsam(bsize=32), tmp_path / "net.pt")
    cellpose = sum(t for _p, t in Geometry.of(shape, diameter=24.0, bsize=32).view_counts().values())
    common = ["--diameter", "24", "--flows-dtype", "float32"]
    whole, markers, _ = _run(tmp_path / "img.ome.zarr", tmp_path / "whole", tmp_path / "net.pt", *common,
                             "--chunk-shape", "20,100,90")
    assert sum(m["tiles"] for m in markers.values()) == cellpose
    for i, (chunk, memory) in enumerate([("7,33,41", "4"), ("20,13,90", "0.0001"), ("3,100,17", "0.002")]):
        flows, markers, manifest = _run(tmp_path / "img.ome.zarr", tmp_path / f"c{i}", tmp_path / "net.pt", *common,
                                        "--chunk-shape", chunk, "--predict-memory", memory)
        assert len(markers) == manifest["predict"]["units"]
        assert sum(m["tiles"] for m in markers.values()) <= 1.05 * cellpose
        assert sum(m["tiles"] for m in markers.values()) == cellpose
        np.testing.assert_array_equal(flows, whole)
    assert manifest["predict"]["units"] > 1  # the small budget did split the work


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_labels_with_skip_empty_are_the_same_for_any_chunking(tmp_path):
    """Blobs with empty regions (zero padding in a corner and a band): the skipped units are the
    same whatever the chunking, so the flows and the labels are too."""
    img = blobs((24, 96, 96), seed=4)
    img[:, :40, :40] = 0
    img[:, 70:, :] = 0
    write_ome_zarr(str(tmp_path / "img.ome.zarr"), img, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(12, 48, 48))
    torch.save(gradient_cpsam(bsize=32), tmp_path / "net.pt")
    runs = []
    for i, chunk in enumerate(["24,96,96", "12,40,40", "7,50,33"]):
        flows, markers, _ = _run(tmp_path / "img.ome.zarr", tmp_path / f"c{i}", tmp_path / "net.pt", "--diameter", "30",
                                 "--chunk-shape", chunk, "--predict-memory", "0.001", "--min-size", "15")
        labels = np.asarray(open_array(str(tmp_path / f"c{i}" / "labels.zarr" / "0"))[...])
        runs.append((flows, labels, {k: m["skipped"] for k, m in markers.items()}))
    skipped = runs[0][2]
    assert "empty" in skipped.values() and None in skipped.values()
    assert runs[0][1].max() > 10  # cells were found
    for flows, labels, sk in runs[1:]:
        assert sk == skipped
        np.testing.assert_array_equal(flows, runs[0][0])
        np.testing.assert_array_equal(labels, runs[0][1])


def test_empty_and_masked_units_are_skipped_and_recorded(tmp_path):
    img = np.random.default_rng(2).gamma(2.0, 300.0, size=(8, 64, 96)).astype(np.uint16)
    img[:, :, 48:] = 0  # half the volume is padding: below the low percentile
    write_ome_zarr(str(tmp_path / "img.ome.zarr"), img, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(8, 32, 32))
    mask = np.ones((4, 8, 12), np.uint8)
    mask[:, 4:, :] = 0  # a coarse mask: the second half in Y is outside
    write_ome_zarr(str(tmp_path / "mask.ome.zarr"), mask, axes="zyx", voxel_size=(2.0, 8.0, 8.0), chunks=(4, 8, 12))
    torch.save(random_cpsam(bsize=16), tmp_path / "net.pt")
    out = tmp_path / "out"
    flows, markers, manifest = _run(tmp_path / "img.ome.zarr", out, tmp_path / "net.pt", "--chunk-shape", "8,32,32",
                                    "--halo", "0,0,0", "--mask", str(tmp_path / "mask.ome.zarr"), "--keep-views",
                                    "--predict-memory", "0.0001")
    flows = flows.astype(np.float32)
    reasons = {m["skipped"] for m in markers.values()}
    assert reasons == {None, "empty", "mask"}
    assert all(m["tiles"] == 0 for m in markers.values() if m["skipped"])
    for m in markers.values():  # a skipped unit's own box: flows 0, cellprob -100 per view, far below any threshold
        (z0, z1), (y0, y1), (x0, x1) = m["box"]
        if m["skipped"] == "empty" and x0 >= 64:
            assert not flows[:3, z0:z1, y0:y1, x0:x1].any()
            assert (flows[3, z0:z1, y0:y1, x0:x1] == -300).all()
    assert (flows[3, :, :24, :40] > -100).all()  # where the network ran
    views = np.asarray(open_array(str(out / "work" / "views.zarr"))[...]).astype(np.float32)
    np.testing.assert_allclose(views[:, 2].sum(0), flows[3], rtol=2**-9, atol=2e-2)
    assert not (out / "work" / "units").exists()  # scratch freed once the flows were followed


def test_given_flows_skip_the_network(tmp_path):
    img = np.random.default_rng(3).gamma(2.0, 300.0, size=(8, 24, 24)).astype(np.uint16)
    write_ome_zarr(str(tmp_path / "img.ome.zarr"), img, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(8, 24, 24))
    from zseg.storage.arrays import create_array

    flows = create_array(str(tmp_path / "flows.zarr"), shape=(4, 8, 24, 24), chunks=(4, 8, 24, 24), dtype="float16")
    flows[...] = -1.0
    out = tmp_path / "out"
    rc = main(["run", str(tmp_path / "img.ome.zarr"), str(out), "--flows", str(tmp_path / "flows.zarr"),
               "--model", str(tmp_path / "no-such-model.pt")])  # the model is not needed
    assert rc == 0
    assert not (out / "work" / "predict").exists() and not (out / "work" / "flows.zarr").exists()
    assert run_phase(str(out), "predict")["applies"] is False
    assert json.loads((out / "run.json").read_text())["network"] is None


def test_readme_table_names_real_tests():
    """Each row of README's table of the network phase's refusals names a test of this file."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("What the network phase says to bad input", 1)[1].split("\n### ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| input tried")]
    assert len(rows) >= 4
    for row in rows:
        names = re.findall(r"`(test_\w+)(?:\[[^\]]*\])?`", row.rsplit("|", 2)[-2])
        assert names and all(n in globals() for n in names), row


def test_an_unfinished_run_of_an_earlier_zseg_is_not_resumed_without_units(blob_volume, tmp_path, capsys):
    """A run planned before predict units (no `predict` in run.json) cannot resume: its flows
    would be half per chunk, half per unit."""
    out = tmp_path / "out"
    args = ["plan", blob_volume["uri"], str(out), "--model", blob_volume["random"], "--chunk-shape", "12,24,48"]
    assert main(args) == 0
    manifest = json.loads((out / "run.json").read_text())
    del manifest["predict"]
    (out / "run.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "earlier zseg" in err[0] and "--overwrite" in err[0], err
    assert main([*args, "--overwrite"]) == 0
