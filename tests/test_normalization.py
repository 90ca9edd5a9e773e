"""Normalisation options: --norm-per-plane (Cellpose's norm3D=False) and --invert, against
Cellpose's own normalize_img and eval, and identical for any chunking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cellpose import transforms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.predict_support import blobs, load, random_cpsam
from zseg.cli import main
from zseg.engine import percentiles as P
from zseg.engine.cellpose_ref import cellpose_eval
from zseg.engine.normalize import Normalization
from zseg.storage.arrays import open_array
from zseg.storage.omezarr import write_ome_zarr
from zseg.workspace import work as W
from zseg.workspace.context import RunContext

F16 = dict(rtol=2**-10, atol=1e-4)


def uneven(shape=(12, 40, 40), seed=0) -> np.ndarray:
    """Blobs whose planes are lit unevenly (gain 0.1 .. 1 along Z), with a black first plane."""
    img = blobs(shape, seed=seed).astype(np.float64)
    img *= np.linspace(0.1, 1.0, shape[0])[:, None, None]
    img[0] = 0
    return np.round(img).astype(np.uint16)


def _cellpose_per_plane(img: np.ndarray, invert: bool = False) -> np.ndarray:
    """Cellpose's normalize_img(norm3D=False) of a (C, Z, Y, X) image, back as (C, Z, Y, X)."""
    x = np.ascontiguousarray(np.moveaxis(img.astype(np.float32), 0, -1))
    return np.moveaxis(transforms.normalize_img(x, norm3D=False, invert=invert), -1, 0)


def _planes(img: np.ndarray, q=(1.0, 99.0)) -> Normalization:
    """What the percentiles reduce derives per plane, from one histogram per plane."""
    planes = np.zeros((img.shape[1], img.shape[0], 2))
    varies = np.zeros(img.shape[0], bool)
    for c in range(img.shape[0]):
        for z in range(img.shape[1]):
            h = P.histogram(img[c, z])
            planes[z, c] = [P.percentile_float32(h, q[0]), P.percentile_float32(h, q[1])]
            varies[c] |= h.keys.size > 1
    return planes, varies


# -- the engine -----------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), nch=st.integers(1, 2), invert=st.booleans(),
       low=st.floats(0, 20), high=st.floats(80, 100), dark=st.booleans())
def test_per_plane_normalisation_is_cellposes_bit_for_bit(seed, nch, invert, low, high, dark):
    """Random uint16 planes, some black, some with a tiny range (normalize99 zeroes them):
    every voxel equals Cellpose's normalize_img(norm3D=False, invert) exactly."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 3000, (nch, 6, 9, 11)).astype(np.uint16)
    img[:, 2] = 0
    if dark:
        img[:, 4] = rng.integers(7, 8, img[:, 4].shape)  # one level: a constant plane (see below)
        img[:, 4, 0, 0] = 8  # ... and one that differs by a single count: range 0 or 1 at most percentiles
    planes, varies = _planes(img, (low, high))
    x = np.ascontiguousarray(np.moveaxis(img.astype(np.float32), 0, -1))
    ref = np.moveaxis(transforms.normalize_img(x, norm3D=False, invert=invert, percentile=(low, high)), -1, 0)
    got = Normalization(np.zeros((nch, 2)), planes=planes, varies=varies, invert=invert).apply(img)
    np.testing.assert_array_equal(got, ref)
    # and any run of planes normalises as in the whole volume
    norm = Normalization(np.zeros((nch, 2)), planes=planes, varies=varies, invert=invert)
    np.testing.assert_array_equal(norm.apply(img[:, 3:5], (3, 0, 0)), ref[:, 3:5])


def test_a_constant_plane_is_zero_where_cellpose_leaves_it_raw():
    """The one documented difference (zseg.engine.normalize): Cellpose does not call normalize99
    on a constant plane of a channel that varies elsewhere, so it keeps its raw value."""
    img = uneven((12, 24, 24))[None]
    img[0, 2] = 700
    planes, varies = _planes(img)
    got = Normalization(np.zeros((1, 2)), planes=planes, varies=varies).apply(img)
    ref = _cellpose_per_plane(img)
    assert np.all(ref[0, 2] == 700) and np.all(got[0, 2] == 0)
    keep = [z for z in range(12) if z != 2]
    np.testing.assert_array_equal(got[:, keep], ref[:, keep])


# -- the pipeline ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lit(tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    img = uneven()
    write_ome_zarr(str(root / "image.ome.zarr"), img, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(6, 20, 20))
    torch.save(random_cpsam(), root / "net.pt")
    return {"img": img, "uri": str(root / "image.ome.zarr"), "net": str(root / "net.pt")}


def _flows(out) -> np.ndarray:
    return np.asarray(open_array(str(out / "work" / "flows.zarr"))[...]).astype(np.float32)


@pytest.mark.parametrize("chunk", ["12,40,40", "5,17,40", "3,13,11"])
def test_per_plane_percentiles_of_the_map_reduce_are_each_planes_own(lit, tmp_path, chunk):
    out = tmp_path / "out"
    assert main(["plan", lit["uri"], str(out), "--model", lit["net"], "--chunk-shape", chunk, "--norm-per-plane"]) == 0
    assert main(["percentiles", "--run", str(out)]) == 0
    assert main(["percentiles", "--run", str(out), "--reduce"]) == 0
    norm = W.normalization(RunContext.open(str(out)))
    assert norm.planes.shape == (12, 1, 2) and bool(norm.varies[0])
    np.testing.assert_array_equal(norm.apply(lit["img"][None]), _cellpose_per_plane(lit["img"][None]))
    r = json.loads((out / "work" / "percentiles.json").read_text())
    assert r["planes"]["low"][0] == [0.0] and r["planes"]["high"][-1][0] > 5 * r["planes"]["high"][1][0]


@pytest.mark.slow
@pytest.mark.parametrize("invert", [False, True])
def test_flows_with_norm_per_plane_are_cellposes_for_any_chunking(lit, tmp_path, invert):
    """The reference: each plane normalised by Cellpose's normalize_img(norm3D=False), then
    Cellpose's 3D eval(normalize=False) (its do_3D forces whole-volume normalisation)."""
    flows = []
    for chunk in ("12,40,40", "5,17,23"):
        out = tmp_path / chunk.replace(",", "_")
        args = ["run", lit["uri"], str(out), "--model", lit["net"], "--chunk-shape", chunk, "--diameter", "25",
                "--no-use-bfloat16", "--norm-per-plane", "--flows-dtype", "float32", "--no-skip-empty"]
        assert main(args + (["--invert"] if invert else [])) == 0
        flows.append(_flows(out))
    np.testing.assert_array_equal(flows[0], flows[1])
    pre = _cellpose_per_plane(lit["img"][None], invert=invert)
    _, ref = cellpose_eval(load(random_cpsam()), pre, None, diameter=25.0)
    np.testing.assert_allclose(flows[0], ref, rtol=1e-4, atol=2e-5)


@pytest.mark.slow
def test_flows_with_invert_are_cellposes_and_skip_bright_units(tmp_path):
    """--invert with global percentiles: Cellpose's eval(normalize={lowhigh, invert}); units
    that are all at or above the high percentile (white after inversion) are the empty ones."""
    img = 20000 - blobs((12, 40, 240), seed=2).astype(np.int32)
    img[:, :, 120:] = 30000  # a bright, featureless half: empty once inverted
    img = np.clip(img, 0, 65535).astype(np.uint16)
    write_ome_zarr(str(tmp_path / "dark.ome.zarr"), img, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(6, 20, 40))
    torch.save(random_cpsam(), tmp_path / "net.pt")
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "dark.ome.zarr"), str(out), "--model", str(tmp_path / "net.pt"),
                 "--invert", "--no-use-bfloat16", "--predict-memory", "0.0001"]) == 0
    r = json.loads((out / "work" / "percentiles.json").read_text())
    lowhigh = np.stack([r["low"], r["high"]], axis=1)
    assert lowhigh[0, 1] == 30000
    markers = [json.loads(p.read_text()) for p in sorted((out / "work" / "predict").glob("c*.json"))]
    assert any(m["skipped"] == "empty" for m in markers) and any(m["skipped"] is None for m in markers)
    _, ref = cellpose_eval(load(random_cpsam()), img[None], lowhigh, diameter=30.0, invert=True)
    # left of the bright half no skipped unit's tiles reach: the flows are Cellpose's
    np.testing.assert_allclose(_flows(out)[..., :110], ref[..., :110], **F16)


# -- --tile-norm-blocksize (Cellpose's tile_norm_blocksize, norm3D=True as its 3D run forces) -----------
def _cellpose_tiles(img: np.ndarray, blocksize: int, invert: bool = False) -> np.ndarray:
    x = np.ascontiguousarray(np.moveaxis(img.astype(np.float32), 0, -1))
    return np.moveaxis(transforms.normalize_img(x, tile_norm_blocksize=blocksize, norm3D=True, invert=invert), -1, 0)


def shaded(shape=(10, 70, 90), seed=3) -> np.ndarray:
    """Blobs under a shading ramp along X, with a black corner (its tiles are filled from neighbours)."""
    img = blobs(shape, seed=seed).astype(np.float64) * np.linspace(0.15, 1.0, shape[2])[None, None]
    img[:, :25, :30] = 0
    return np.round(img).astype(np.uint16)


@pytest.mark.parametrize("chunk", ["10,70,90", "4,23,31", "3,40,17"])
def test_tile_normalisation_of_the_map_reduce_is_cellposes_for_any_chunking(tmp_path, chunk):
    """The tile grid from per-chunk histograms of tile parts equals normalize99_tile's; every voxel
    equals Cellpose's normalize_img(tile_norm_blocksize=32) to float32 rounding of the resize, and
    a block's voxels equal the whole volume's exactly."""
    img = shaded()
    write_ome_zarr(str(tmp_path / "s.ome.zarr"), img, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(5, 35, 45))
    torch.save(random_cpsam(), tmp_path / "net.pt")
    out = tmp_path / "out"
    assert main(["plan", str(tmp_path / "s.ome.zarr"), str(out), "--model", str(tmp_path / "net.pt"),
                 "--chunk-shape", chunk, "--tile-norm-blocksize", "32"]) == 0
    assert main(["percentiles", "--run", str(out)]) == 0
    assert main(["percentiles", "--run", str(out), "--reduce"]) == 0
    norm = W.normalization(RunContext.open(str(out)))
    assert norm.tiles.shape == (3, 4, 1, 2)  # ceil(1.2 * 70 / 32) x ceil(1.2 * 90 / 32) tiles
    whole = norm.apply(img[None])
    ref = _cellpose_tiles(img[None], 32)
    np.testing.assert_allclose(whole, ref, rtol=2e-6, atol=2e-6)
    part = norm.apply(img[None, 2:7, 11:50, 29:80], (2, 11, 29))
    np.testing.assert_array_equal(part, whole[:, 2:7, 11:50, 29:80])


@pytest.mark.slow
def test_flows_with_tile_normalisation_are_cellposes_and_the_same_for_any_chunking(tmp_path):
    img = shaded()
    write_ome_zarr(str(tmp_path / "s.ome.zarr"), img, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(5, 35, 45))
    torch.save(random_cpsam(), tmp_path / "net.pt")
    flows = []
    for chunk in ("10,70,90", "4,23,31"):
        out = tmp_path / chunk.replace(",", "_")
        assert main(["run", str(tmp_path / "s.ome.zarr"), str(out), "--model", str(tmp_path / "net.pt"),
                     "--chunk-shape", chunk, "--tile-norm-blocksize", "32", "--invert", "--diameter", "25",
                     "--no-use-bfloat16", "--flows-dtype", "float32", "--no-skip-empty"]) == 0
        flows.append(_flows(out))
    np.testing.assert_array_equal(flows[0], flows[1])
    _, ref = cellpose_eval(load(random_cpsam()), _cellpose_tiles(img[None], 32, invert=True), None, diameter=25.0)
    np.testing.assert_allclose(flows[0], ref, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("args, words", [
    (["--tile-norm-blocksize", "-5"], "tile_norm_blocksize = -5"),
    (["--tile-norm-blocksize", "32", "--norm-per-plane"], "two local normalisations"),
])
def test_bad_normalisation_options_are_refused(lit, tmp_path, refused, args, words):
    out = tmp_path / "out"
    refused(["run", lit["uri"], str(out), "--model", lit["net"], *args], words)
    assert not out.exists()
