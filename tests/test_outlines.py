"""zseg.engine.outlines: pixel-edge polygons that are exactly the cells' pixels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage as ndi

from zseg.engine.outlines import cell_geometry, mask_rings, ring_area


def _rasterise(geometry, shape, origin=(0, 0)) -> np.ndarray:
    """Pixel centres inside the geometry (even-odd over all its rings), for checking."""
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    px, py = xx + origin[1] + 0.5, yy + origin[0] + 0.5
    inside = np.zeros(shape, bool)
    for poly in polys:
        for ring in poly:
            r = np.asarray(ring, float)
            for (x1, y1), (x2, y2) in zip(r[:-1], r[1:]):
                if y1 == y2:
                    continue
                cross = ((y1 > py) != (y2 > py)) & (px < x1 + (py - y1) * (x2 - x1) / (y2 - y1))
                inside ^= cross
    return inside


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12)),
       st.integers(0, 50), st.integers(0, 50))
def test_the_polygon_is_exactly_the_pixels(mask, oy, ox):
    geometry = cell_geometry(mask, origin=(oy, ox))
    if not mask.any():
        assert geometry is None
        return
    np.testing.assert_array_equal(_rasterise(geometry, mask.shape, (oy, ox)), mask)
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    area = sum(ring_area(r) for poly in polys for r in poly)
    assert area == mask.sum()  # exterior rings positive, holes negative
    # one exterior ring per 4-connected piece, one hole ring per 4-connected hole...
    _, pieces = ndi.label(mask)
    assert len(polys) == pieces == (1 if geometry["type"] == "Polygon" else len(polys))
    for poly in polys:
        assert ring_area(poly[0]) > 0 and all(ring_area(h) < 0 for h in poly[1:])
        for ring in poly:
            assert ring[0] == ring[-1] and len(ring) >= 5
            for a, b in zip(ring[:-1], ring[1:]):  # axis-parallel edges between integer vertices
                assert (a[0] == b[0]) != (a[1] == b[1])


def test_a_square_and_diagonal_neighbours():
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    (ring,) = mask_rings(m)
    assert len(ring) == 5 and ring[0] == ring[-1] and set(ring) == {(1, 1), (1, 3), (3, 3), (3, 1)}
    assert ring_area(ring) == 4
    g = cell_geometry(m, origin=(10, 20))  # origin (y, x) moves the polygon, (x, y) order
    assert g["type"] == "Polygon" and {tuple(v) for v in g["coordinates"][0]} == {(21, 11), (21, 13), (23, 13), (23, 11)}
    d = np.eye(2, dtype=bool)  # two pixels touching at a corner: two pieces
    g = cell_geometry(d)
    assert g["type"] == "MultiPolygon" and len(g["coordinates"]) == 2
    ring = np.ones((3, 3), bool)
    ring[1, 1] = False  # a hole
    g = cell_geometry(ring)
    assert g["type"] == "Polygon" and len(g["coordinates"]) == 2


def test_bad_input():
    with pytest.raises(ValueError, match="2D"):
        mask_rings(np.zeros((2, 2, 2), bool))


def test_a_cell_feature_in_qupaths_layout():
    import json

    from zseg.engine.outlines import cell_feature

    cell = np.zeros((6, 6), bool)
    cell[1:5, 1:5] = True
    nucleus = np.zeros_like(cell)
    nucleus[2:4, 2:4] = True
    f = cell_feature(7, cell, nucleus, origin=(100, 200), measurements={"CD3_cell_mean": 12.5})
    assert f["type"] == "Feature" and f["properties"]["objectType"] == "cell"
    assert f["properties"]["measurements"] == {"CD3_cell_mean": 12.5}
    assert ring_area(f["geometry"]["coordinates"][0]) == 16 and ring_area(f["nucleusGeometry"]["coordinates"][0]) == 4
    assert min(v[0] for v in f["geometry"]["coordinates"][0]) == 201  # x from the origin's x
    json.dumps(f)  # plain JSON
    assert "nucleusGeometry" not in cell_feature(7, cell, np.zeros_like(cell))
