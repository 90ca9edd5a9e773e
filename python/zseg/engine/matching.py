"""Matching each whole cell to one nucleus: the multiplex track's mask repair, exact and vectorised.

The rule is the reference pipeline's (Chen and Murphy's matcher as the multiplex pipelines run it,
``docs/architecture.md``, "Multiplex slides"), written from its description:

- The *interior* of a cell is the cell minus its inner boundary: a pixel is on the boundary when
  one of its four neighbours holds another label (what
  ``skimage.segmentation.find_boundaries(cells, mode="inner", connectivity=1)`` marks). A pixel on
  the slide's edge has no neighbour there, so the edge alone makes no boundary.
- Cells are taken in ascending label order. A cell's candidates are the nuclei not yet taken with at
  least one pixel in its interior; the *mismatch* of a candidate is (nucleus pixels outside the
  interior) / (nucleus pixels). The smallest mismatch wins, ties go to the lowest nucleus label;
  both are then taken. Mismatches are compared exactly (see :func:`greedy_match`).
- A matched nucleus is trimmed to its cell's interior; cytoplasm is the cell minus its nucleus.

The greedy choice of a cell depends only on cells that share candidates with it, transitively: on
its connected component of the cell-nucleus *interior-overlap graph*. :func:`components` finds the
components, so that one chunk can decide each whole component (:func:`block_match`).

Works for any label IDs (the original matcher indexed boundaries by label - 1 and gave cells of
non-consecutive IDs another cell's boundary); labels are unsigned or non-negative integers.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import scipy.sparse as sp
from numba import njit

from zseg.engine import blocks as B

__all__ = [
    "inner_boundary",
    "interior_overlaps",
    "greedy_match",
    "components",
    "match_masks",
    "block_match",
    "apply_matching",
]

_EXACT_FLOAT_AREA = 2**26  # below it, float64 mismatches order exactly as the fractions do


def inner_boundary(labels: np.ndarray, *, known: tuple[tuple[bool, bool], ...] | None = None) -> np.ndarray:
    """Foreground pixels with a 4-neighbour of another label (``find_boundaries(mode="inner")``).

    Parameters
    ----------
    labels : (Y, X) integer ndarray
    known : ((bool, bool), (bool, bool)), optional
        Per axis, whether the block's (first, last) face is the slide's edge. The slide's edge has
        no neighbours beyond it, so it makes no boundary; a face inside the slide has unknown
        neighbours beyond it, and its pixels are marked as boundary (the caller must not decide
        anything that depends on them). Default: the block is the whole slide.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2D (Y, X), got shape {labels.shape}")
    out = np.zeros(labels.shape, bool)
    for ax in range(2):
        a = labels
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        diff = a[tuple(lo)] != a[tuple(hi)]
        out[tuple(lo)] |= diff
        out[tuple(hi)] |= diff
        if known is not None:
            first, last = known[ax]
            edge = [slice(None)] * 2
            if not first:
                edge[ax] = slice(0, 1)
                out[tuple(edge)] = True
            if not last:
                edge[ax] = slice(-1, None)
                out[tuple(edge)] = True
    out &= labels != 0
    return out


def interior_overlaps(cells: np.ndarray, nuclei: np.ndarray, interior: np.ndarray):
    """The interior-overlap graph: every (cell, nucleus) pair with nucleus pixels in the cell's interior.

    Returns
    -------
    pair_cell, pair_nucleus : (P,) uint64
        The pairs, sorted by cell then nucleus.
    overlap : (P,) int64
        Nucleus pixels in the cell's interior.
    """
    if cells.shape != nuclei.shape or interior.shape != cells.shape:
        raise ValueError(f"cells {cells.shape}, nuclei {nuclei.shape} and interior {interior.shape} differ in shape")
    both = interior & (nuclei != 0)
    c = cells[both].astype(np.uint64)
    n = nuclei[both].astype(np.uint64)
    if c.size == 0:
        z = np.zeros(0, np.uint64)
        return z, z.copy(), np.zeros(0, np.int64)
    if int(c.max()) < 2**32 and int(n.max()) < 2**32:
        # one uint64 key per pixel; a nucleus crosses a row in runs of one pair, so count runs
        # (C order) first: the sort then sees ~10x fewer keys than pixels
        key = (c << np.uint64(32)) | n
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        lengths = np.diff(np.r_[starts, len(key)])
        uniq, inverse = np.unique(key[starts], return_inverse=True)
        counts = np.bincount(inverse.ravel(), weights=lengths).astype(np.int64)
        return uniq >> np.uint64(32), uniq & np.uint64(0xFFFFFFFF), counts
    pairs = np.stack([c, n], axis=1)
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    return uniq[:, 0].copy(), uniq[:, 1].copy(), counts.astype(np.int64)


def _mismatch_order(pair_cell, pair_nucleus, overlap, area):
    """Indices of the pairs sorted by (cell, mismatch, nucleus), mismatch = (area - overlap) / area."""
    if len(area) and int(area.max()) >= _EXACT_FLOAT_AREA:
        keys = [Fraction(int(a) - int(o), int(a)) for o, a in zip(overlap, area)]
        return np.array(sorted(range(len(keys)), key=lambda i: (int(pair_cell[i]), keys[i], int(pair_nucleus[i]))),
                        dtype=np.int64)
    # Division is correctly rounded, so equal fractions give equal floats; distinct fractions p/q
    # differ by >= 1 / (q1 q2) > 2**-52 while q < 2**26, more than float64 rounding can hide.
    mismatch = (area - overlap).astype(np.float64) / area.astype(np.float64)
    return np.lexsort((pair_nucleus, mismatch, pair_cell))


@njit(cache=True)
def _greedy(cell_rank, nucleus_rank, ncells, nnuclei):  # pragma: no cover - numba
    cell_taken = np.zeros(ncells, np.bool_)
    nucleus_taken = np.zeros(nnuclei, np.bool_)
    chosen = np.zeros(len(cell_rank), np.bool_)
    for i in range(len(cell_rank)):
        c = cell_rank[i]
        n = nucleus_rank[i]
        if cell_taken[c] or nucleus_taken[n]:
            continue
        cell_taken[c] = True
        nucleus_taken[n] = True
        chosen[i] = True
    return chosen


def greedy_match(pair_cell, pair_nucleus, overlap, nucleus_area) -> tuple[np.ndarray, np.ndarray]:
    """The greedy one-to-one matching over the candidate pairs.

    Parameters
    ----------
    pair_cell, pair_nucleus : (P,) integer arrays
        The interior-overlap pairs (:func:`interior_overlaps`).
    overlap : (P,) int
        Nucleus pixels in the cell's interior (> 0).
    nucleus_area : (P,) int
        All pixels of the pair's nucleus.

    Returns
    -------
    cells, nuclei : (K,) uint64
        The matched pairs, in ascending cell label.

    Cells in ascending label order each take their candidate of least mismatch among the nuclei
    not yet taken (ties: lowest nucleus label). Sorting the pairs by (cell, mismatch, nucleus) and
    taking each pair whose cell and nucleus are both free does exactly that: a cell's pairs are
    consecutive, the first free one is its best free candidate.
    """
    pair_cell = np.asarray(pair_cell, np.uint64)
    pair_nucleus = np.asarray(pair_nucleus, np.uint64)
    overlap = np.asarray(overlap, np.int64)
    area = np.asarray(nucleus_area, np.int64)
    if not (len(pair_cell) == len(pair_nucleus) == len(overlap) == len(area)):
        raise ValueError("pair_cell, pair_nucleus, overlap and nucleus_area must have one entry per pair")
    if len(overlap) and (overlap.min() < 1 or np.any(overlap > area)):
        raise ValueError("every pair needs 1 <= overlap <= nucleus_area")
    if len(pair_cell) == 0:
        z = np.zeros(0, np.uint64)
        return z, z.copy()
    order = _mismatch_order(pair_cell, pair_nucleus, overlap, area)
    cells_u, cell_rank = np.unique(pair_cell, return_inverse=True)
    nuc_u, nucleus_rank = np.unique(pair_nucleus, return_inverse=True)
    chosen = _greedy(cell_rank[order].astype(np.int64), nucleus_rank[order].astype(np.int64),
                     len(cells_u), len(nuc_u))
    picked = order[chosen]
    picked = picked[np.argsort(pair_cell[picked], kind="stable")]
    return pair_cell[picked], pair_nucleus[picked]


def components(pair_cell, pair_nucleus) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the interior-overlap graph.

    Returns ``(cells, component)``: the distinct cells of the pairs (ascending) and, per cell, the
    smallest cell label of its component (a name every block that holds the component agrees on).
    """
    pair_cell = np.asarray(pair_cell, np.uint64)
    pair_nucleus = np.asarray(pair_nucleus, np.uint64)
    if len(pair_cell) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    cells_u, ci = np.unique(pair_cell, return_inverse=True)
    nuc_u, ni = np.unique(pair_nucleus, return_inverse=True)
    nc, nn = len(cells_u), len(nuc_u)
    graph = sp.coo_matrix((np.ones(len(ci)), (ci, nc + ni)), shape=(nc + nn, nc + nn))
    _, comp = sp.csgraph.connected_components(graph, directed=False)
    comp = comp[:nc]
    smallest = np.full(comp.max() + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(smallest, comp, np.arange(nc))
    return cells_u, cells_u[smallest[comp]]


def match_masks(cells: np.ndarray, nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Match the cells and nuclei of one whole slide (or of a block holding whole components).

    Returns the matched ``(cells, nuclei)`` label pairs in ascending cell label.
    """
    if cells.shape != nuclei.shape or cells.ndim != 2:
        raise ValueError(f"cells {cells.shape} and nuclei {nuclei.shape} must be 2D images of one shape")
    interior = (cells != 0) & ~inner_boundary(cells)
    pc, pn, ov = interior_overlaps(cells, nuclei, interior)
    area = _areas(nuclei, pn)
    return greedy_match(pc, pn, ov, area)


def block_match(cells: np.ndarray, nuclei: np.ndarray, *, origin, core: tuple[slice, slice], slide_shape,
                cell_boxes: B.Boxes, nucleus_boxes: B.Boxes) -> dict:
    """The matching decisions one chunk owns, from its block (core plus halo).

    Parameters
    ----------
    cells, nuclei : (Y, X) integer ndarray
        The final labels of each compartment over the block.
    origin : (2,) ints
        Index of the block's first pixel in the slide.
    core : (slice, slice)
        The chunk's core, in block coordinates.
    slide_shape : (2,) ints
        The whole slide's shape (which block faces are the slide's edge).
    cell_boxes, nucleus_boxes : :class:`zseg.engine.blocks.Boxes`
        Bounding boxes in the slide of every label present in the block, and of every cell whose
        box starts in the core (from the run's per-cell statistics).

    Returns
    -------
    dict
        ``cells``, ``nuclei`` (K,) uint64: the pairs of the components this chunk owns and could
        decide; ``undecided`` int: owned components (or owned cells not whole in the block) that
        reach beyond it; ``reach`` (2,) int: the largest extent (pixels) of an undecided
        component as the block shows it, a lower bound of the halo it needs.

    A component of the interior-overlap graph is owned by the chunk whose core holds the first
    corner of its smallest cell's box, and decided there when all its cells and nuclei are
    whole in the block (:mod:`zseg.engine.blocks`): then every pixel of theirs has its four
    neighbours in the block, so their interiors, pairs, overlaps and nucleus areas are the whole
    slide's, and so is the greedy choice (:func:`components`). The union over the chunks of the
    decided pairs is the whole slide's matching when no chunk reports ``undecided``
    (``docs/architecture.md``, "Multiplex slides").
    """
    cells = np.asarray(cells)
    nuclei = np.asarray(nuclei)
    if cells.shape != nuclei.shape or cells.ndim != 2:
        raise ValueError(f"cells {cells.shape} and nuclei {nuclei.shape} must be 2D blocks of one shape")
    B.check_block(origin, cells.shape, slide_shape)
    known = B.closed_faces(origin, cells.shape, slide_shape)
    interior = (cells != 0) & ~inner_boundary(cells, known=known)
    pc, pn, ov = interior_overlaps(cells, nuclei, interior)
    area = _areas(nuclei, pn)
    open_cells = B.open_labels(cells, cell_boxes, origin=origin, slide_shape=slide_shape)
    open_nuclei = B.open_labels(nuclei, nucleus_boxes, origin=origin, slide_shape=slide_shape)
    present = B.present_labels(cells)
    mine = B.owned(cell_boxes.ids, cell_boxes, origin=origin, core=core)  # the cells whose box starts here

    cu, comp = components(pc, pn)
    comp_of_pair = comp[np.searchsorted(cu, pc)] if len(pc) else np.zeros(0, np.uint64)
    owned_pair = np.isin(comp_of_pair, mine)
    # a component is open when one of its cells or nuclei is not whole in the block
    open_pair = np.isin(pc, open_cells) | np.isin(pn, open_nuclei)
    open_comps = np.unique(comp_of_pair[open_pair])
    decide = owned_pair & ~np.isin(comp_of_pair, open_comps)
    mc, mn = greedy_match(pc[decide], pn[decide], ov[decide], area[decide])

    undecided_comps = np.intersect1d(open_comps, mine)
    # an owned cell not whole here, without a pair in the block, may have its candidates beyond it
    lone = np.setdiff1d(np.setdiff1d(mine, np.setdiff1d(present, open_cells)), cu)
    reach = np.zeros(2, np.int64)
    for k in undecided_comps.tolist():
        members = np.isin(cells, pc[comp_of_pair == k]) | np.isin(nuclei, pn[comp_of_pair == k])
        reach = np.maximum(reach, _extent(members))
    for c in lone.tolist():
        rows = cell_boxes.rows([c])
        reach = np.maximum(reach, (cell_boxes.stop[rows] - cell_boxes.start[rows])[0])
    return {"cells": mc, "nuclei": mn, "undecided": int(len(undecided_comps) + len(lone)), "reach": reach}


def _extent(mask: np.ndarray) -> np.ndarray:
    """Per axis, the length of the bounding box of ``mask``."""
    out = np.zeros(mask.ndim, np.int64)
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        out[ax] = hit[-1] - hit[0] + 1 if len(hit) else 0
    return out


def _areas(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Pixel count of each of ``ids`` in ``labels``."""
    if len(ids) == 0:
        return np.zeros(0, np.int64)
    u, counts = np.unique(labels[labels != 0], return_counts=True)
    return counts[np.searchsorted(u, ids.astype(u.dtype))].astype(np.int64)


def apply_matching(cells: np.ndarray, nuclei: np.ndarray, interior: np.ndarray,
                   cell_ids: np.ndarray, nucleus_ids: np.ndarray, new_ids: np.ndarray,
                   *, keep_unmatched_cells: bool = False, kept_cells: np.ndarray | None = None,
                   kept_ids: np.ndarray | None = None):
    """The three output layers of a block: matched cells, trimmed nuclei, cytoplasm, in new IDs.

    Parameters
    ----------
    cells, nuclei : (Y, X) integer ndarray
        Final labels of each compartment in the block.
    interior : (Y, X) bool
        The cells' interior in the block (correct wherever a matched cell lies).
    cell_ids, nucleus_ids, new_ids : (K,) arrays
        The matched pairs meeting the block and the cell's new ID.
    keep_unmatched_cells, kept_cells, kept_ids
        With ``keep_unmatched_cells``, ``kept_cells`` -> ``kept_ids`` renumbers every kept cell
        (matched or not) and the cell layer keeps them all.

    Returns
    -------
    cell_out, nucleus_out, cytoplasm_out : (Y, X) uint32
    """
    cells = np.asarray(cells)
    cell_ids = np.asarray(cell_ids, np.uint64)
    if keep_unmatched_cells:
        lut_keys, lut_vals = np.asarray(kept_cells, np.uint64), np.asarray(kept_ids, np.uint64)
    else:
        lut_keys, lut_vals = cell_ids, np.asarray(new_ids, np.uint64)
    cell_out = _lookup(cells, lut_keys, lut_vals)
    # the nucleus a pixel's cell is matched with
    partner = _lookup(cells, cell_ids, np.asarray(nucleus_ids, np.uint64), missing=0)
    own = interior & (partner != 0) & (nuclei.astype(np.uint64) == partner)
    nucleus_out = np.where(own, cell_out, 0).astype(np.uint32)
    cytoplasm_out = np.where(own, 0, cell_out).astype(np.uint32)
    return cell_out.astype(np.uint32), nucleus_out, cytoplasm_out


def _lookup(labels: np.ndarray, keys: np.ndarray, values: np.ndarray, missing: int = 0) -> np.ndarray:
    """``values[k]`` where ``labels == keys[k]``, ``missing`` elsewhere (keys sorted or not)."""
    labels = labels.astype(np.uint64, copy=False)
    out = np.full(labels.shape, missing, np.uint64)
    if len(keys) == 0:
        return out
    order = np.argsort(keys)
    k, v = keys[order], values[order]
    idx = np.clip(np.searchsorted(k, labels), 0, len(k) - 1)
    hit = (k[idx] == labels) & (labels != 0)
    out[hit] = v[idx[hit]]
    return out
