"""Cellpose's ``stitch3D`` replayed over a table of plane-to-plane overlaps (numpy only).

With ``do_3D=False`` and ``stitch_threshold=T`` Cellpose segments every Z plane in 2D, then
``utils.stitch3D`` walks the planes in order. For plane ``z + 1`` against the labels already
given to plane ``z`` (IoU from the two planes' integer pixel counts, ``o / (a + b - o)`` in
float64):

1. IoUs below ``T`` count as 0;
2. in each column (a label of plane ``z``) only the largest IoU is kept (all of them on a tie);
3. each mask of plane ``z + 1`` takes the label of its largest kept IoU (the lowest label on a
   tie), or, with none, a new label (``max + 1, ...``, in the plane's mask order).

So two masks of plane ``z + 1`` tied on one label of plane ``z`` both take it, as in Cellpose.
A plane's *mask order* is Cellpose's 2D numbering, the raster order of each mask's first
pixel. None of this depends on how the planes were cut into chunks: the table holds sums of
counts, and :func:`replay` only sorts and compares integers and IoUs computed as Cellpose does.

One difference, deliberate: Cellpose keeps a plane's own numbers (1, 2, ...) when the plane
before it has no masks *and no two planes have been stitched yet*, so the masks of plane 0
and of a plane after an empty plane 1 share labels 1, 2, ... and merge into one cell each, across
the gap. zseg gives those masks new labels, like every other unmatched mask
(``test_a_gap_after_the_first_plane_does_not_merge_unrelated_cells``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["overlaps", "replay"]


def overlaps(upper: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel counts of every pair of labels that overlap between two planes' label images.

    Returns ``(a, b, n)``: int64 arrays, ``n[k]`` pixels where ``upper`` is ``a[k] > 0`` and
    ``lower`` is ``b[k] > 0``, sorted by ``(a, b)``.
    """
    if upper.shape != lower.shape:
        raise ValueError(f"planes of shapes {upper.shape} and {lower.shape}")
    both = (upper != 0) & (lower != 0)
    a = upper[both].astype(np.int64)
    b = lower[both].astype(np.int64)
    if not len(a):
        z = np.zeros(0, np.int64)
        return z, z.copy(), z.copy()
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    start = np.flatnonzero(np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])])
    n = np.diff(np.r_[start, len(a)]).astype(np.int64)
    return a[start], b[start], n


def replay(ids, plane, rank, area, pairs, threshold: float, nplanes: int) -> np.ndarray:
    """The stitched label of every mask.

    Parameters
    ----------
    ids, plane, rank, area : (K,) int arrays
        Each mask's ID (unique), its Z plane, its order key within the plane (the linear index of
        its first pixel) and its pixel count.
    pairs : tuple of three (P,) int arrays
        ``(upper, lower, count)``: ``count`` pixels of mask ``upper`` (plane ``z + 1``) lie on
        mask ``lower`` (plane ``z``); a pair may appear several times (its counts add up).
    threshold : float
        Cellpose's ``stitch_threshold``.
    nplanes : int
        Planes of the volume.

    Returns
    -------
    (K,) ndarray of int64
        Stitched labels 1..M, in the order of ``ids``.
    """
    ids = np.asarray(ids, np.int64)
    plane = np.asarray(plane, np.int64)
    rank = np.asarray(rank, np.int64)
    area = np.asarray(area, np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("mask IDs must be unique")
    if len(ids) and (plane.min() < 0 or plane.max() >= nplanes):
        raise ValueError(f"planes must lie in [0, {nplanes})")
    out = np.zeros(len(ids), np.int64)
    order = np.lexsort((rank, plane))  # by plane, then Cellpose's mask order
    bounds = np.searchsorted(plane[order], np.arange(nplanes + 1))
    up, low, cnt = (np.asarray(x, np.int64) for x in pairs)
    if len(up):
        up_row, low_row = _rows(ids, up), _rows(ids, low)
        if np.any(plane[up_row] != plane[low_row] + 1):
            raise ValueError("every pair must join a mask to one of the plane below")
        by_plane = np.argsort(plane[up_row], kind="stable")
        up_row, low_row, cnt = up_row[by_plane], low_row[by_plane], cnt[by_plane]
        pbounds = np.searchsorted(plane[up_row], np.arange(nplanes + 1))
    mmax = 0
    for z in range(nplanes):
        rows = order[bounds[z]:bounds[z + 1]]
        if not len(rows):
            continue
        new = np.ones(len(rows), bool)
        if z > 0 and len(up) and pbounds[z] < pbounds[z + 1]:
            sl = slice(pbounds[z], pbounds[z + 1])
            new = _match(rows, up_row[sl], out[low_row[sl]], cnt[sl], area, out, order[bounds[z - 1]:bounds[z]],
                         threshold)
        n = int(new.sum())
        out[rows[new]] = mmax + 1 + np.arange(n)
        mmax += n
    return out


def _rows(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The positions in ``ids`` of the IDs ``wanted``; ``ValueError`` for one not in ``ids``."""
    srt = np.argsort(ids, kind="stable")
    pos = np.minimum(np.searchsorted(ids[srt], wanted), max(len(ids) - 1, 0))
    if len(wanted) and (not len(ids) or np.any(ids[srt][pos] != wanted)):
        raise ValueError("a pair names a mask that is not among the IDs")
    return srt[pos]


def _match(rows, r_up, lab_low, cnt, area, out, lower_rows, threshold) -> np.ndarray:
    """Give ``rows`` (one plane's masks, in mask order) the labels of the plane below by
    Cellpose's rule; returns which rows are left unmatched (they get new labels)."""
    labs, inv = np.unique(out[lower_rows], return_inverse=True)
    col_area = np.bincount(inv, weights=area[lower_rows]).astype(np.int64)  # a label may cover several masks
    srt = np.lexsort((lab_low, r_up))  # sum the counts of each (row, label) pair
    rs, ls = r_up[srt], lab_low[srt]
    start = np.flatnonzero(np.r_[True, (rs[1:] != rs[:-1]) | (ls[1:] != ls[:-1])])
    o = np.add.reduceat(cnt[srt], start)
    r, lab = rs[start], ls[start]
    iou = o / (area[r] + col_area[np.searchsorted(labs, lab)] - o).astype(np.float64)
    keep = ~(iou < threshold)
    r, lab, iou = r[keep], lab[keep], iou[keep]
    cols, col = np.unique(lab, return_inverse=True)  # per column, only its largest IoU (all on a tie)
    colmax = np.full(len(cols), -np.inf)
    np.maximum.at(colmax, col, iou)
    keep = (iou >= colmax[col]) & (iou > 0)
    r, lab, iou = r[keep], lab[keep], iou[keep]
    srt = np.lexsort((lab, -iou, r))  # per row: its largest IoU, the lowest label on a tie
    r, lab = r[srt], lab[srt]
    first = np.r_[True, r[1:] != r[:-1]] if len(r) else np.zeros(0, bool)
    out[r[first]] = lab[first]
    return ~np.isin(rows, r[first])
