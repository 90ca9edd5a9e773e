"""``zseg train``: fine-tuning either family with Cellpose's objective; the weights load back in
zseg (and a CPSAM network's in Cellpose 4); bad inputs are refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from tests.predict_support import random_cpsam
from zseg.cli import main
from zseg.engine import training as TR
from zseg.engine.cpsam import cpsam_state_dict
from zseg.engine.synth import synth_cells
from zseg.storage.models import load_network
from zseg.storage.omezarr import write_ome_zarr

FIXTURE = Path(__file__).parent / "fixtures" / "cp3"


def write_planes(folder, seed: int, count: int, *, shape=(24, 96, 96), mask_filter="_masks"):
    """``count`` YX planes of a synthetic volume of touching cells, with their labels."""
    folder.mkdir(parents=True, exist_ok=True)
    vol, lab = synth_cells(shape, diameter=16, seed=seed, noise=0.15)
    for k, z in enumerate(np.linspace(2, shape[0] - 3, count).astype(int)):
        tifffile.imwrite(folder / f"p{k}.tif", vol[z].astype(np.float32))
        tifffile.imwrite(folder / f"p{k}{mask_filter}.tif", lab[z].astype(np.uint16))
    return folder


@pytest.fixture(scope="module")
def planes(tmp_path_factory):
    root = tmp_path_factory.mktemp("planes")
    return {"train": write_planes(root / "train", 3, 4), "test": write_planes(root / "test", 4, 2)}


def test_cellposes_learning_rate_schedule():
    lr = TR.lr_schedule(0.01, 120)
    assert lr[0] == 0 and lr[9] == 0.01 and lr[60] == 0.01 and len(lr) == 120
    assert lr[-1] == pytest.approx(0.01 / 2**10)  # halved ten times over the last 50 epochs


def test_fine_tuning_a_cellpose3_model_lowers_the_held_out_loss_and_loads_back(planes, tmp_path):
    """The Cellpose 3 fixture network (random weights, saved by Cellpose 3's own save_model)."""
    out = tmp_path / "tuned.pt"
    start = FIXTURE / "net.pt"
    assert main(["train", str(planes["train"]), "--model", str(start), "--output", str(out), "--n-epochs", "6",
                 "--bsize", "96", "--test-dir", str(planes["test"]), "--device", "cpu"]) == 0
    rec = json.loads((tmp_path / "tuned.pt.json").read_text())
    assert rec["family"] == "cp3" and rec["rescale"] and rec["learning_rate"] == 0.005 and rec["batch_size"] == 8
    assert rec["test_loss"][-1] < rec["test_loss_before"], rec
    net = load_network(out, torch.device("cpu"))
    assert net.family == "cp3" and float(net.diam_labels) == pytest.approx(rec["diam_labels"])
    before, after = torch.load(start, weights_only=True), torch.load(out, weights_only=True)
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)
    vol = synth_cells((16, 48, 48), diameter=16, seed=9)[0]
    write_ome_zarr(str(tmp_path / "v.ome.zarr"), vol, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(16, 48, 48))
    assert main(["run", str(tmp_path / "v.ome.zarr"), str(tmp_path / "seg"), "--model", str(out),
                 "--diameter", "16", "--device", "cpu"]) == 0  # zseg runs the tuned weights


@pytest.mark.slow
def test_fine_tuning_a_cpsam_model_writes_weights_that_cellpose4_loads(planes, tmp_path):
    """A one-block CPSAM of Cellpose's full width (Cellpose's own tests use 2 of its 24 blocks):
    Cellpose 4's CPSAM takes every tensor zseg wrote, unchanged."""
    from cellpose.vit import CPSAM

    start = tmp_path / "start.pt"
    torch.save(cpsam_state_dict(depth=1), start)
    out = tmp_path / "tuned.pt"
    assert main(["train", str(planes["train"]), "--model", str(start), "--output", str(out), "--n-epochs", "2",
                 "--device", "cpu"]) == 0
    rec = json.loads((tmp_path / "tuned.pt.json").read_text())
    assert rec["family"] == "cpsam" and rec["bsize"] == 256 and not rec["rescale"] and rec["batch_size"] == 1
    assert load_network(out, torch.device("cpu"), use_bfloat16=False).family == "cpsam"
    mine = torch.load(out, weights_only=True)
    model = CPSAM()
    model.load_model(str(out), device=torch.device("cpu"))  # Cellpose's own loader (strict=False)
    theirs = model.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in mine.items())
    assert any(not torch.equal(v, torch.load(start, weights_only=True)[k]) for k, v in mine.items())


@pytest.mark.parametrize("setup, args, words", [
    ("none", [], "is not a folder"),
    ("empty", [], "has no image with labels"),
    ("pickle", [], "pass --trust-seg-npy"),
    ("shape", [], "must match their image"),
    ("ok", ["--n-epochs", "0"], "--n-epochs 0"),
    ("ok", ["--learning-rate", "-1"], "--learning-rate -1.0"),
    ("ok", ["--bsize", "100"], "--bsize 100"),
    ("cpsam", ["--bsize", "128"], "trains on tiles of its own size only (64)"),
    ("ok", ["--min-train-masks", "1000"], "--min-train-masks 1000"),
    ("exists", [], "exists; choose another --output"),
])
def test_bad_training_inputs_are_refused(tmp_path, refused, setup, args, words):
    data = tmp_path / "data"
    model = "zseg-demo"
    if setup in ("ok", "exists", "cpsam", "shape", "pickle"):
        write_planes(data, 1, 2, shape=(8, 48, 48))
    if setup == "empty":
        data.mkdir()
    if setup == "pickle":
        for p in data.glob("*_masks.tif"):
            np.save(data / p.name.replace("_masks.tif", "_seg.npy"), {"masks": tifffile.imread(p)}, allow_pickle=True)
            p.unlink()
    if setup == "shape":
        tifffile.imwrite(data / "p0_masks.tif", np.zeros((10, 10), np.uint16))
    if setup == "cpsam":
        model = str(tmp_path / "cpsam.pt")
        torch.save(random_cpsam(), model)
    out = tmp_path / "out.pt"
    if setup == "exists":
        out.write_bytes(b"mine")
    refused(["train", str(data), "--model", model, "--output", str(out), "--device", "cpu", *args], words)
    assert (out.read_bytes() == b"mine") if setup == "exists" else not out.exists()


def test_seg_npy_labels_are_read_when_trusted(tmp_path):
    data = write_planes(tmp_path / "data", 2, 2, shape=(8, 48, 48))
    for p in data.glob("*_masks.tif"):
        np.save(data / p.name.replace("_masks.tif", "_seg.npy"), {"masks": tifffile.imread(p)}, allow_pickle=True)
        p.unlink()
    out = tmp_path / "out.pt"
    assert main(["train", str(data), "--model", "zseg-demo", "--output", str(out), "--n-epochs", "1", "--bsize", "64",
                 "--trust-seg-npy", "--min-train-masks", "1", "--device", "cpu"]) == 0
    assert len(json.loads((tmp_path / "out.pt.json").read_text())["images"]) == 2
