"""The network engine against Cellpose 4.2.1.1 itself: resize, tiles, CPSAM, and whole 3D runs.

Each piece is compared with the Cellpose function it replaces; the flow tests compare
:func:`zseg.engine.views.predict_block` on blocks smaller than the volume with
``CellposeModel.eval(do_3D=True)`` on the whole volume, same network, same parameters.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.predict_support import load, random_cpsam
from zseg.engine.cellpose_ref import cellpose_eval
from zseg.engine.cpsam import cpsam_from_state_dict, cpsam_state_dict, describe_state_dict
from zseg.engine.resample import resize_axis, source_range
from zseg.engine.tiles import AxisTiles, plane_padding, taper
from zseg.engine.units import predict_block
from zseg.engine.normalize import normalize
from zseg.engine.views import Geometry

cv2 = pytest.importorskip("cv2")
transforms = pytest.importorskip("cellpose.transforms")

#: Float16 storage: one unit in the last place (2**-10 relative), plus float32 noise.
F16 = dict(rtol=2**-10, atol=1e-4)


# -- resize ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size_in, size_out", [((40, 40), (30, 30)), ((17, 23), (51, 9)), ((100, 90), (37, 41)),
                                               ((16, 16), (12, 12)), ((5, 7), (13, 3)), ((33, 33), (66, 66))])
def test_resize_matches_opencv_and_blocks_match_the_whole(size_in, size_out):
    rng = np.random.default_rng(0)
    (h, w), (hh, ww) = size_in, size_out
    img = rng.standard_normal((h, w)).astype(np.float32)
    ref = cv2.resize(img, (ww, hh), interpolation=cv2.INTER_LINEAR)
    x = resize_axis(torch.from_numpy(img), 1, w, ww, 0, ww, 0, horizontal=True)
    np.testing.assert_allclose(resize_axis(x, 0, h, hh, 0, hh, 0).numpy(), ref, rtol=0, atol=1e-6)
    for start, stop in [(0, 1), (hh // 3, hh // 2 + 1), (hh - 2, hh)]:  # a block of rows, global coordinates
        lo, hi = source_range(h, hh, start, stop)
        block = resize_axis(x[lo:hi], 0, h, hh, start, stop, lo)
        np.testing.assert_array_equal(block.numpy(), resize_axis(x, 0, h, hh, 0, hh, 0).numpy()[start:stop])


def test_resize_refuses_a_block_without_its_samples():
    with pytest.raises(ValueError, match="lacks samples"):
        resize_axis(torch.zeros(3, 4), 0, 10, 20, 0, 20, 2)


# -- Cellpose's tiling ----------------------------------------------------------------------------
@pytest.mark.parametrize("bsize", [64, 256])
def test_padding_and_tiles_match_cellpose(bsize):
    for n, overlap, augment in itertools.product(range(1, 3 * bsize, 5), (0.05, 0.1, 0.33, 0.5), (False, True)):
        before, after = plane_padding(n, bsize)
        py1, py2, _, _ = transforms.get_pad_yx(n, n, min_size=(bsize, bsize))
        assert (before, after) == (py1, py2)
        padded = np.zeros((1, n + before + after, bsize), np.float32)
        _, ysub, _, _, _ = transforms.make_tiles(padded, bsize=bsize, augment=augment, tile_overlap=overlap)
        nx = 2 if augment else 1  # the second axis (bsize wide) has one tile, two with augment
        starts = [int(s[0]) - before for s in ysub[::nx]]
        assert list(AxisTiles.of(n, bsize, tile_overlap=overlap, augment=augment).starts) == starts, (n, overlap)


@pytest.mark.parametrize("bsize", [64, 224, 256])
def test_taper_matches_cellpose(bsize):
    np.testing.assert_allclose(np.outer(taper(bsize), taper(bsize)), transforms._taper_mask(bsize, bsize), rtol=1e-12)


def test_tiles_covering_a_range():
    t = AxisTiles.of(500, 256, tile_overlap=0.1)
    assert t.covering(0, 1) == [0] and t.covering(499, 500) == [len(t) - 1]
    assert t.covering(10, 10) == []
    assert all(t.starts[k] < 300 and t.starts[k] + 256 > 200 for k in t.covering(200, 300))


# -- normalisation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32", "float64"])
def test_normalize_matches_cellpose_and_leaves_its_input(dtype):
    rng = np.random.default_rng(1)
    x = (rng.random((2, 4, 5, 6)) * 200).astype(dtype)
    before = x.copy()
    lowhigh = np.array([[3.5, 150.25], [10.0, 90.0]])
    ref = transforms.normalize_img(np.moveaxis(x, 0, -1).astype(np.float32), lowhigh=lowhigh)
    out = normalize(x, lowhigh)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(np.moveaxis(out, 0, -1), ref)
    np.testing.assert_array_equal(x, before)


def test_normalize_zeroes_a_channel_without_range():
    out = normalize(np.full((1, 2, 2, 2), 7, np.uint16), [[7.0, 7.0]])
    assert not out.any()


# -- the CPSAM network -------------------------------------------------------------------------------
@pytest.mark.slow
def test_cpsam_equals_cellpose_vit_on_the_same_weights():
    """A 1-block CPSAM of Cellpose's width: our module and Cellpose's ``vit.CPSAM`` (loaded strictly)."""
    from cellpose.vit import CPSAM

    sd = cpsam_state_dict(depth=1)
    ours = cpsam_from_state_dict(sd)
    with torch.device("meta"):
        ref = CPSAM()
    ref.encoder.blocks = ref.encoder.blocks[:1]
    ref = ref.to_empty(device="cpu")
    ref.load_state_dict(sd, strict=True)
    x = torch.randn(2, 2, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = ours(x), ref.eval()(x)[0]
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-4)


def test_state_dict_sizes_are_read_from_the_weights():
    sizes = describe_state_dict(cpsam_state_dict(dim=48, depth=2, heads=3, mlp_dim=96, neck=24, bsize=64))
    assert sizes | {"rel_pos": None} == {"dim": 48, "depth": 2, "heads": 3, "mlp_dim": 96, "neck": 24, "ps": 8,
                                         "tokens": 8, "nout": 3, "rel_pos": None, "in_chans": 3}
    net = cpsam_from_state_dict(cpsam_state_dict(dim=48, depth=2, heads=3, mlp_dim=96, neck=24, bsize=64))
    assert net.bsize == 64 and net(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_loading_is_strict():
    sd = random_cpsam()
    with pytest.raises(ValueError, match="does not match"):
        cpsam_from_state_dict({**sd, "encoder.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a CPSAM state dict"):
        cpsam_from_state_dict({k: v for k, v in sd.items() if k != "W2"})


# -- whole 3D runs against Cellpose ------------------------------------------------------------------
def _image(shape, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.gamma(2.0, 300.0, size=(channels, *shape))
    return img.astype(np.uint16)


def _lowhigh(img):
    return np.array([[np.percentile(c, 1), np.percentile(c, 99)] for c in img])


def _blocks(shape, core_shape):
    for start in itertools.product(*(range(0, s, c) for s, c in zip(shape, core_shape))):
        yield tuple(slice(a, min(a + c, s)) for a, c, s in zip(start, core_shape, shape))


CASES = {
    # id: (shape, channels, diameter, anisotropy, bsize, augment, core shape)
    "isotropic-multitile": ((12, 100, 80), 1, 30.0, 1.0, 64, False, (6, 50, 40)),
    "anisotropic-upscaled": ((10, 40, 60), 2, 24.0, 2.0, 64, False, (5, 20, 30)),
    "downscaled": ((12, 60, 60), 1, 45.0, 1.5, 64, False, (6, 30, 30)),
    "augment": ((8, 50, 30), 1, 30.0, 1.0, 64, True, (8, 25, 30)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_blocks_give_cellposes_whole_volume_flows(case):
    shape, nch, diameter, anisotropy, bsize, augment, core_shape = CASES[case]
    net = load(random_cpsam(bsize=bsize))
    img = _image(shape, nch)
    lowhigh = _lowhigh(img)
    _, ref = cellpose_eval(net, img, lowhigh, diameter=diameter, anisotropy=anisotropy, augment=augment)
    geo = Geometry.of(shape, diameter=diameter, anisotropy=anisotropy, bsize=bsize, augment=augment)
    out = np.full(ref.shape, np.nan, np.float32)
    for core in _blocks(shape, core_shape):
        assert max(s.stop - s.start for s in core) < max(shape)
        flows, _, _stats = predict_block(net, lambda box: img[(slice(None), *box)], core, geo, lowhigh)
        out[(slice(None), *core)] = flows
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * max(1.0, np.abs(ref).max()))
    np.testing.assert_allclose(out.astype(np.float16).astype(np.float32), ref, **F16)


@pytest.mark.slow
def test_tiles_of_cellposes_size():
    """bsize 256 (CPSAM's own) on 16x40x40, diameter 30: one tile per plane, blocks of half the volume."""
    shape = (16, 40, 40)
    net = load(random_cpsam(bsize=256))
    img = _image(shape, 1, seed=3)
    lowhigh = _lowhigh(img)
    _, ref = cellpose_eval(net, img, lowhigh, diameter=30.0)
    geo = Geometry.of(shape, bsize=256)
    out = np.zeros_like(ref)
    for core in _blocks(shape, (16, 20, 40)):
        out[(slice(None), *core)] = predict_block(net, lambda box: img[(slice(None), *box)], core, geo, lowhigh)[0]
    np.testing.assert_allclose(out.astype(np.float16).astype(np.float32), ref, **F16)


def test_views_sum_to_the_flows():
    shape = (6, 30, 20)
    net = load(random_cpsam())
    img = _image(shape)
    geo = Geometry.of(shape, bsize=64)
    core = (slice(0, 6), slice(10, 30), slice(0, 20))
    flows, views, _ = predict_block(net, lambda box: img[(slice(None), *box)], core, geo, _lowhigh(img),
                                    keep_views=True)
    yx, zy, zx = views
    np.testing.assert_allclose(flows[0], zy[0] + zx[0], atol=1e-5)
    np.testing.assert_allclose(flows[1], yx[0] + zx[1], atol=1e-5)
    np.testing.assert_allclose(flows[2], yx[1] + zy[1], atol=1e-5)
    np.testing.assert_allclose(flows[3], yx[2] + zy[2] + zx[2], atol=1e-5)


def test_geometry_refuses_a_vanishing_axis():
    with pytest.raises(ValueError, match="shrinks"):
        Geometry.of((2, 50, 50), diameter=300.0)
