"""Pure array functions of the multiplex (2D, many-channel) track.

- :func:`unique_channel_names`: CODEX panels repeat names ("DAPI", "Blank"); each repeat gets a
  suffix (``DAPI``, ``DAPI_2``) so every channel has a name a user can type.
- :func:`combine_channels`: the membrane composite, pixelwise ``max`` (the reference pipeline's
  rule), ``mean`` or ``sum`` of several channels' raw values.
- :func:`patch_grid`, :func:`patch_stats`, :func:`patch_flags`: the informative-patch table on a
  fixed grid of the unpadded slide (the reference pipeline's QC, computed on real pixels only, so
  edge patches are not made to look empty by padding).
- :func:`compartment_table`: the per-cell table of a multiplex run from the merged statistics
  (:mod:`zseg.engine.stats`) of its cell, nucleus and cytoplasm layers.

The rules and their reasons are in ``docs/architecture.md``, "Multiplex slides".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zseg.engine import dynamics as D
from zseg.engine import matching as M
from zseg.engine import stats as S

__all__ = [
    "unique_channel_names",
    "combine_channels",
    "COMBINE",
    "patch_grid",
    "patch_stats",
    "patch_flags",
    "PATCH_COLUMNS",
    "seed_allowed",
    "allowed_at",
    "compartment_table",
    "COMPARTMENTS",
    "COMPARTMENT_CHOICES",
    "matching_summary",
    "segment_reference",
]

#: How several membrane channels are combined into one, pixelwise.
COMBINE = ("max", "mean", "sum")
#: The compartments of the multiplex table, in column order.
COMPARTMENTS = ("cell", "nucleus", "cytoplasm")


def unique_channel_names(names: Sequence[str]) -> list[str]:
    """The names with every repeat suffixed ``_2``, ``_3``, ... (skipping names already taken).

    >>> unique_channel_names(["DAPI", "CD3", "DAPI", "Blank", "Blank", "DAPI"])
    ['DAPI', 'CD3', 'DAPI_2', 'Blank', 'Blank_2', 'DAPI_3']
    """
    names = [str(n) for n in names]
    given = set(names)
    taken: set[str] = set()
    out = []
    for n in names:
        name = n
        k = 2
        while name in taken:
            name = f"{n}_{k}"
            k += 1
            while name in given and name != n:  # a real channel already has that name
                name = f"{n}_{k}"
                k += 1
        taken.add(name)
        out.append(name)
    return out


def combine_channels(stack: np.ndarray, how: str = "max") -> np.ndarray:
    """One channel from several, pixelwise, on raw values.

    Parameters
    ----------
    stack : (C, Y, X) ndarray, C >= 1
    how : "max" | "mean" | "sum"
        ``max`` keeps the dtype; ``mean`` is float64; ``sum`` is int64 for integer images (no
        overflow) and float64 otherwise.
    """
    stack = np.asarray(stack)
    if stack.ndim != 3 or stack.shape[0] < 1:
        raise ValueError(f"stack must be (C, Y, X) with C >= 1, got shape {stack.shape}")
    if how == "max":
        return stack.max(axis=0)
    if how == "mean":
        return stack.astype(np.float64).mean(axis=0)
    if how == "sum":
        kind = np.int64 if stack.dtype.kind in "iub" else np.float64
        return stack.sum(axis=0, dtype=kind)
    raise ValueError(f"unknown combination {how!r}: use one of {', '.join(COMBINE)}")


def patch_grid(shape: Sequence[int], patch_size: int) -> np.ndarray:
    """The patches of a fixed grid over a slide of ``shape`` (Y, X), in C order.

    Returns ``(P, 4)`` int64 rows ``y_start, y_stop, x_start, x_stop`` (half-open); the last
    row and column of patches stop at the slide's edge (no padding).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape {shape} must be two positive sizes (Y, X)")
    if int(patch_size) < 1:
        raise ValueError(f"patch size {patch_size} must be >= 1")
    p = int(patch_size)
    ys = np.arange(0, shape[0], p)
    xs = np.arange(0, shape[1], p)
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    y0, x0 = y0.ravel(), x0.ravel()
    return np.stack([y0, np.minimum(y0 + p, shape[0]), x0, np.minimum(x0 + p, shape[1])], axis=1).astype(np.int64)


#: The statistics of one image in the patch table, after the image's prefix (``nuclear_`` ...).
_STATS = ("mean", "std", "non_zero_fraction")
#: Every column of the patch table, in order.
PATCH_COLUMNS = ("y_start", "y_stop", "x_start", "x_stop",
                 *(f"{img}_{s}" for img in ("nuclear", "membrane") for s in _STATS),
                 "is_empty", "is_noisy", "is_informative")


def patch_stats(images: dict[str, np.ndarray], *, origin: Sequence[int], slide_shape: Sequence[int],
                patch_size: int) -> dict[str, np.ndarray]:
    """Mean, standard deviation and non-zero fraction of each image over the grid's patches.

    Parameters
    ----------
    images : {"nuclear": (Y, X), "membrane": (Y, X)} ndarrays of one block
        ``membrane`` may be left out (a nuclear-only run).
    origin : (2,) ints
        Index of the block's first pixel in the slide: a multiple of ``patch_size``.
    slide_shape : (2,) ints
    patch_size : int

    Returns
    -------
    dict of (P,) ndarrays, the block's patches in C order
        ``y_start, y_stop, x_start, x_stop`` (slide coordinates), and ``<image>_mean``,
        ``<image>_std`` (population), ``<image>_non_zero_fraction`` per image, float64.

    The block must hold whole patches (start on the grid, stop on it or at the slide's edge), so
    every patch is measured from all of its pixels at once and the table does not depend on how
    the slide was cut into blocks.
    """
    if not images or "nuclear" not in images:
        raise ValueError("patch statistics need the nuclear image")
    shapes = {np.shape(v) for v in images.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"images must be 2D of one shape, got {sorted(shapes)}")
    shape = next(iter(shapes))
    p = int(patch_size)
    origin = tuple(int(o) for o in origin)
    slide_shape = tuple(int(s) for s in slide_shape)
    for o, n, s in zip(origin, shape, slide_shape):
        if o % p or o < 0 or o + n > s or ((o + n) % p and o + n != s):
            raise ValueError(f"block at {origin} of shape {shape} does not hold whole patches of {p} "
                             f"in a slide of {slide_shape}")
    grid = patch_grid(shape, p)
    out: dict[str, np.ndarray] = {
        "y_start": grid[:, 0] + origin[0], "y_stop": grid[:, 1] + origin[0],
        "x_start": grid[:, 2] + origin[1], "x_stop": grid[:, 3] + origin[1],
    }
    for name, img in images.items():
        img = np.asarray(img)
        mean = np.empty(len(grid))
        std = np.empty(len(grid))
        nz = np.empty(len(grid))
        for i, (y0, y1, x0, x1) in enumerate(grid.tolist()):
            v = img[y0:y1, x0:x1].astype(np.float64)
            mean[i] = v.mean()
            std[i] = v.std()
            nz[i] = np.count_nonzero(v) / v.size
        out[f"{name}_mean"] = mean
        out[f"{name}_std"] = std
        out[f"{name}_non_zero_fraction"] = nz
    return out


def patch_flags(stats: dict[str, np.ndarray], *, non_zero_threshold: float = 0.05,
                mean_threshold: float = 1.0) -> dict[str, np.ndarray]:
    """The reference pipeline's patch QC, on the nuclear image only.

    ``is_empty`` = nuclear non-zero fraction < ``non_zero_threshold``; ``is_noisy`` = nuclear
    mean < ``mean_threshold`` (raw units: it flags dim patches); ``is_informative`` = neither.
    """
    empty = stats["nuclear_non_zero_fraction"] < float(non_zero_threshold)
    noisy = stats["nuclear_mean"] < float(mean_threshold)
    return {"is_empty": empty, "is_noisy": noisy, "is_informative": ~(empty | noisy)}


def seed_allowed(shape: Sequence[int], patch_size: int, informative: np.ndarray) -> np.ndarray:
    """Where seeds may lie when uninformative patches are skipped: a ``(Y, X)`` bool image, True
    in the informative patches of the grid (``informative``: one flag per patch of
    :func:`patch_grid`, C order). A cell is kept or removed whole by where its seed lies, a
    property of the cell alone, so skipping never cuts a cell and does not depend on chunking."""
    grid = patch_grid(shape, patch_size)
    informative = np.asarray(informative, bool)
    if informative.shape != (len(grid),):
        raise ValueError(f"need one flag per patch ({len(grid)}), got {informative.shape}")
    p = int(patch_size)
    ny, nx = -(-int(shape[0]) // p), -(-int(shape[1]) // p)
    flags = informative.reshape(ny, nx)
    return np.repeat(np.repeat(flags, p, axis=0), p, axis=1)[: int(shape[0]), : int(shape[1])]


def allowed_at(points: np.ndarray, patch_size: int, flags: np.ndarray) -> np.ndarray:
    """:func:`seed_allowed` at ``points`` only ((N, 2) Y, X), from the ``(ny, nx)`` grid of patch
    flags: what a chunk needs for the seeds it owns, without an image the size of the slide."""
    points = np.asarray(points, np.int64).reshape(-1, 2)
    flags = np.asarray(flags, bool)
    p = int(patch_size)
    return flags[points[:, 0] // p, points[:, 1] // p]


def compartment_table(parts: dict[str, dict[str, np.ndarray]], channel_names: Sequence[str],
                      pixel_size_um: Sequence[float]) -> dict[str, np.ndarray]:
    """The multiplex per-cell table from merged statistics of each compartment.

    Parameters
    ----------
    parts : {"cell": stats, "nucleus": stats, "cytoplasm": stats}, or a single compartment
        Statistics (:func:`zseg.engine.stats.block_stats` or merged) of each layer over every
        channel of the slide, with the layers' shared IDs; the first compartment present (in
        :data:`COMPARTMENTS` order) defines the rows. A cell without a nucleus (or cytoplasm)
        has no row in that layer's statistics. A single-compartment run gives one layer: the
        cells (``whole-cell``) or the nuclei (``nuclear``).
    channel_names : the slide's (unique) channel names, one per statistics channel
    pixel_size_um : (2,) floats, Y and X

    Returns
    -------
    dict of (K,) ndarrays, in ascending label
        ``label``, ``centroid_y``, ``centroid_x`` (pixels) and ``centroid_y_um``,
        ``centroid_x_um`` of the row-defining layer; ``area_{compartment}`` (pixels) and
        ``{channel}_{compartment}_mean`` for every channel and compartment given (raw
        intensities; NaN where the compartment is empty).
    """
    if set(parts) not in ({"cell", "nucleus", "cytoplasm"}, {"cell"}, {"nucleus"}):
        raise ValueError(f"parts must be the compartments {', '.join(COMPARTMENTS)}, or one of cell or nucleus, "
                         f"got {sorted(parts)}")
    comps = [c for c in COMPARTMENTS if c in parts]
    parts = {c: _ascending(parts[c]) for c in comps}
    cell = parts[comps[0]]
    labels = cell["label"]
    names = list(channel_names)
    nch = cell["intensity_sum"].shape[1]
    if len(names) != nch or len(set(names)) != len(names):
        raise ValueError(f"need {nch} distinct channel names, got {names}")
    vs = np.asarray(pixel_size_um, np.float64)
    count = cell["count"]
    centroid = cell["coord_sum"] / count[:, None] if len(labels) else np.zeros((0, 2))
    cols: dict[str, np.ndarray] = {
        "label": labels,
        "centroid_y": centroid[:, 0], "centroid_x": centroid[:, 1],
        "centroid_y_um": centroid[:, 0] * vs[0], "centroid_x_um": centroid[:, 1] * vs[1],
    }
    sums = {}
    for comp in comps:
        part = parts[comp]
        if not np.all(np.isin(part["label"], labels)):
            raise ValueError(f"the {comp} statistics hold labels that are no cell")
        rows = np.searchsorted(labels, part["label"])
        area = np.zeros(len(labels), np.int64)
        area[rows] = part["count"]
        s = np.full((len(labels), nch), np.nan)
        s[rows] = part["intensity_sum"]
        cols[f"area_{comp}"] = area
        sums[comp] = (s, area)
    for c, name in enumerate(names):
        for comp in comps:
            s, area = sums[comp]
            with np.errstate(invalid="ignore", divide="ignore"):
                cols[f"{name}_{comp}_mean"] = np.where(area > 0, s[:, c] / np.maximum(area, 1), np.nan)
    return cols


def _ascending(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows of a statistics dict in ascending label (block_stats gives first-seen order)."""
    order = np.argsort(stats["label"], kind="stable")
    return {k: v[order] for k, v in stats.items()}


#: Mesmer's names for what a multiplex run segments.
COMPARTMENT_CHOICES = ("whole-cell", "nuclear", "both")


def matching_summary(cells_total: int, nuclei_total: int, matched: int) -> dict:
    """``run.json``'s ``result.matching``: counts after each compartment's filtering and
    ``matched_fraction`` = M / (C + N - M) (the reference pipelines define it three ways; this is
    the one that is 1 only when every cell and every nucleus is matched)."""
    c, n, m = int(cells_total), int(nuclei_total), int(matched)
    union = c + n - m
    return {"cells": {"total": c, "matched": m, "unmatched": c - m},
            "nuclei": {"total": n, "matched": m, "unmatched": n - m},
            "matched_fraction": (m / union) if union else 0.0}


def segment_reference(image: np.ndarray, channel_names: Sequence[str], *, compartment: str = "both",
                      flows: np.ndarray | None = None, nuclear_flows: np.ndarray | None = None,
                      niter: int = 200, nuclear_niter: int | None = None, cellprob_threshold: float = 0.0,
                      flow_threshold: float = 0.4, min_size: int = 15, max_size: int | None = None,
                      seed_allowed: np.ndarray | None = None, keep_unmatched_cells: bool = False,
                      pixel_size_um: Sequence[float] = (1.0, 1.0)) -> dict:
    """A whole multiplex slide that fits in memory, from given flows: the reference that a
    chunked run must reproduce bit for bit, chaining the engine's steps.

    Per compartment, Cellpose's 2D masks (:func:`zseg.engine.dynamics.compute_masks`, flow QC
    and skipping included); with ``both``, matching (:mod:`zseg.engine.matching`) and the three
    layers with one ID per cell, 1..K in ascending cell label (with ``keep_unmatched_cells``
    every kept cell, unmatched ones with cytoplasm = the cell); then the table over every
    channel of ``image`` (C, Y, X).

    Returns ``{"layers": {"cells"|"nuclei"|"cytoplasm": (Y, X) uint32}, "table": dict,
    "matching": dict or None, "masks": {"cells"|"nuclei": the compartment's own labels}}``.
    """
    if compartment not in COMPARTMENT_CHOICES:
        raise ValueError(f"compartment {compartment!r}: use one of {', '.join(COMPARTMENT_CHOICES)}")
    need = {"whole-cell": ("flows",), "nuclear": ("nuclear_flows",), "both": ("flows", "nuclear_flows")}[compartment]
    given = {"flows": flows, "nuclear_flows": nuclear_flows}
    for name in need:
        if given[name] is None or np.shape(given[name]) != (3, *np.shape(image)[1:]):
            raise ValueError(f"{name} must be (3, Y, X) = dY, dX, cellprob over the image's {np.shape(image)[1:]}")
    kw = dict(cellprob_threshold=cellprob_threshold, min_size=min_size, max_size=max_size,
              flow_threshold=flow_threshold, seed_allowed=seed_allowed)
    masks = {}
    if flows is not None and "flows" in need:
        masks["cells"] = D.compute_masks(flows[:2], flows[2], niter=niter, **kw)
    if nuclear_flows is not None and "nuclear_flows" in need:
        masks["nuclei"] = D.compute_masks(nuclear_flows[:2], nuclear_flows[2],
                                          niter=niter if nuclear_niter is None else nuclear_niter, **kw)
    if compartment == "whole-cell":
        layers, summary = {"cells": masks["cells"]}, None
    elif compartment == "nuclear":
        layers, summary = {"nuclei": masks["nuclei"]}, None
    else:
        cells, nuclei = masks["cells"], masks["nuclei"]
        mc, mn = M.match_masks(cells, nuclei)
        interior = (cells != 0) & ~M.inner_boundary(cells)
        kept = np.unique(cells[cells != 0]).astype(np.uint64)
        extra = dict(keep_unmatched_cells=keep_unmatched_cells, kept_cells=kept,
                     kept_ids=np.arange(1, len(kept) + 1))
        c_out, n_out, cy_out = M.apply_matching(cells, nuclei, interior, mc, mn, np.arange(1, len(mc) + 1), **extra)
        layers = {"cells": c_out, "nuclei": n_out, "cytoplasm": cy_out}
        summary = matching_summary(len(kept), len(np.unique(nuclei[nuclei != 0])), len(mc))
    names = {"cells": "cell", "nuclei": "nucleus", "cytoplasm": "cytoplasm"}
    parts = {names[k]: S.block_stats(v, image) for k, v in layers.items()}
    table = compartment_table(parts, channel_names, pixel_size_um)
    return {"layers": layers, "table": table, "matching": summary, "masks": masks}
