"""Linear resampling of one axis in *global* coordinates, as OpenCV's ``INTER_LINEAR`` does it.

Cellpose resizes a whole volume with ``cv2.resize(..., INTER_LINEAR)``: per YX plane (X
then Y), then along Z. An output sample ``i`` of an axis resized from ``n_in`` to ``n_out``
samples reads the input at the half-pixel position

    x = (i + 0.5) * n_in / n_out - 0.5

between the samples ``floor(x)`` and ``floor(x) + 1`` (clamped to the axis), weighted by the
fraction. The position depends only on ``i``, ``n_in`` and ``n_out``: a block of the volume
that knows the *whole* volume's sizes computes exactly the samples the whole-volume resize
computes, whatever block it is. :func:`taps` gives those positions for a range of outputs,
:func:`source_range` the input samples they read, :func:`resize_axis` applies them to a
block that holds that range.

Arithmetic follows OpenCV for float32 images: the scale is ``1 / (n_out / n_in)`` and the
position in double, the weights ``1 - f`` and ``f`` are float32, and the sum
``a * (1 - f) + b * f`` is float32. OpenCV's horizontal pass (the last axis of a plane) sets
``f = 0`` where the position falls outside the axis; its vertical pass keeps ``f`` and
reads the clamped row twice. ``horizontal`` picks the rule, so results agree with OpenCV to
a float32 rounding (OpenCV may fuse a multiply-add where torch rounds twice).

An axis whose size does not change is copied (OpenCV's resize is the identity there).
"""

from __future__ import annotations

import torch

from zseg.engine.interp import source_range, taps

__all__ = ["taps", "source_range", "resize_axis"]

__all__ = ["taps", "source_range", "resize_axis"]


def resize_axis(
    x: torch.Tensor, axis: int, n_in: int, n_out: int, start: int, stop: int, offset: int,
    *, horizontal: bool = False,
) -> torch.Tensor:
    """Resample ``axis`` of a block to the outputs ``[start, stop)`` of the whole axis.

    Parameters
    ----------
    x : torch.Tensor, float32
        A block whose ``axis`` holds the input samples ``[offset, offset + x.shape[axis])``
        of an axis of ``n_in`` samples; it must contain ``source_range(n_in, n_out, start, stop)``.
    axis : int
    n_in, n_out : int
        Whole-axis lengths before and after resizing.
    start, stop : int
        Output samples wanted (global indices of the resized axis).
    offset : int
        Global index of the block's first sample along ``axis``.
    horizontal : bool
        OpenCV's rule for the last axis of a plane (see the module docstring).

    Returns
    -------
    torch.Tensor, float32
        ``x`` with ``axis`` of length ``stop - start``, on ``x``'s device.
    """
    axis = axis % x.ndim
    if n_in == n_out:
        lo, hi = start - offset, stop - offset
        if lo < 0 or hi > x.shape[axis]:
            raise ValueError(f"block [{offset}, {offset + x.shape[axis]}) lacks samples [{start}, {stop})")
        return x.narrow(axis, lo, hi - lo)
    i0, i1, w0, w1 = taps(n_in, n_out, start, stop, horizontal=horizontal)
    if len(i0) and (i0.min() < offset or i1.max() >= offset + x.shape[axis]):
        raise ValueError(
            f"block [{offset}, {offset + x.shape[axis]}) lacks samples [{i0.min()}, {i1.max() + 1})"
        )
    shape = [1] * x.ndim
    shape[axis] = len(i0)
    dev = x.device
    a = x.index_select(axis, torch.from_numpy(i0 - offset).to(dev))
    b = x.index_select(axis, torch.from_numpy(i1 - offset).to(dev))
    return a * torch.from_numpy(w0).to(dev).view(shape) + b * torch.from_numpy(w1).to(dev).view(shape)
