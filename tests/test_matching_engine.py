"""Tests of zseg.engine.matching against a plain reading of the reference pipeline's rule."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.segmentation import find_boundaries

from zseg.engine import matching as M
from zseg.engine.blocks import closed_faces, label_boxes
from zseg.storage.grid import ChunkGrid


def reference_match(cells: np.ndarray, nuclei: np.ndarray) -> list[tuple[int, int]]:
    """The rule as the issue and the reference pipeline state it, one cell at a time, with sets."""
    boundary = find_boundaries(cells, mode="inner", connectivity=1)
    taken: set[int] = set()
    pairs = []
    for c in sorted(int(v) for v in np.unique(cells) if v != 0):
        interior = {tuple(p) for p in np.argwhere((cells == c) & ~boundary)}
        best = None
        for n in sorted(int(v) for v in np.unique(nuclei[cells == c]) if v != 0):
            if n in taken:
                continue
            nuc = {tuple(p) for p in np.argwhere(nuclei == n)}
            inside = len(nuc & interior)
            if inside == 0:
                continue
            mismatch = Fraction(len(nuc) - inside, len(nuc))
            if best is None or mismatch < best[0]:  # strict: ties keep the lower nucleus label
                best = (mismatch, n)
        if best is not None:
            taken.add(best[1])
            pairs.append((c, best[1]))
    return pairs


@st.composite
def label_pair(draw):
    """Cells and nuclei as overlapping rectangles with arbitrary, non-consecutive IDs."""
    h = draw(st.integers(6, 24))
    w = draw(st.integers(6, 24))
    ids = st.integers(1, 2**32 - 1)

    def paint(n_max, size_max):
        img = np.zeros((h, w), np.uint32)
        for label in draw(st.lists(ids, min_size=0, max_size=n_max, unique=True)):
            y0, x0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
            y1 = min(h, y0 + draw(st.integers(1, size_max)))
            x1 = min(w, x0 + draw(st.integers(1, size_max)))
            img[y0:y1, x0:x1] = label
        return img

    cells = paint(8, 12)
    nuclei = paint(10, 6)
    return cells, nuclei


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_pair())
def test_matching_equals_the_reference_rule(pair):
    cells, nuclei = pair
    got_c, got_n = M.match_masks(cells, nuclei)
    assert list(zip(got_c.tolist(), got_n.tolist())) == reference_match(cells, nuclei)


@settings(max_examples=200, deadline=None)
@given(label_pair())
def test_inner_boundary_is_skimages(pair):
    cells, _ = pair
    np.testing.assert_array_equal(
        M.inner_boundary(cells), find_boundaries(cells, mode="inner", connectivity=1)
    )


def test_the_cases_the_original_matcher_gets_wrong_or_that_decide_ties():
    cells = np.zeros((12, 20), np.uint32)
    cells[1:11, 1:9] = 70  # non-consecutive IDs
    cells[1:11, 9:19] = 5
    nuclei = np.zeros_like(cells)
    nuclei[4:8, 7:11] = 900  # straddles both cells: 4 px inside 70's interior (x=7), 4 in 5's (x=10)
    nuclei[3:5, 3:5] = 11  # wholly inside cell 70
    nuclei[1, 12:14] = 12  # only on cell 5's membrane (top row): never a candidate
    nuclei[4:6, 14:16] = 40  # inside cell 5, mismatch 0 ...
    nuclei[7:9, 14:16] = 30  # ... tie with 40: the lower label wins
    got = list(zip(*[a.tolist() for a in M.match_masks(cells, nuclei)]))
    assert got == reference_match(cells, nuclei) == [(5, 30), (70, 11)]


def test_a_nucleus_without_a_cell_and_a_cell_without_a_nucleus_stay_unmatched():
    cells = np.zeros((10, 10), np.uint16)
    cells[0:5, 0:5] = 3
    nuclei = np.zeros_like(cells)
    nuclei[7:9, 7:9] = 2
    c, n = M.match_masks(cells, nuclei)
    assert len(c) == len(n) == 0


def test_mismatch_is_compared_exactly_above_the_float_bound(monkeypatch):
    pc = np.array([1, 1], np.uint64)
    pn = np.array([2, 3], np.uint64)
    ov = np.array([1, 2], np.int64)
    area = np.array([3, 6], np.int64)  # equal mismatch 2/3: tie to the lower label
    assert M.greedy_match(pc, pn, ov, area)[1].tolist() == [2]
    monkeypatch.setattr(M, "_EXACT_FLOAT_AREA", 2)  # the Fraction path must agree
    assert M.greedy_match(pc, pn, ov, area)[1].tolist() == [2]
    assert M.greedy_match(pc, pn, np.array([1, 3]), area)[1].tolist() == [3]


def test_bad_pairs_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        M.greedy_match([1], [2], [0], [4])
    with pytest.raises(ValueError, match="one entry per pair"):
        M.greedy_match([1, 2], [2], [1], [4])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_pair())
def test_each_component_decides_alone(pair):
    """Greedy restricted to one component of the overlap graph picks what the whole run picks."""
    cells, nuclei = pair
    interior = (cells != 0) & ~M.inner_boundary(cells)
    pc, pn, ov = M.interior_overlaps(cells, nuclei, interior)
    area = M._areas(nuclei, pn)
    whole = set(zip(*[a.tolist() for a in M.greedy_match(pc, pn, ov, area)]))
    cu, comp = M.components(pc, pn)
    comp_of = dict(zip(cu.tolist(), comp.tolist()))
    per_pair = np.array([comp_of[c] for c in pc.tolist()], np.uint64)
    pieces = set()
    for k in np.unique(per_pair):
        sel = per_pair == k
        pieces |= set(zip(*[a.tolist() for a in M.greedy_match(pc[sel], pn[sel], ov[sel], area[sel])]))
        assert comp_of[int(pc[sel].min())] == int(pc[sel].min())  # named by its smallest cell
    assert pieces == whole


def test_apply_matching_trims_nuclei_and_leaves_cytoplasm():
    cells = np.zeros((8, 8), np.uint32)
    cells[0:8, 0:8] = 9
    nuclei = np.zeros_like(cells)
    nuclei[0:4, 0:4] = 4  # touches the membrane: its edge pixels are trimmed
    interior = (cells != 0) & ~M.inner_boundary(cells)
    c, n = M.match_masks(cells, nuclei)
    assert c.tolist() == [9] and n.tolist() == [4]
    cell_out, nuc_out, cyto = M.apply_matching(cells, nuclei, interior, c, n, np.array([1]))
    assert set(np.unique(cell_out)) == {1}
    assert (nuc_out == 1).sum() == 16  # the slide's edge is no boundary: nothing trimmed
    np.testing.assert_array_equal(cyto, np.where(nuc_out == 0, cell_out, 0))
    cells[:, 7] = 0  # now column 3 of the nucleus is inside; row/col 0 still the slide's edge
    interior = (cells != 0) & ~M.inner_boundary(cells)
    c, n = M.match_masks(cells, nuclei)
    _, nuc_out, _ = M.apply_matching(cells, nuclei, interior, c, n, np.array([1]))
    assert (nuc_out == 1).sum() == 16


def chunked_match(cells, nuclei, chunk, halo):
    """block_match chunk by chunk, with the labels' boxes in the slide (a run has them from its
    per-cell statistics)."""
    pairs, undecided = [], 0
    grid = ChunkGrid(cells.shape, chunk, (halo, halo))
    boxes = dict(cell_boxes=label_boxes(cells), nucleus_boxes=label_boxes(nuclei))
    for i in range(grid.nchunks):
        block = grid.block(i)
        got = M.block_match(cells[block], nuclei[block], origin=[s.start for s in block],
                            core=grid.core_in_block(i), slide_shape=cells.shape, **boxes)
        pairs += list(zip(got["cells"].tolist(), got["nuclei"].tolist()))
        undecided += got["undecided"]
        if got["undecided"]:
            assert got["reach"].max() > 0
    return sorted(pairs), undecided


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_pair(), st.integers(1, 12), st.integers(1, 12), st.integers(1, 14))
def test_chunks_decide_the_whole_slides_matching_or_say_they_cannot(pair, cy, cx, halo):
    cells, nuclei = pair
    whole = list(zip(*[a.tolist() for a in M.match_masks(cells, nuclei)]))
    pairs, undecided = chunked_match(cells, nuclei, (cy, cx), halo)
    assert len(set(pairs)) == len(pairs)  # no component is decided twice
    if undecided == 0:
        assert pairs == whole
    else:
        assert set(pairs) <= set(whole)  # whatever was decided is right
    # a halo as large as the slide always decides everything
    assert chunked_match(cells, nuclei, (cy, cx), max(cells.shape)) == (whole, 0)


def test_a_cell_cut_by_the_block_with_its_nucleus_beyond_it_is_reported():
    cells = np.zeros((6, 30), np.uint32)
    cells[1:5, 1:29] = 8  # one long cell
    nuclei = np.zeros_like(cells)
    nuclei[2:4, 24:27] = 3  # its nucleus, far right
    boxes = dict(cell_boxes=label_boxes(cells), nucleus_boxes=label_boxes(nuclei))
    got = M.block_match(cells[:, 0:12], nuclei[:, 0:12], origin=(0, 0), core=(slice(0, 6), slice(0, 8)),
                        slide_shape=cells.shape, **boxes)
    assert got["undecided"] == 1 and len(got["cells"]) == 0 and got["reach"].tolist() == [4, 28]
    full = M.block_match(cells, nuclei, origin=(0, 0), core=(slice(0, 6), slice(0, 8)), slide_shape=cells.shape,
                         **boxes)
    assert full["undecided"] == 0 and full["cells"].tolist() == [8] and full["nuclei"].tolist() == [3]


def test_a_cell_in_pieces_is_not_taken_for_whole():
    """A label may come in pieces (a Cellpose mask is where trajectories end, not one connected
    piece): a block that holds one piece must not decide it (hypothesis found this case)."""
    cells = np.zeros((6, 15), np.uint32)
    cells[0:2, 9:11], cells[0:2, 11:13], cells[0:2, 13:15] = 1, 5, 1  # cell 1 in two pieces around 5
    cells[0, 0] = 4
    nuclei = np.zeros_like(cells)
    nuclei[0, 9:15], nuclei[0, 0] = 1, 2  # only (0, 14), on the slide's edge, is in 1's interior
    whole = list(zip(*[a.tolist() for a in M.match_masks(cells, nuclei)]))
    assert whole == [(1, 1)]
    pairs, undecided = chunked_match(cells, nuclei, (1, 1), 3)
    assert undecided > 0 and set(pairs) <= set(whole)


def test_block_match_refuses_a_block_outside_the_slide_and_a_label_without_a_box():
    z = np.zeros((4, 4), np.uint32)
    boxes = dict(cell_boxes=label_boxes(z), nucleus_boxes=label_boxes(z))
    with pytest.raises(ValueError, match="does not lie in the slide"):
        M.block_match(z, z, origin=(2, 0), core=(slice(0, 4), slice(0, 4)), slide_shape=(5, 4), **boxes)
    one = z.copy()
    one[1, 1] = 7
    with pytest.raises(ValueError, match=r"labels \[7\] have no bounding box"):
        M.block_match(one, z, origin=(0, 0), core=(slice(0, 4), slice(0, 4)), slide_shape=(4, 4), **boxes)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_pair(), st.integers(1, 12), st.integers(1, 12), st.booleans())
def test_layers_written_core_by_core_equal_the_whole_slides(pair, cy, cx, keep):
    """With a halo of one pixel, each core's three layers are the whole slide's."""
    cells, nuclei = pair
    mc, mn = M.match_masks(cells, nuclei)
    new = np.arange(1, len(mc) + 1)
    kept = np.unique(cells[cells != 0]).astype(np.uint64)
    kept_ids = np.arange(1, len(kept) + 1)
    extra = dict(keep_unmatched_cells=keep, kept_cells=kept, kept_ids=kept_ids)
    interior = (cells != 0) & ~M.inner_boundary(cells)
    whole = M.apply_matching(cells, nuclei, interior, mc, mn, new, **extra)
    out = [np.zeros_like(w) for w in whole]
    grid = ChunkGrid(cells.shape, (cy, cx), (1, 1))
    for i in range(grid.nchunks):
        block = grid.block(i)
        known = closed_faces([s.start for s in block], cells[block].shape, cells.shape)
        interior_b = (cells[block] != 0) & ~M.inner_boundary(cells[block], known=known)
        layers = M.apply_matching(cells[block], nuclei[block], interior_b, mc, mn, new, **extra)
        for o, layer in zip(out, layers):
            o[grid.core(i)] = layer[grid.core_in_block(i)]
    for o, w in zip(out, whole):
        np.testing.assert_array_equal(o, w)
    cell_l, nuc_l, cyto_l = whole
    assert not np.any((nuc_l != 0) & (nuc_l != cell_l))  # one ID per cell across the layers
    np.testing.assert_array_equal(cyto_l, np.where(nuc_l != 0, 0, cell_l))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(label_pair())
def test_labels_past_32_bits_give_the_same_pairs(pair):
    """Labels of 2**32 and more take another path to the pairs: the same result."""
    cells, nuclei = pair
    big = np.uint64(2**40)
    c64 = np.where(cells > 0, cells.astype(np.uint64) + big, 0).astype(np.uint64)
    n64 = np.where(nuclei > 0, nuclei.astype(np.uint64) + big, 0).astype(np.uint64)
    interior = (cells != 0) & ~M.inner_boundary(cells)
    small = M.interior_overlaps(cells, nuclei, interior)
    large = M.interior_overlaps(c64, n64, interior)
    np.testing.assert_array_equal(large[0], small[0] + big)
    np.testing.assert_array_equal(large[1], small[1] + big)
    np.testing.assert_array_equal(large[2], small[2])
    got = M.match_masks(c64, n64)
    want = M.match_masks(cells, nuclei)
    assert got[0].tolist() == (want[0] + big).tolist() and got[1].tolist() == (want[1] + big).tolist()


def test_labels_on_faces_are_the_volumes_not_the_cores_and_a_plane_has_no_z_faces():
    from zseg.engine.blocks import labels_on_faces

    labels = np.zeros((4, 6, 6), np.int64)
    labels[0, 2, 2] = 1  # on the volume's z=0 face
    labels[2, 2, 2] = 2  # inside
    labels[2, 5, 3] = 3  # on the y = 5 face of a core that ends at the volume's y = 5
    core = (slice(0, 4), slice(10, 16), slice(4, 10))  # the core (4, 6, 6) inside a (4, 16, 20) volume
    assert labels_on_faces(labels, core, (4, 16, 20)).tolist() == [1, 3]
    assert labels_on_faces(labels, core, (4, 30, 20)).tolist() == [1]  # y = 15 is no longer a face
    plane = np.zeros((1, 5, 5), np.int64)
    plane[0, 2, 2], plane[0, 0, 3] = 4, 5
    assert labels_on_faces(plane, (slice(0, 1), slice(0, 5), slice(0, 5)), (1, 5, 5)).tolist() == [5]
