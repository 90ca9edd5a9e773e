"""Resolution pyramids of label images: which axes to halve, mode downsampling, upsampling.

A label pyramid must never invent a label: every value of a coarser level is a value of the
level below (so of level 0). :func:`downsample_mode` gives each output voxel the most
frequent label of its window, and every window lies on a fixed grid of the whole volume
(window ``i`` covers ``[i * f, (i + 1) * f)``), so the result does not depend on how the
volume is cut into blocks, as long as each block starts at a multiple of ``f``.

Shapes are ``(Z, Y, X)`` (any ndim works); factors are integers per axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["level_factors", "cumulative_factors", "downsample_mode", "upsample_nearest", "downsampled_shape"]


def _factors(factors, ndim: int) -> tuple[int, ...]:
    f = tuple(int(v) for v in factors)
    if len(f) != ndim or any(v < 1 for v in f) or any(int(v) != v for v in factors):
        raise ValueError(f"factors {tuple(factors)} must be {ndim} integers >= 1, one per axis")
    return f


def level_factors(shape: Sequence[int], voxel_size: Sequence[float] | None = None, *,
                  target: int = 256, max_levels: int = 32) -> list[tuple[int, ...]]:
    """Per-level downsampling factors (each relative to the level below) of a pyramid.

    Levels are added until every side is at most ``target`` voxels. At each level an axis
    is halved when it is longer than 1 voxel and its voxel is among the finest, i.e. at
    most ``sqrt(2)`` times the smallest voxel size of the axes still halvable; so an
    anisotropic volume (coarse Z) keeps Z until Y and X have caught up, and the coarse
    levels tend towards isotropic voxels.

    Parameters
    ----------
    shape : (ndim,) sequence of int
        Level-0 shape in voxels.
    voxel_size : (ndim,) sequence of float, optional
        Level-0 voxel size along each axis (any unit); default 1 along each.
    target : int, keyword-only
        Longest side of the coarsest level, in voxels.
    max_levels : int, keyword-only
        Upper bound on the number of levels added.

    Returns
    -------
    list of tuple of int
        ``factors[l]`` takes level ``l`` to level ``l + 1`` (1 or 2 per axis); empty when
        level 0 already fits ``target``.
    """
    shape = [int(n) for n in shape]
    size = [1.0] * len(shape) if voxel_size is None else [float(v) for v in voxel_size]
    if len(size) != len(shape) or any(not (v > 0) for v in size):
        raise ValueError(f"voxel_size {voxel_size} must be {len(shape)} positive numbers")
    if target < 1:
        raise ValueError(f"target must be at least 1 voxel, not {target}")
    out: list[tuple[int, ...]] = []
    while max(shape) > target and len(out) < max_levels:
        halvable = [v for n, v in zip(shape, size) if n > 1]
        finest = min(halvable)
        f = tuple(2 if n > 1 and v <= finest * math.sqrt(2) * (1 + 1e-9) else 1 for n, v in zip(shape, size))
        out.append(f)
        shape = [-(-n // k) for n, k in zip(shape, f)]
        size = [v * k for v, k in zip(size, f)]
    return out


def cumulative_factors(factors: Sequence[Sequence[int]], ndim: int) -> list[tuple[int, ...]]:
    """Factor of each level relative to level 0: ``[(1,)*ndim, f0, f0*f1, ...]``."""
    out = [(1,) * ndim]
    for f in factors:
        out.append(tuple(a * b for a, b in zip(out[-1], f)))
    return out


def downsampled_shape(shape: Sequence[int], factors: Sequence[int]) -> tuple[int, ...]:
    """``ceil(shape / factors)``: a partial window at the end still gives a voxel."""
    return tuple(-(-int(n) // int(f)) for n, f in zip(shape, factors))


def downsample_mode(labels: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Downsample a label image by the most frequent label of each window.

    Parameters
    ----------
    labels : (\\*S) ndarray of int
        Label image; 0 is background but counts like any label.
    factors : (ndim,) sequence of int
        Window size along each axis. The window of output voxel ``i`` is
        ``labels[i * f : (i + 1) * f]``; at the end of an axis it may be shorter.

    Returns
    -------
    ndarray, same dtype as ``labels``, shape ``ceil(S / factors)``
        Each voxel is the most frequent value of its window; ties go to a non-zero label
        over background, then to the smaller label. Every output value is a value of
        ``labels``.

    Notes
    -----
    The output voxel depends on its window only. Downsampling a block that starts at a
    multiple of ``factors`` gives exactly the matching part of the downsampled whole.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be an integer array, not {labels.dtype}")
    f = _factors(factors, labels.ndim)
    if all(k == 1 for k in f):
        return labels.copy()
    out_shape = downsampled_shape(labels.shape, f)
    padded = tuple(o * k for o, k in zip(out_shape, f))
    if padded != labels.shape:
        full = np.zeros(padded, labels.dtype)
        full[tuple(slice(0, n) for n in labels.shape)] = labels
        valid = np.zeros(padded, bool)
        valid[tuple(slice(0, n) for n in labels.shape)] = True
    else:
        full, valid = labels, None
    nd = labels.ndim
    split = [d for o, k in zip(out_shape, f) for d in (o, k)]
    order = [2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)]
    k = math.prod(f)
    windows = full.reshape(split).transpose(order).reshape(-1, k)
    out = windows[:, 0].copy()
    uniform = (windows == windows[:, :1]).all(axis=1)
    if valid is not None:
        ok = valid.reshape(split).transpose(order).reshape(-1, k)
        uniform &= ok.all(axis=1)
    todo = np.flatnonzero(~uniform)
    if len(todo):
        w = windows[todo]
        v = ok[todo] if valid is not None else np.ones(w.shape, bool)
        best = np.zeros(len(todo), w.dtype)
        best_count = np.full(len(todo), -1, np.int64)
        for i in range(k):
            wi = w[:, i]
            count = ((w == wi[:, None]) & v).sum(axis=1)
            count[~v[:, i]] = -1
            better = (count > best_count) | (
                (count == best_count) & (((wi != 0) & (best == 0)) | (((wi != 0) == (best != 0)) & (wi < best)))
            )
            best = np.where(better, wi, best)
            best_count = np.where(better, count, best_count)
        out[todo] = best
    return out.reshape(out_shape)


def upsample_nearest(labels: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Upsample by repeating each voxel ``factors`` times, to ``shape``.

    Parameters
    ----------
    labels : (\\*S) ndarray
        Coarse label image.
    factors : (ndim,) sequence of int
        Voxels of the output per voxel of ``labels``, along each axis.
    shape : (ndim,) sequence of int
        Output shape, at most ``S * factors`` plus ``factors - 1`` along each axis; output
        voxels past ``S * factors`` repeat the last voxel (a pyramid made with floor
        division drops that remainder).

    Returns
    -------
    ndarray, dtype of ``labels``, shape ``shape``
        ``out[i] = labels[min(i // factors, S - 1)]``.
    """
    labels = np.asarray(labels)
    f = _factors(factors, labels.ndim)
    shape = tuple(int(n) for n in shape)
    if len(shape) != labels.ndim or any(n > s * k + k - 1 or n < 0 for n, s, k in zip(shape, labels.shape, f)):
        raise ValueError(f"shape {shape} does not fit {labels.shape} upsampled by {f}")
    index = np.ix_(*[np.minimum(np.arange(n) // k, s - 1) for n, k, s in zip(shape, f, labels.shape)])
    return labels[index]
