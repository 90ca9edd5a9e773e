"""Per-cell statistics of a label image, computed per block and merged exactly.

:func:`block_stats` measures every label of one block (a chunk core); :func:`merge_stats`
adds the partial results of the blocks a cell spans (sums and counts add, bounding boxes and
maxima take min/max), so the merged values equal the whole-volume ones whatever the cut.
Coordinate sums and intensity sums of integer images are kept as int64 and are therefore
exact; sums of float images are float64 (equal to a whole-volume float64 sum up to rounding
in the last bits). :func:`cell_table` turns merged sums into the table's columns.

Coordinates are voxel indices ``(Z, Y, X)`` of the whole volume; a block passes its
``offset`` (the index of its first voxel).
"""

from __future__ import annotations

from collections.abc import Sequence

import fastremap
import numpy as np

__all__ = ["block_stats", "merge_stats", "cell_table", "empty_stats", "STAT_KEYS"]

#: The arrays of a partial (and merged) statistics dict, all indexed by row.
STAT_KEYS = ("label", "count", "coord_sum", "bbox_start", "bbox_stop", "intensity_sum", "intensity_max")


def _sum_kind(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.int64) if np.dtype(dtype).kind in "iub" else np.dtype(np.float64)


def empty_stats(ndim: int, nchannels: int, image_dtype="uint16") -> dict[str, np.ndarray]:
    """A statistics dict with no rows."""
    return {
        "label": np.zeros(0, np.uint64),
        "count": np.zeros(0, np.int64),
        "coord_sum": np.zeros((0, ndim), np.int64),
        "bbox_start": np.zeros((0, ndim), np.int64),
        "bbox_stop": np.zeros((0, ndim), np.int64),
        "intensity_sum": np.zeros((0, nchannels), _sum_kind(image_dtype)),
        "intensity_max": np.zeros((0, nchannels), np.float64),
    }


def _exact_bincount(dense: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Per-label sums of ``values``: int64 (exact) for integer values, float64 otherwise."""
    if values.dtype.kind == "f":
        return np.bincount(dense, weights=values.astype(np.float64, copy=False), minlength=size)
    if values.dtype.itemsize <= 2:  # |value| < 2**16: float64 sums are exact below 2**37 voxels
        return np.bincount(dense, weights=values, minlength=size).astype(np.int64)
    v = values.astype(np.int64, copy=False)
    lo = v & 0xFFFF  # every 16-bit half sums exactly in float64 over < 2**37 voxels
    hi = v >> 16
    s_lo = np.bincount(dense, weights=lo.astype(np.float64), minlength=size).astype(np.int64)
    s_hi = np.bincount(dense, weights=hi.astype(np.float64), minlength=size).astype(np.int64)
    return s_hi * 65536 + s_lo


def block_stats(labels: np.ndarray, image: np.ndarray | None = None, *,
                offset: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Partial statistics of every non-zero label of one block.

    Parameters
    ----------
    labels : (\\*S) ndarray of int
        Labels of the block; 0 is background.
    image : (C, \\*S) ndarray, optional
        Intensities of the block, one plane per channel (any real dtype).
    offset : (ndim,) sequence of int, optional
        Index of the block's first voxel in the whole volume; default 0.

    Returns
    -------
    dict of ndarray, one row per label (in order of first appearance in C order)
        ``label`` (K,) uint64; ``count`` (K,) int64 voxels; ``coord_sum`` (K, ndim) int64,
        sum of the voxels' volume coordinates; ``bbox_start``/``bbox_stop`` (K, ndim)
        int64, half-open bounding box in volume coordinates; ``intensity_sum`` (K, C)
        int64 for integer images, float64 otherwise; ``intensity_max`` (K, C) float64.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer array, not {labels.dtype}")
    nd = labels.ndim
    offset = np.zeros(nd, np.int64) if offset is None else np.asarray(offset, np.int64)
    if offset.shape != (nd,):
        raise ValueError(f"offset {tuple(offset)} needs one value per axis of labels {labels.shape}")
    if image is None:
        image = np.zeros((0, *labels.shape), np.uint16)
    image = np.asarray(image)
    if image.shape[1:] != labels.shape:
        raise ValueError(f"image {image.shape} must be (C, *labels.shape) with labels {labels.shape}")
    nch = image.shape[0]
    dense, mapping = fastremap.renumber(np.ascontiguousarray(labels), preserve_zero=True, in_place=False)
    ids = np.zeros(len(mapping) + 1, np.uint64)
    for old, new in mapping.items():
        ids[new] = old
    size = int(dense.max()) + 1 if dense.size else 1
    ids = ids[:size]
    flat = dense.ravel().astype(np.intp, copy=False)
    count = np.bincount(flat, minlength=size).astype(np.int64)

    coord_sum = np.zeros((size, nd), np.int64)
    start = np.full((size, nd), np.iinfo(np.int64).max, np.int64)
    stop = np.full((size, nd), -1, np.int64)
    for ax in range(nd):
        moved = np.moveaxis(dense, ax, 0)
        for i in range(moved.shape[0]):
            c = np.bincount(moved[i].ravel(), minlength=size)
            present = c > 0
            coord = int(offset[ax]) + i
            coord_sum[:, ax] += c.astype(np.int64) * coord
            start[present & (start[:, ax] > coord), ax] = coord
            stop[present, ax] = coord + 1

    isum = np.zeros((size, nch), _sum_kind(image.dtype))
    imax = np.full((size, nch), -np.inf, np.float64)
    for c in range(nch):
        plane = image[c].ravel()
        isum[:, c] = _exact_bincount(flat, plane, size)
        m = np.full(size, -np.inf, np.float64)
        np.maximum.at(m, flat, plane.astype(np.float64, copy=False))
        imax[:, c] = m

    keep = slice(1, None)  # row 0 is the background
    return {
        "label": ids[keep],
        "count": count[keep],
        "coord_sum": coord_sum[keep],
        "bbox_start": start[keep],
        "bbox_stop": stop[keep],
        "intensity_sum": isum[keep],
        "intensity_max": imax[keep],
    }


def select_rows(stats: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    """The rows ``rows`` (a boolean mask or indices) of a statistics dict."""
    return {k: v[rows] for k, v in stats.items()}


def merge_stats(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Merge partial statistics of the same labels from several blocks.

    Parameters
    ----------
    parts : sequence of dict
        Outputs of :func:`block_stats` (or earlier merges) with the same ndim and channels.

    Returns
    -------
    dict of ndarray
        One row per distinct label (ascending): counts and sums added, ``bbox_start`` the
        minimum, ``bbox_stop`` and ``intensity_max`` the maximum over the parts.
    """
    parts = [p for p in parts if len(p["label"])]
    if not parts:
        raise ValueError("merge_stats needs at least one part with rows")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in STAT_KEYS}
    order = np.argsort(cat["label"], kind="stable")
    cat = {k: v[order] for k, v in cat.items()}
    first = np.flatnonzero(np.r_[True, cat["label"][1:] != cat["label"][:-1]])
    return {
        "label": cat["label"][first],
        "count": np.add.reduceat(cat["count"], first),
        "coord_sum": np.add.reduceat(cat["coord_sum"], first, axis=0),
        "bbox_start": np.minimum.reduceat(cat["bbox_start"], first, axis=0),
        "bbox_stop": np.maximum.reduceat(cat["bbox_stop"], first, axis=0),
        "intensity_sum": np.add.reduceat(cat["intensity_sum"], first, axis=0),
        "intensity_max": np.maximum.reduceat(cat["intensity_max"], first, axis=0),
    }


def cell_table(stats: dict[str, np.ndarray], voxel_size_um: Sequence[float],
               axes: str = "zyx") -> dict[str, np.ndarray]:
    """Columns of the cell table from merged statistics.

    Parameters
    ----------
    stats : dict of ndarray
        Output of :func:`merge_stats` (complete cells).
    voxel_size_um : (ndim,) sequence of float
        Voxel size in micrometres along each axis.
    axes : str
        One letter per axis, used in column names.

    Returns
    -------
    dict of str to (K,) ndarray
        ``label``; ``centroid_<a>`` (voxels, float64) and ``centroid_<a>_um``;
        ``bbox_<a>_start``/``bbox_<a>_stop`` (voxels, half-open); ``volume_voxels`` and
        ``volume_um3``; per channel ``c``: ``mean_intensity_c<c>`` and
        ``max_intensity_c<c>`` (float64).
    """
    vs = np.asarray(voxel_size_um, np.float64)
    count = stats["count"]
    cols: dict[str, np.ndarray] = {"label": stats["label"]}
    centroid = stats["coord_sum"] / count[:, None]
    for i, a in enumerate(axes):
        cols[f"centroid_{a}"] = centroid[:, i]
    for i, a in enumerate(axes):
        cols[f"centroid_{a}_um"] = centroid[:, i] * vs[i]
    for i, a in enumerate(axes):
        cols[f"bbox_{a}_start"] = stats["bbox_start"][:, i]
    for i, a in enumerate(axes):
        cols[f"bbox_{a}_stop"] = stats["bbox_stop"][:, i]
    cols["volume_voxels"] = count
    cols["volume_um3"] = count * float(np.prod(vs))
    for c in range(stats["intensity_sum"].shape[1]):
        cols[f"mean_intensity_c{c}"] = stats["intensity_sum"][:, c] / count
        cols[f"max_intensity_c{c}"] = stats["intensity_max"][:, c]
    return cols
