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

__all__ = [
    "unique_channel_names",
    "combine_channels",
    "COMBINE",
    "patch_grid",
    "patch_stats",
    "patch_flags",
    "PATCH_COLUMNS",
    "seed_allowed",
    "compartment_table",
    "COMPARTMENTS",
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


def compartment_table(parts: dict[str, dict[str, np.ndarray]], channel_names: Sequence[str],
                      pixel_size_um: Sequence[float]) -> dict[str, np.ndarray]:
    """The multiplex per-cell table from merged statistics of each compartment.

    Parameters
    ----------
    parts : {"cell": stats, "nucleus": stats, "cytoplasm": stats}
        Statistics (:func:`zseg.engine.stats.block_stats` or merged) of each layer over every
        channel of the slide, with the layers' shared IDs; the cells define the rows. A cell
        without a nucleus (or cytoplasm) has no row in that layer's statistics.
    channel_names : the slide's (unique) channel names, one per statistics channel
    pixel_size_um : (2,) floats, Y and X

    Returns
    -------
    dict of (K,) ndarrays, in ascending label
        ``label``, ``centroid_y``, ``centroid_x`` (pixels) and ``centroid_y_um``,
        ``centroid_x_um`` of the whole cell; ``area_cell``, ``area_nucleus``,
        ``area_cytoplasm`` (pixels); ``{channel}_{compartment}_mean`` for every channel and
        compartment (raw intensities; NaN where the compartment is empty).
    """
    if set(parts) != set(COMPARTMENTS):
        raise ValueError(f"parts must be the compartments {', '.join(COMPARTMENTS)}, got {sorted(parts)}")
    parts = {c: _ascending(p) for c, p in parts.items()}
    cell = parts["cell"]
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
    for comp in COMPARTMENTS:
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
        for comp in COMPARTMENTS:
            s, area = sums[comp]
            with np.errstate(invalid="ignore", divide="ignore"):
                cols[f"{name}_{comp}_mean"] = np.where(area > 0, s[:, c] / np.maximum(area, 1), np.nan)
    return cols


def _ascending(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows of a statistics dict in ascending label (block_stats gives first-seen order)."""
    order = np.argsort(stats["label"], kind="stable")
    return {k: v[order] for k, v in stats.items()}
