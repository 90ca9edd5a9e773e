"""The bundled demo network (``--model zseg-demo``) and the script that trains it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from zseg.engine.synth import synth_cells
from zseg.storage import models

ROOT = Path(__file__).resolve().parents[1]


def _ap50(ref: np.ndarray, ours: np.ndarray) -> float:
    from cellpose.metrics import average_precision

    return float(average_precision([ref.astype(np.int64)], [ours.astype(np.int64)], threshold=[0.5])[0][0][0])


def _training_script():
    """scripts/train_demo_model.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_model_is_a_small_cellpose3_network_shipped_in_the_package():
    info = models.inspect_model("zseg-demo", download=False)
    path = Path(info["path"])
    assert path.parent == Path(str(models.resources.files("zseg") / "data"))
    assert info["family"] == "cp3" and info["bsize"] == 224
    assert info["network"]["nbase"][0] == 2  # cytoplasm + (zero) nucleus channel, as Cellpose 3
    assert info["diam_mean"] == 16.0
    assert info["bytes"] < 5e6  # "a few MB at most"
    net = models.load_network(path, torch.device("cpu"))  # strict load
    assert net.family == "cp3" and float(net.diam_labels) == 16.0
    # the training record sits beside it and describes this very network
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["nbase"] == info["network"]["nbase"]
    assert record["parameters"] == sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_a_name_in_the_model_folder_wins_over_the_bundled_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    (tmp_path / "zseg-demo").write_bytes(b"x")
    assert models.resolve_model("zseg-demo", download=False) == tmp_path / "zseg-demo"


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("membrane", [False, True], ids=["interior", "membrane"])
def test_zseg_run_with_the_demo_model_segments_a_synthetic_volume(tmp_path, membrane):
    """The whole pipeline, network included, offline: the demo network finds the cells of a
    synthetic volume it was not trained on (another shape, hence other cells), and the chunked
    labels are Cellpose's own dynamics on the same (trained-network) flows."""
    from cellpose import dynamics as cpd

    from zseg.cli import main
    from zseg.storage.arrays import open_array

    stain = ["--membrane"] if membrane else []
    assert main(["synth", str(tmp_path), "--shape", "32,72,72", "--diameter", "16", "--seed", "7", "--no-flows",
                 *stain]) == 0
    uri = str(tmp_path / "image.ome.zarr")
    image = np.asarray(open_array(uri + "/0")[...])
    truth = np.asarray(open_array(uri + "/labels/cells/0")[...])
    want_image, want_truth = synth_cells((32, 72, 72), diameter=16, seed=7, membrane=membrane)
    np.testing.assert_array_equal(image, want_image)  # --membrane reaches the image
    np.testing.assert_array_equal(truth, want_truth)
    out = tmp_path / "out"
    rc = main(["run", uri, str(out), "--model", "zseg-demo", "--diameter", "16", "--chunk-shape", "16,36,36",
               "--device", "cpu"])
    assert rc == 0
    labels = np.asarray(open_array(str(out / "labels.zarr" / "0"))[...])
    assert _ap50(truth, labels) >= (0.75 if membrane else 0.9)  # measured 0.818, 0.951
    flows = np.asarray(open_array(str(out / "work" / "flows.zarr"))[...], dtype=np.float32)
    theirs = cpd.compute_masks(flows[:3], flows[3], niter=200, do_3D=True, min_size=15)
    assert _ap50(theirs, labels) >= 0.99


def test_the_training_script_writes_a_network_zseg_loads_strictly(tmp_path):
    train = _training_script()
    out = tmp_path / "tiny.pt"
    train.main([str(out), "--nbase", "4,8", "--steps", "3", "--batch", "2", "--volumes", "1", "--size", "24",
                "--planes", "4", "--report", "3", "--threads", "1"])
    info = models.inspect_model(str(out), download=False)
    assert info["family"] == "cp3" and info["network"]["nbase"] == [2, 4, 8] and info["diam_mean"] == 16.0
    net = models.load_network(out, torch.device("cpu"))
    y, style = net(torch.zeros(1, 1, 32, 32))  # one channel in: the nucleus channel is zeros
    assert y.shape == (1, 3, 32, 32) and style.shape == (1, 8)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["steps"] == 3 and len(record["history"]) == 1


def test_the_training_augmentation_keeps_flows_pointing_at_the_same_cells():
    """Flipping or transposing a plane must transform its flow vectors with it, or the
    network learns flows that point away from the centres."""
    train = _training_script()
    from zseg.engine.synth import flows_from_labels

    lab = np.zeros((20, 24), np.int32)
    lab[2:9, 3:14] = 1
    lab[11:18, 6:19] = 2  # odd sides: the centre pixel is unique, so it moves with the flip
    flows = flows_from_labels(lab)
    x = torch.from_numpy(lab[None, None].astype(np.float32))
    t = torch.from_numpy(np.stack([flows[0], flows[1], (lab > 0).astype(np.float32)])[None])
    for seed in range(16):  # all 8 symmetries come up
        xa, ta = train.augment(x, t, np.random.default_rng(seed))
        la = xa[0, 0].numpy().astype(np.int32)
        # the transformed label image's own flows equal the transformed flows (but for a rare
        # pixel where Cellpose's diffusion is not symmetric under the flip)
        want = flows_from_labels(la)[:2]
        got = ta[0, :2].numpy()
        assert np.mean(np.abs(got - want) > 1e-5) < 0.01
        fg = la > 0
        assert np.mean((got * want).sum(0)[fg] > 0) > 0.98  # pointing the same way


@pytest.mark.parametrize("model, diameter, niter", [("zseg-demo", 16, 200), ("zseg-demo", 8, 100),
                                                     ("cpsam", 16, 106)])
def test_default_niter_is_cellposes_200_over_rescale_with_the_models_diam_mean(tmp_path, model, diameter, niter):
    """Cellpose 3 follows flows for ``200 / rescale`` steps with ``rescale = diam_mean / diameter``;
    the demo network's ``diam_mean`` is 16, cpsam's 30."""
    from zseg.params import RunParams
    from zseg.phases.plan import plan
    from zseg.storage.omezarr import write_ome_zarr

    image, _ = synth_cells((8, 32, 32), diameter=8, seed=1)
    uri = str(tmp_path / "image.ome.zarr")
    write_ome_zarr(uri, image, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(8, 32, 32))
    params = RunParams(input=uri, output=str(tmp_path / "out"), model=model, diameter=diameter)
    assert plan(params).manifest["niter"] == niter  # without --check-model: read from the file, no download


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_flows_can_be_stored_as_float32(tmp_path):
    """``--flows-dtype float32`` keeps the network's flows as Cellpose does; float16 is the
    same field rounded."""
    from zseg.cli import main
    from zseg.storage.arrays import open_array

    assert main(["synth", str(tmp_path), "--shape", "24,48,48", "--diameter", "16", "--seed", "3", "--no-flows"]) == 0
    uri = str(tmp_path / "image.ome.zarr")
    flows = {}
    for dtype in ("float16", "float32"):
        out = tmp_path / dtype
        assert main(["run", uri, str(out), "--model", "zseg-demo", "--diameter", "16", "--chunk-shape", "24,24,24",
                     "--device", "cpu", "--flows-dtype", dtype]) == 0
        store = open_array(str(out / "work" / "flows.zarr"))
        assert str(store.dtype) == dtype
        flows[dtype] = np.asarray(store[...])
    f32 = flows["float32"]
    assert np.abs(f32).max() > 1  # real flows, not zeros
    np.testing.assert_array_equal(flows["float16"], f32.astype(np.float16))
