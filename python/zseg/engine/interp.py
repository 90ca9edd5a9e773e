"""Where OpenCV's linear resize reads: the input samples and weights of each output sample of an
axis, in the whole axis's coordinates (numpy only; :mod:`zseg.engine.resample` applies them to
torch tensors, :mod:`zseg.phases.crops` to numpy arrays)."""

from __future__ import annotations

import numpy as np

__all__ = ["taps", "source_range", "resize_rows"]


def taps(n_in: int, n_out: int, start: int, stop: int, *, horizontal: bool = False):
    """Input samples and weights of the outputs ``[start, stop)`` of an axis resized ``n_in -> n_out``.

    Parameters
    ----------
    n_in, n_out : int
        Length of the axis before and after resizing (whole volume), both >= 1.
    start, stop : int
        Half-open range of output indices, ``0 <= start <= stop <= n_out``.
    horizontal : bool
        OpenCV's rule for the last axis of a plane (X) instead of the other axes (Y, Z).

    Returns
    -------
    i0, i1 : (stop - start,) ndarray of int64
        The two input samples each output reads, in ``[0, n_in)``.
    w0, w1 : (stop - start,) ndarray of float32
        Their weights.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"axis lengths must be >= 1, got {n_in} -> {n_out}")
    if not 0 <= start <= stop <= n_out:
        raise ValueError(f"output range [{start}, {stop}) is outside [0, {n_out})")
    scale = 1.0 / (n_out / n_in)
    dx = np.arange(start, stop, dtype=np.float64)
    fx = (dx + 0.5) * scale - 0.5
    sx = np.floor(fx).astype(np.int64)
    frac = (fx - sx).astype(np.float32)
    if horizontal:
        outside = (sx < 0) | (sx >= n_in - 1)
        frac[outside] = 0
    i0 = np.clip(sx, 0, n_in - 1)
    i1 = np.clip(sx + 1, 0, n_in - 1)
    if horizontal:
        i0 = np.where(sx >= n_in - 1, n_in - 1, i0)
    w1 = frac
    w0 = (np.float32(1) - frac).astype(np.float32)
    return i0, i1, w0, w1


def source_range(n_in: int, n_out: int, start: int, stop: int) -> tuple[int, int]:
    """Half-open range of input samples that the outputs ``[start, stop)`` read (empty -> ``(0, 0)``)."""
    if stop <= start:
        return (0, 0)
    if n_in == n_out:
        return (start, stop)
    i0, i1, _, _ = taps(n_in, n_out, start, stop)
    return int(i0.min()), int(i1.max()) + 1


def resize_rows(x: np.ndarray, axis: int, n_in: int, n_out: int, start: int, stop: int, offset: int) -> np.ndarray:
    """``x`` (float32, holding the input samples ``[offset, offset + x.shape[axis])`` of an axis of
    ``n_in``) resized along ``axis`` to the outputs ``[start, stop)`` of ``n_out`` (a non-last axis
    of a plane: OpenCV's vertical rule), with the arithmetic of :func:`zseg.engine.resample.resize_axis`."""
    i0, i1, w0, w1 = taps(n_in, n_out, start, stop)
    shape = [1] * x.ndim
    shape[axis] = len(i0)
    a = np.take(x, i0 - offset, axis=axis)
    b = np.take(x, i1 - offset, axis=axis)
    return a * w0.reshape(shape) + b * w1.reshape(shape)
