"""Predict units (zseg.engine.units): each tile of Cellpose's whole-volume run belongs to exactly one
unit, units tile the scaled volume, and the flows are the same bytes whatever the units."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.predict_support import load, random_cpsam
from zseg.engine import units as UN
from zseg.engine.views import PLANE_VIEWS, VIEW_AXES, VIEWS, Geometry

geometries = st.builds(
    dict,
    shape=st.tuples(st.integers(1, 90), st.integers(1, 300), st.integers(1, 300)),
    diameter=st.sampled_from([15.0, 24.0, 30.0, 45.0]),
    anisotropy=st.sampled_from([1.0, 2.0, 3.5]),
    bsize=st.sampled_from([32, 64, 256]),
    overlap=st.sampled_from([0.05, 0.1, 0.33, 0.5]),
    augment=st.booleans(),
    ortho=st.sampled_from([None, 48]),
    tiles=st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
)


def _geometry(g):
    try:
        geo = Geometry.of(g["shape"], diameter=g["diameter"], anisotropy=g["anisotropy"], bsize=g["bsize"],
                          tile_overlap=g["overlap"], augment=g["augment"])
    except ValueError:
        return None
    if g["ortho"]:
        geo = geo.with_ortho(g["ortho"], tile_overlap=g["overlap"])
    return geo


@settings(max_examples=150, deadline=None)
@given(geometries)
def test_every_tile_belongs_to_exactly_one_unit_and_units_tile_the_volume(g):
    geo = _geometry(g)
    if geo is None:
        return
    units = UN.Units.of(geo, VIEWS, g["tiles"])
    seen = set()
    cover = np.zeros(geo.scaled, np.int32) if np.prod(geo.scaled) < 3e6 else None
    for u in range(len(units)):
        box, reach = units.box(u), units.reach(u)
        if cover is not None:
            cover[box] += 1
        assert all(r.start <= b.start and b.stop <= r.stop for b, r in zip(box, reach))
        for v, planes, kbs, kcs in units.work(u):
            a, b, c = VIEW_AXES[v]
            assert (planes.start, planes.stop) == (box[a].start, box[a].stop)
            tiles = geo.view_tiles(v)
            for kb, kc in itertools.product(kbs, kcs):
                for ax, k in ((b, kb), (c, kc)):  # a tile's samples inside the volume lie in the reach
                    s = tiles[ax].starts[k]
                    assert reach[ax].start <= max(s, 0) and min(s + tiles[ax].bsize, geo.scaled[ax]) <= reach[ax].stop
                for p in range(planes.start, planes.stop):
                    key = (v, p, kb, kc)
                    assert key not in seen
                    seen.add(key)
    assert len(seen) == sum(t for _p, t in geo.view_counts().values())  # Cellpose's count, each once
    assert units.total_tiles == len(seen)
    if cover is not None:
        assert (cover == 1).all()


@settings(max_examples=60, deadline=None)
@given(geometries, st.data())
def test_meeting_finds_exactly_the_units_whose_reach_overlaps(g, data):
    geo = _geometry(g)
    if geo is None:
        return
    units = UN.Units.of(geo, VIEWS, g["tiles"])
    box = []
    for n in geo.scaled:
        lo = data.draw(st.integers(0, n - 1))
        box.append(slice(lo, data.draw(st.integers(lo + 1, n))))
    box = tuple(box)
    expect = [u for u in range(len(units))
              if all(r.start < b.stop and b.start < r.stop for r, b in zip(units.reach(u), box))]
    assert units.meeting(box) == expect


@pytest.mark.parametrize("views, shape, aniso", [(VIEWS, (10, 70, 90), 2.0), (PLANE_VIEWS, (1, 150, 130), 1.0)])
def test_flows_are_the_same_bytes_for_any_units_and_with_the_views_kept(views, shape, aniso):
    net = load(random_cpsam(bsize=32))
    img = np.random.default_rng(1).gamma(2.0, 300.0, size=(1, *shape)).astype(np.float32)
    lowhigh = [[float(np.percentile(img, 1)), float(np.percentile(img, 99))]]
    geo = (Geometry.plane(shape[1:], diameter=24.0, bsize=32) if views == PLANE_VIEWS
           else Geometry.of(shape, diameter=24.0, anisotropy=aniso, bsize=32))
    core = tuple(slice(0, n) for n in shape)

    def read(box):
        return img[(slice(None), *box)]

    ref, _, stats = UN.predict_block(net, read, core, geo, lowhigh, views=views, tiles=1)
    assert stats["units"] > 1 and stats["tiles"] == sum(t for _p, t in geo.view_counts(views).values())
    for tiles in (2, (1, 3, 2), 50):
        flows, _, _ = UN.predict_block(net, read, core, geo, lowhigh, views=views, tiles=tiles)
        np.testing.assert_array_equal(flows, ref)
    if views == VIEWS:
        flows, kept, _ = UN.predict_block(net, read, core, geo, lowhigh, tiles=2, keep_views=True)
        np.testing.assert_array_equal(flows, ref)
        yx, zy, zx = kept
        np.testing.assert_allclose(flows[3], yx[2] + zy[2] + zx[2], rtol=1e-6, atol=1e-5)


def test_fixed_point_sums_do_not_depend_on_grouping():
    """What makes the flows independent of the units: the rounded contributions add up to the same
    integers in any order and grouping, where float32 sums of the same terms do not."""
    rng = np.random.default_rng(0)
    terms = rng.standard_normal((1000, 4)) * rng.uniform(1e-3, 10, (1000, 1))
    ints = np.round(terms * 2.0**UN.FRACTION_BITS).astype(np.int64)
    grouped = ints[:, :2].sum(1) + ints[:, 2:].sum(1)
    np.testing.assert_array_equal(ints.sum(1), grouped)
    f32 = terms.astype(np.float32)
    assert ((f32[:, 0] + f32[:, 1]) + (f32[:, 2] + f32[:, 3]) != ((f32[:, 0] + f32[:, 2]) + (f32[:, 1] + f32[:, 3]))).any()


def test_units_refuse_bad_sizes():
    geo = Geometry.of((8, 40, 40), bsize=32)
    with pytest.raises(ValueError, match=">= 1"):
        UN.Units.of(geo, VIEWS, 0)
    with pytest.raises(ValueError, match="not one of"):
        UN.Units.of(geo, VIEWS, 1).box(99)
