"""The 2D network pass (a one-plane geometry, the YX view only) against Cellpose's own 2D eval,
and for any chunking of the image."""

from __future__ import annotations

import numpy as np
import pytest
from cellpose import metrics

from tests.predict_support import blobs, gradient_cpsam, load, random_cpsam
from zseg.engine import dynamics as D
from zseg.engine import units as U
from zseg.engine import views as V
from zseg.engine.cellpose_ref import cellpose_eval_2d
from zseg.storage.grid import ChunkGrid

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore:Sparse invariant checks")

SHAPE = (150, 170)


@pytest.fixture(scope="module")
def image():
    return blobs((12, *SHAPE), seed=3)[6:7]  # (C=1, Y, X): one plane of nucleus-like blobs


@pytest.fixture(scope="module")
def nets():
    return {"gradient": load(gradient_cpsam(bsize=64)).eval(), "random": load(random_cpsam(bsize=64)).eval()}


def _lowhigh(image):
    return np.array([[np.percentile(image, 1), np.percentile(image, 99)]])


def _predict(net, image, geometry, chunk):
    grid = ChunkGrid(SHAPE, chunk, (0, 0))
    out = np.zeros((3, *SHAPE), np.float32)
    tiles = 0
    for i in range(grid.nchunks):
        core = grid.core(i)
        f, stats = U.predict_plane(net, lambda box: image[(slice(None), *box)], core, geometry, _lowhigh(image))
        out[(slice(None), *core)] = f
        tiles += stats["tiles"]
    return out, tiles


@pytest.mark.parametrize("kind", ["gradient", "random"])
@pytest.mark.parametrize("diameter", [30.0, 20.0, 12.0, 45.0])
def test_plane_flows_are_cellposes_2d_eval_for_any_chunking(nets, image, kind, diameter):
    net = nets[kind]
    geometry = V.Geometry.plane(SHAPE, diameter=diameter, bsize=64)
    assert geometry.scaled[0] == 1  # the plane is never resized along z
    whole, tiles = _predict(net, image, geometry, SHAPE)
    _, theirs = cellpose_eval_2d(net, image, _lowhigh(image), diameter=diameter)
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(whole, theirs, rtol=0, atol=2e-5 * scale)
    assert tiles == len(geometry.tiles[1]) * len(geometry.tiles[2])  # Cellpose's own tile count
    for chunk in ((48, 56), (150, 33), (17, 170)):
        chunked, _ = _predict(net, image, geometry, chunk)
        np.testing.assert_allclose(chunked, whole, rtol=0, atol=2e-6 * scale)


def test_2d_masks_from_plane_flows_are_cellposes(nets, image):
    """The engine's 2D masks from zseg's flows against Cellpose's eval masks, flow QC off and on.

    The hand-set network's flows are gradients, not Cellpose's unit diffusion flows, so every
    mask has a flow error of 0.58-0.80: 0.67 removes about half of them."""
    net = nets["gradient"]
    for diameter in (30.0, 20.0):
        geometry = V.Geometry.plane(SHAPE, diameter=diameter, bsize=64)
        flows, _ = _predict(net, image, geometry, (64, 64))
        niter = int(200 / (30.0 / diameter))
        counts = []
        for threshold in (0.0, 0.67):
            ours = D.compute_masks(flows[:2], flows[2], niter=niter, min_size=15, flow_threshold=threshold)
            theirs, _ = cellpose_eval_2d(net, image, _lowhigh(image), diameter=diameter, compute_masks=True,
                                         flow_threshold=threshold, min_size=15)
            ap = metrics.average_precision([theirs.astype(np.int64)], [ours.astype(np.int64)])[0][0]
            assert ap[0] >= 0.99, (diameter, threshold, ap, theirs.max(), ours.max())
            counts.append(int(ours.max()))
        assert counts[0] > 100 and 0.2 * counts[0] < counts[1] < 0.8 * counts[0]  # the QC removed some


def test_a_plane_geometry_refuses_what_it_cannot_be():
    with pytest.raises(ValueError, match="shrinks the image"):
        V.Geometry.plane((3, 400), diameter=200.0)
    g = V.Geometry.plane(SHAPE, diameter=30.0, bsize=64)
    with pytest.raises(ValueError, match="plane geometry"):
        U.predict_plane(None, None, (slice(0, 1), slice(0, 2), slice(0, 3)), g, [[0, 1]])
