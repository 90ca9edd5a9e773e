"""The chunk grid: cores tile the volume, halos are clipped, ownership is unique."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zseg.errors import UserError
from zseg.storage.grid import ChunkGrid, box_shape, grow, relative
from zseg.workspace.chunks import select_chunks


@st.composite
def grids(draw, max_side=40):
    nd = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(nd))
    chunks = tuple(draw(st.integers(1, max_side)) for _ in range(nd))
    halo = tuple(draw(st.integers(0, 12)) for _ in range(nd))
    return ChunkGrid(shape, chunks, halo)


@settings(max_examples=60, deadline=None)
@given(grids())
def test_cores_tile_the_volume_exactly_once(grid):
    count = np.zeros(grid.shape, np.int32)
    for i in range(grid.nchunks):
        count[grid.core(i)] += 1
    assert (count == 1).all()


@settings(max_examples=60, deadline=None)
@given(grids())
def test_owner_is_the_chunk_whose_core_holds_the_voxel(grid):
    owner = np.full(grid.shape, -1, np.int64)
    for i in range(grid.nchunks):
        owner[grid.core(i)] = i
    pts = np.argwhere(np.ones(grid.shape, bool))
    np.testing.assert_array_equal(grid.owner(pts), owner[tuple(pts.T)])


@settings(max_examples=60, deadline=None)
@given(grids())
def test_block_is_core_plus_halo_clipped_and_reassembles(grid):
    """Reading blocks, cropping to the core and writing cores gives the volume back (stardist's round trip)."""
    vol = np.arange(np.prod(grid.shape)).reshape(grid.shape)
    out = np.full(grid.shape, -1)
    for i in range(grid.nchunks):
        core, block = grid.core(i), grid.block(i)
        for c, b, h, s in zip(core, block, grid.halo, grid.shape):
            assert b.start == max(c.start - h, 0) and b.stop == min(c.stop + h, s)
        out[core] = vol[block][grid.core_in_block(i)]
    np.testing.assert_array_equal(out, vol)


@settings(max_examples=60, deadline=None)
@given(grids(), st.data())
def test_intersecting_lists_exactly_the_cores_meeting_a_box(grid, data):
    lo = [data.draw(st.integers(-5, s)) for s in grid.shape]
    hi = [data.draw(st.integers(a, s + 5)) for a, s in zip(lo, grid.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    expect = [
        i for i in range(grid.nchunks)
        if all(max(c.start, b.start) < min(c.stop, b.stop) for c, b in zip(grid.core(i), box))
    ]
    assert grid.intersecting(box) == expect


def test_chunks_are_aligned_and_chunk_coords_roundtrip():
    g = ChunkGrid((10, 20, 30), (4, 8, 16), (2, 2, 2))
    assert g.grid_shape == (3, 3, 2) and g.nchunks == 18
    for i in range(g.nchunks):
        assert g.index(g.coords(i)) == i
        assert all(s.start % c == 0 for s, c in zip(g.core(i), g.chunk_shape))
    assert box_shape(g.core(17)) == (2, 4, 14)
    assert relative(g.core(0), g.block(0)) == g.core_in_block(0)
    assert grow((slice(0, 2),), 3, (4,)) == (slice(0, 4),)


@pytest.mark.parametrize("chunk", [(0, 4, 4), (4, -1, 4)])
def test_refuses_non_positive_chunk_sides(chunk):
    with pytest.raises(UserError, match="at least 1 voxel"):
        ChunkGrid((8, 8, 8), chunk, (0, 0, 0))


def test_select_chunks_ranges_and_shards():
    assert select_chunks(10, "0-2,5,7-7") == [0, 1, 2, 5, 7]
    shards = [select_chunks(10, None, f"{i}/3") for i in range(3)]
    assert sorted(sum(shards, [])) == list(range(10))
    assert all(len(s) in (3, 4) for s in shards)
    assert select_chunks(3, None, "4/8") == []
    for bad in ("1-", "5-2", "a", "0-10"):
        with pytest.raises(UserError):
            select_chunks(10, bad)
    for bad in ("3/3", "x/2", "1/0"):
        with pytest.raises(UserError):
            select_chunks(10, None, bad)
