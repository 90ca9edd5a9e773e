"""The Cellpose 3 network family against Cellpose 3.1.1.3 itself.

``tests/fixtures/cp3`` holds two small CPnets (nbase [2, 4, 8, 16]) saved by Cellpose 3.1.1.3:
``net.pt`` with random weights (every weight matters: the flow test) and ``gradient_net.pt``
with weights set by hand so that its flows make cells of bright blobs (the mask test), a 2D
image and a 3D volume, and Cellpose 3.1.1.3's flows (both networks) and masks (gradient net)
for them; ``scripts/make_cp3_fixture.py`` made it in a separate environment (zseg does not
depend on Cellpose 3, which cannot be installed beside Cellpose 4).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from zseg.engine import dynamics as D
from zseg.engine.cp3 import CP3Net, cp3_from_state_dict, describe_cp3_state_dict, is_cp3_state_dict
from zseg.engine.units import predict_block, predict_plane
from zseg.engine.views import Geometry
from zseg.storage.grid import ChunkGrid

FIXTURE = Path(__file__).parent / "fixtures" / "cp3"
LOWHIGH = [[0.0, 1.0]]  # the fixture's input is already in 0..1 (Cellpose ran with lowhigh [0, 1])
TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(scope="module")
def fx():
    data = dict(np.load(FIXTURE / "cp3.npz"))
    data["meta"] = json.loads((FIXTURE / "cp3.json").read_text())
    data["sd"] = torch.load(FIXTURE / "net.pt", map_location="cpu", weights_only=True)
    data["gsd"] = torch.load(FIXTURE / "gradient_net.pt", map_location="cpu", weights_only=True)
    return data


def ap50(ref: np.ndarray, ours: np.ndarray) -> float:
    """Cellpose's average precision at IoU 0.5: matches / (matches + misses + extras)."""
    nr, no = int(ref.max()), int(ours.max())
    if nr == 0 and no == 0:
        return 1.0
    joint = np.bincount(ref.ravel().astype(np.int64) * (no + 1) + ours.ravel(), minlength=(nr + 1) * (no + 1))
    joint = joint.reshape(nr + 1, no + 1)[1:, 1:].astype(np.float64)
    sr = np.bincount(ref.ravel(), minlength=nr + 1)[1:].astype(np.float64)
    so = np.bincount(ours.ravel(), minlength=no + 1)[1:].astype(np.float64)
    iou = joint / (sr[:, None] + so[None, :] - joint)
    tp = int((iou > 0.5).sum())  # IoU > 0.5 pairs are one-to-one
    return tp / (nr + no - tp)


# -- the module ------------------------------------------------------------------------------
def test_loads_cellpose3_state_dict_exactly(fx):
    sd = fx["sd"]
    assert is_cp3_state_dict(sd) and "W2" not in sd
    sizes = describe_cp3_state_dict(sd)
    assert sizes == {"family": "cp3", "nbase": [2, 4, 8, 16], "nout": 3, "diam_mean": 30.0, "diam_labels": 27.5}
    net = cp3_from_state_dict(sd)
    mine = net.state_dict()
    assert set(mine) == set(sd)
    for k, v in sd.items():
        assert torch.equal(mine[k], v), k


def test_builtin_size_has_cyto3s_parameter_count():
    net = CP3Net([2, 32, 64, 128, 256])
    n = sum(p.numel() for p in net.parameters())
    assert n == 6_600_845  # cyto3, counted from Cellpose 3 (reference/cellpose_internals.md §1)
    assert {"downsample.down.res_down_0.proj.1.weight", "output.2.weight", "diam_mean", "diam_labels",
            "upsample.up.res_up_3.conv.conv_1.full.weight"} <= set(net.state_dict())
    sd = net.state_dict()
    assert describe_cp3_state_dict(sd)["nbase"] == [2, 32, 64, 128, 256]


def test_loading_is_strict(fx):
    sd = dict(fx["sd"])
    extra = dict(sd, **{"upsample.up.res_up_0.conv.conv_1.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not fit|lacks|unexpected|misshaped"):
        cp3_from_state_dict(extra)
    missing = {k: v for k, v in sd.items() if not k.endswith("conv_3.full.bias")}
    with pytest.raises(ValueError, match="does not fit|lacks|unexpected|misshaped"):
        cp3_from_state_dict(missing)
    shaped = dict(sd, **{"output.2.bias": torch.zeros(4)})
    with pytest.raises(ValueError, match="does not fit|lacks|unexpected|misshaped"):
        cp3_from_state_dict(shaped)
    with pytest.raises(ValueError, match="diam_mean"):
        cp3_from_state_dict({k: v for k, v in sd.items() if k != "diam_mean"})
    with pytest.raises(ValueError, match="not a Cellpose 3 network"):
        describe_cp3_state_dict({"W2": torch.zeros(1)})
    assert cp3_from_state_dict({"module." + k: v for k, v in sd.items()}).nbase == [2, 4, 8, 16]


# -- fidelity to Cellpose 3.1.1.3 --------------------------------------------------------------
@pytest.mark.parametrize("which", ["", "g"])
def test_2d_flows_and_masks_match_cellpose3(fx, which):
    net = cp3_from_state_dict(fx[which + "sd"])
    img = fx["img2"]
    ly, lx = img.shape  # 48 x 64: Cellpose 3 pads 8 on each side (multiple of 16) -> one 64 x 80 tile
    x = torch.zeros(1, 1, ly + 16, lx + 16)
    x[0, 0, 8:-8, 8:-8] = torch.from_numpy(img)
    with torch.inference_mode():
        y = net(x)[0][0, :, 8:-8, 8:-8].numpy()
    np.testing.assert_allclose(y[:2], fx[which + "dP2"], **TOL)
    np.testing.assert_allclose(y[2], fx[which + "cellprob2"], **TOL)
    if which:
        masks = D.compute_masks(y[:2], y[2], niter=200, min_size=-1)
        assert fx["gmasks2"].max() > 5
        assert ap50(fx["gmasks2"], masks) >= 0.99


@pytest.mark.parametrize("which", ["", "g"])
@pytest.mark.parametrize("core_shape", [None, (20, 24), (48, 9)])
def test_2d_flows_of_the_plane_pass_match_cellpose3_in_chunks(fx, which, core_shape):
    """Cellpose 3's 2D eval through zseg's 2D network pass (Geometry.plane, predict_plane), any chunking."""
    net = cp3_from_state_dict(fx[which + "sd"])
    img = fx["img2"]
    geo = Geometry.plane(img.shape, diameter=30.0, bsize=CP3Net.bsize, diam_mean=float(net.diam_mean),
                         pad_to_tile=False)
    flows = np.zeros((3, *img.shape), np.float32)
    grid = ChunkGrid(img.shape, core_shape or img.shape, (0, 0))
    for i in range(grid.nchunks):
        core = grid.core(i)
        flows[(slice(None), *core)] = predict_plane(net, lambda box: img[None][(slice(None), *box)], core, geo,
                                                    LOWHIGH)[0]
    np.testing.assert_allclose(flows[:2], fx[which + "dP2"], **TOL)
    np.testing.assert_allclose(flows[2], fx[which + "cellprob2"], **TOL)
    if which:  # the fixture's masks were made with flow_threshold 0
        masks = D.compute_masks(flows[:2], flows[2], niter=200, min_size=-1)
        assert ap50(fx["gmasks2"], masks) >= 0.99


def _geometry(net, shape, params):
    return Geometry.of(shape, diameter=params["diameter"], anisotropy=params["anisotropy"], bsize=CP3Net.bsize,
                       diam_mean=float(net.diam_mean), pad_to_tile=False)


def _predict(net, img, params, core_shape=None, *, geo=None, net_ortho=None):
    """zseg's flows of ``img`` block by block (cores of ``core_shape``; None: one block)."""
    shape = img.shape[1:]
    geo = geo or _geometry(net, shape, params)
    flows = np.zeros((4, *shape), np.float32)
    steps = core_shape or shape
    for z in range(0, shape[0], steps[0]):
        for yy in range(0, shape[1], steps[1]):
            for xx in range(0, shape[2], steps[2]):
                core = tuple(slice(a, min(a + s, n)) for a, s, n in zip((z, yy, xx), steps, shape))
                flows[(slice(None), *core)] = predict_block(
                    net, lambda box: img[(slice(None), *box)], core, geo, LOWHIGH, net_ortho=net_ortho)[0]
    return flows


@pytest.mark.parametrize("core_shape", [None, (6, 16, 20)])
def test_3d_flows_match_cellpose3_in_blocks_of_any_shape(fx, core_shape):
    """diameter 24 (rescale 30/24), anisotropy 1.5; short planes give Cellpose 3's short tiles."""
    net = cp3_from_state_dict(fx["sd"])
    flows = _predict(net, fx["img3"][None], fx["meta"]["params3"], core_shape)
    np.testing.assert_allclose(flows[:3], fx["dP3"], **TOL)
    np.testing.assert_allclose(flows[3], fx["cellprob3"], **TOL)


def test_3d_masks_match_cellpose3(fx):
    net = cp3_from_state_dict(fx["gsd"])
    p = fx["meta"]["params3"]
    vol = fx["vol8"].astype(np.float32) / np.float32(255)
    flows = _predict(net, vol[None], p)
    masks = D.compute_masks(flows[:3], flows[3], niter=p["niter"], min_size=-1)
    assert fx["gmasks3"].max() > 100
    assert ap50(fx["gmasks3"], masks) >= 0.99


# -- the loader: the family from the weights, clear messages for bad files --------------------------
def _load_error(path) -> str:
    from zseg.errors import UserError
    from zseg.storage import models

    with pytest.raises(UserError) as e:
        models.inspect_model(str(path), download=False)
    msgs = e.value.problems
    assert len(msgs) == 1 and "\n" not in msgs[0] and str(path) in msgs[0], msgs
    with pytest.raises(UserError):
        models.load_network(path, torch.device("cpu"))
    return msgs[0]


def test_loader_tells_cellpose3_from_the_weights():
    from zseg.storage import models

    info = models.inspect_model(str(FIXTURE / "gradient_net.pt"), download=False)
    assert (info["family"], info["bsize"], info["diam_mean"]) == ("cp3", 224, 30.0)
    assert info["network"]["nbase"] == [2, 4, 8, 16]
    net = models.load_network(FIXTURE / "net.pt", torch.device("cpu"), use_bfloat16=True)
    assert isinstance(net, CP3Net) and net.dtype == torch.float32  # Cellpose 3 runs in float32
    assert net.family == "cp3" and net.bsize == 224 and float(net.diam_labels) == 27.5


def test_loader_tells_cpsam_from_the_weights(tmp_path):
    from tests.predict_support import random_cpsam
    from zseg.storage import models

    path = tmp_path / "cpsam.pt"
    torch.save(random_cpsam(), path)
    info = models.inspect_model(str(path), download=False)
    assert (info["family"], info["bsize"], info["diam_mean"]) == ("cpsam", 64, 30.0)
    assert models.load_network(path, torch.device("cpu")).family == "cpsam"


def test_loader_refuses_bad_files_with_one_line(fx, tmp_path):
    raw = (FIXTURE / "net.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(raw[: len(raw) // 2])
    assert "not a readable Cellpose weights file" in _load_error(truncated)

    text = tmp_path / "notes.pt"
    text.write_text("not weights\n")
    assert "not a readable Cellpose weights file" in _load_error(text)

    listing = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listing)
    assert "does not hold a state dict of tensors" in _load_error(listing)

    other = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(10)}, other)
    msg = _load_error(other)
    assert "another architecture" in msg and "neither Cellpose 4 nor Cellpose 3" in msg

    broken = tmp_path / "cp3_missing.pt"
    torch.save({k: v for k, v in fx["sd"].items() if "res_up_1" not in k}, broken)
    msg = _load_error(broken)
    assert "Cellpose 3" in msg

    nodiam = tmp_path / "cp3_nodiam.pt"
    torch.save({k: v for k, v in fx["sd"].items() if k != "diam_mean"}, nodiam)
    assert "diam_mean" in _load_error(nodiam)


def test_zseg_run_with_a_cellpose3_model(tmp_path):
    """The whole pipeline with the Cellpose 3 fixture network: chunks give Cellpose 3's
    whole-volume flows (float16 storage), and its masks."""
    from zseg.cli import main
    from zseg.storage.arrays import open_array
    from zseg.storage.omezarr import write_ome_zarr

    vol8 = np.load(FIXTURE / "cp3.npz")["vol8"]
    uri = str(tmp_path / "image.ome.zarr")
    write_ome_zarr(uri, vol8, axes="zyx", voxel_size=(1.5, 1.0, 1.0), chunks=(12, 40, 40))
    out = tmp_path / "out"
    rc = main(["run", uri, str(out), "--model", str(FIXTURE / "gradient_net.pt"), "--diameter", "24",
               "--chunk-shape", "12,40,40", "--min-size", "-1", "--device", "cpu", "--niter", "200",
               "--percentiles", "0,100"])  # vol8 spans 0..255: min/max normalisation is Cellpose's vol8 / 255
    assert rc == 0
    labels = np.asarray(open_array(str(out / "labels.zarr" / "0"))[...])
    ref = np.load(FIXTURE / "cp3.npz")["gmasks3"]
    assert ap50(ref, labels) >= 0.99


# -- an ortho network (Cellpose 3's pretrained_model_ortho) ------------------------------------------
@pytest.mark.parametrize("core_shape", [None, (6, 16, 20)])
def test_3d_flows_with_an_ortho_network_match_cellpose3(fx, core_shape):
    """net.pt on the YX planes, gradient_net.pt on the ZY and ZX planes, as Cellpose 3 runs them."""
    net, ortho = cp3_from_state_dict(fx["sd"]), cp3_from_state_dict(fx["gsd"])
    img = fx["img3"][None]
    p = fx["meta"]["params3"]
    geo = _geometry(net, img.shape[1:], p).with_ortho(CP3Net.bsize, pad_to_tile=False)
    assert geo.ortho_tiles is None  # same family: same tiles
    flows = _predict(net, img, p, core_shape, geo=geo, net_ortho=ortho)
    np.testing.assert_allclose(flows[:3], fx["odP3"], **TOL)
    np.testing.assert_allclose(flows[3], fx["ocellprob3"], **TOL)


def test_an_ortho_network_of_the_other_family_tiles_its_own_views(fx):
    """A CPSAM network as ortho of a Cellpose 3 one (which Cellpose cannot do): the ZY and ZX
    views run on the CPSAM network's tiles, the YX view is the Cellpose 3 network's alone, and
    blocks still give the whole volume's flows."""
    from tests.predict_support import load, random_cpsam

    net, ortho = cp3_from_state_dict(fx["sd"]), load(random_cpsam(bsize=64))
    img = fx["img3"][None]
    shape = img.shape[1:]
    geo = Geometry.of(shape, diameter=24.0, anisotropy=1.5, bsize=CP3Net.bsize, pad_to_tile=False).with_ortho(64)
    assert geo.ortho_tiles is not None and geo.view_tiles("ZY")[0].bsize == 64 and geo.view_tiles("YX")[1].bsize < 224
    read = lambda box: img[(slice(None), *box)]  # noqa: E731
    whole, views, _ = predict_block(net, read, tuple(slice(0, n) for n in shape), geo, LOWHIGH, net_ortho=ortho,
                                    keep_views=True)
    alone = predict_block(net, read, tuple(slice(0, n) for n in shape), geo, LOWHIGH, keep_views=True)[1]
    np.testing.assert_array_equal(views[0], alone[0])
    assert not np.allclose(views[1], alone[1])
    half = predict_block(net, read, (slice(0, 6), slice(0, 32), slice(0, 32)), geo, LOWHIGH, net_ortho=ortho)[0]
    np.testing.assert_allclose(half, whole[:, :6], rtol=1e-4, atol=1e-5)


def test_zseg_run_with_a_cellpose4_ortho_network_for_a_cellpose3_model(fx, tmp_path):
    """--model-ortho takes either family: a CPSAM file as ortho of a Cellpose 3 model runs, its
    YX view is the Cellpose 3 network's, and a bad ortho file is one clear line before anything
    is written."""
    from tests.predict_support import random_cpsam
    from zseg.cli import main
    from zseg.storage.arrays import open_array
    from zseg.storage.omezarr import write_ome_zarr

    img = (fx["img3"] * 255).round().astype(np.uint8)
    uri = str(tmp_path / "image.ome.zarr")
    write_ome_zarr(uri, img, axes="zyx", voxel_size=(1.5, 1.0, 1.0), chunks=(6, 32, 32))
    ortho = tmp_path / "cpsam.pt"
    torch.save(random_cpsam(bsize=64), ortho)
    out = tmp_path / "out"
    common = ["--model", str(FIXTURE / "net.pt"), "--diameter", "24", "--chunk-shape", "6,32,32", "--device", "cpu"]
    rc = main(["run", uri, str(out), *common, "--model-ortho", str(ortho), "--keep-views"])
    assert rc == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["params"]["model_ortho"] == str(ortho)
    assert manifest["network"]["model"]["family"] == "cp3" and manifest["network"]["model_ortho"]["family"] == "cpsam"
    views = np.asarray(open_array(str(out / "work" / "views.zarr"))[...]).astype(np.float32)
    assert views.shape == (3, 3, *img.shape) and np.abs(views[1:]).max() > 0

    bad = tmp_path / "bad.pt"
    bad.write_text("nope")
    out2 = tmp_path / "out2"
    assert main(["run", uri, str(out2), *common, "--model-ortho", str(bad)]) == 2
    assert not out2.exists()


def test_a_cellpose3_model_refuses_more_channels_than_it_takes(fx, tmp_path, capsys):
    from zseg.cli import main
    from zseg.storage.omezarr import write_ome_zarr

    img = (np.stack([fx["img3"]] * 3) * 255).round().astype(np.uint8)
    uri = str(tmp_path / "image.ome.zarr")
    write_ome_zarr(uri, img, axes="czyx", chunks=(1, 6, 32, 32))
    out = tmp_path / "out"
    args = ["run", uri, str(out), "--model", str(FIXTURE / "net.pt"), "--chunk-shape", "6,32,32", "--device", "cpu",
            "--channels", "0,1,2"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes 2 channels" in err[0] and "--channels" in err[0], err
    assert not out.exists()


def test_cellpose3_builtin_names_are_found_under_cellpose3s_file_names(tmp_path, monkeypatch):
    import shutil

    from zseg.errors import UserError
    from zseg.storage import models

    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    with pytest.raises(UserError) as e:
        models.resolve_model("nuclei")
    assert "nucleitorch_0" in e.value.problems[0] and "does not download" in e.value.problems[0]
    shutil.copy(FIXTURE / "net.pt", tmp_path / "nucleitorch_0")
    assert models.inspect_model("nuclei", download=False)["family"] == "cp3"


@pytest.mark.parametrize("core_shape", [None, pytest.param((4, 10, 20), marks=pytest.mark.slow)])
def test_3d_flows_with_augment_match_cellpose3(fx, core_shape):
    """Cellpose 3's test-time augmentation, where its short planes are extended to one tile."""
    net = cp3_from_state_dict(fx["sd"])
    img = fx["img3"][None, :8, :20, :20]
    p = fx["meta"]["params3"]
    shape = img.shape[1:]
    geo = Geometry.of(shape, diameter=p["diameter"], anisotropy=p["anisotropy"], bsize=CP3Net.bsize,
                      diam_mean=float(net.diam_mean), pad_to_tile=False, augment=True)
    flows = np.zeros((4, *shape), np.float32)
    steps = core_shape or shape
    for z in range(0, shape[0], steps[0]):
        for yy in range(0, shape[1], steps[1]):
            core = (slice(z, min(z + steps[0], shape[0])), slice(yy, min(yy + steps[1], shape[1])), slice(0, shape[2]))
            flows[(slice(None), *core)] = predict_block(net, lambda box: img[(slice(None), *box)], core, geo, LOWHIGH)[0]
    np.testing.assert_allclose(flows[:3], fx["adP3"], **TOL)
    np.testing.assert_allclose(flows[3], fx["acellprob3"], **TOL)


# -- --bsize (Cellpose's bsize) -------------------------------------------------------------------------
@pytest.mark.parametrize("core_shape", [None, (6, 20, 40)])
def test_3d_flows_with_another_bsize_match_cellpose3(fx, core_shape, tmp_path):
    """--bsize 64 on a Cellpose 3 network: the geometry the predict phase plans (several tiles per
    axis) gives Cellpose 3.1.1.3's eval(bsize=64), in blocks of any shape."""
    from zseg.params import RunParams
    from zseg.phases import predict as PR

    ref = np.load(FIXTURE / "cp3_bsize.npz")
    img = (fx["vol8"][:16, :56, :72].astype(np.float32) / np.float32(255))[None]
    p = fx["meta"]["params3"]
    params = RunParams(input="x", output=str(tmp_path), model=str(FIXTURE / "net.pt"), diameter=p["diameter"],
                       bsize=int(ref["bsize"]))
    sizes = PR.network_sizes(params, None)
    assert sizes["model"]["bsize"] == 64
    geo = PR.make_geometry(params, img.shape[1:], p["anisotropy"], False, sizes)
    assert all(len(t.starts) >= 2 for t in geo.tiles[1:])  # the tile size matters here
    flows = _predict(cp3_from_state_dict(fx["sd"]), img, p, core_shape, geo=geo)
    np.testing.assert_allclose(flows[:3], ref["dP3"], **TOL)
    np.testing.assert_allclose(flows[3], ref["cellprob3"], **TOL)


@pytest.mark.parametrize("model, bsize, words", [
    ("cp3", "100", "multiple of 16 from 64 to 1024"),
    ("cp3", "2048", "multiple of 16 from 64 to 1024"),
    ("cpsam", "128", "runs tiles of its own size only (64)"),
])
def test_a_bsize_the_network_cannot_run_is_refused(fx, tmp_path, refused, model, bsize, words):
    from tests.predict_support import random_cpsam
    from zseg.storage.omezarr import write_ome_zarr

    uri = str(tmp_path / "image.ome.zarr")
    write_ome_zarr(uri, fx["vol8"][:8, :32, :32], axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(8, 32, 32))
    net = str(FIXTURE / "net.pt")
    if model == "cpsam":
        net = str(tmp_path / "cpsam.pt")
        torch.save(random_cpsam(), net)
    out = tmp_path / "out"
    err = refused(["run", uri, str(out), "--model", net, "--bsize", bsize])
    assert len(err) == 1 and "bsize" in err[0] and words in err[0], err
    assert not out.exists()
