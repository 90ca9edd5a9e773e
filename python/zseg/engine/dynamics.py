"""Cellpose dynamics, rebuilt so that a chunked run gives the same labels as a whole run.

Cellpose turns the network's flows into labels in four steps: every foreground voxel
follows the flow field for ``niter`` Euler steps; the end points are counted in a
histogram; local maxima of the histogram become seeds, and each seed grows over the
well-populated histogram bins around it; each voxel takes the label of the region its
trajectory ended in. This module implements each step as a small function on numpy
arrays, so that the result does not depend on how a volume is chunked:

* A trajectory is integrated as a *displacement* ``d`` from its own integer start ``s``
  (float32), and the flow is read at ``u = (s + d) * L / (L - 1) - 0.5`` per axis, computed in
  float64 from global values only (``s`` in volume coordinates, ``L`` the *whole volume's*
  length), so the arithmetic of a trajectory is bitwise the same in any block that holds it.
* That read position is Cellpose's own: ``steps_interp`` normalises positions by ``L - 1`` and
  samples with ``grid_sample(align_corners=False)``, which reads voxel ``x`` at
  ``x * L / (L - 1) - 0.5`` with zeros beyond the volume. The offset runs from -0.5 voxel at the
  first voxel to +0.5 at the last and depends on the whole volume's size, which every block
  knows (:func:`sampling`). A crop of the volume is therefore read elsewhere, as in Cellpose.

The trajectories are Cellpose's to float rounding, so the labels equal Cellpose's on the
whole volume (AP 1.0 on network flows, ``benchmarks/cellpose3.py``), and are identical to
themselves for any chunking. (Reading the flow at ``x`` itself, which is chunk-invariant too
and what zseg did first, agrees with Cellpose on exact flows but not on a trained network's:
AP@0.5 0.72-0.91 against Cellpose's masks on three volumes, because trajectories that end
oscillating around a sink are counted in other histogram bins.) :func:`compute_masks` chains
the steps on a whole volume and is the reference that the chunked phases must reproduce bit
for bit.

docs/architecture.md ("Invariants") says how the chunked phases use these functions.

All functions accept 2D (``ndim = 2``) and 3D (``ndim = 3``) data. Flow fields have shape
``(ndim, *spatial)``, point lists ``(N, ndim)``; coordinates are in voxels, axis order
as in the array (``Z, Y, X`` or ``Y, X``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import fastremap
import fill_voids
import numba
import numpy as np
import scipy.ndimage
from numba import njit, prange

from zseg.engine.blocks import label_boxes
from zseg.engine.flow_error import diffusion_settings, flow_errors

__all__ = [
    "prepare_flows",
    "sampling",
    "follow_flows",
    "end_points",
    "histogram",
    "find_seeds",
    "grow_seeds",
    "paint_regions",
    "fill_holes",
    "size_limits",
    "compute_masks",
    "SEED_MIN_COUNT",
    "SEED_WINDOW",
    "GROW_MIN_COUNT",
    "GROW_ITERATIONS",
    "REGION_WINDOW",
]

#: A seed needs a histogram count strictly above this (Cellpose: ``h > 10``).
SEED_MIN_COUNT = 10
#: Side of the window in which a seed must be the maximum (Cellpose: 5).
SEED_WINDOW = 5
#: A grown region keeps only bins with a count strictly above this (Cellpose: ``h > 2``).
GROW_MIN_COUNT = 2
#: Number of 3^ndim dilations that grow a seed (Cellpose: 5).
GROW_ITERATIONS = 5
#: Side of the window around a seed that its region lives in (Cellpose: 11).
REGION_WINDOW = 11
_RH = REGION_WINDOW // 2  # 5: half-width of the region window

#: Longest cycle of a trajectory that follow_flows detects to skip the remaining steps.
_MAX_PERIOD = 16
#: Points per work item of the parallel trajectory loop.
_CHUNK_POINTS = 512


# --------------------------------------------------------------------------------------
# 1. flows
# --------------------------------------------------------------------------------------


def _sigmas(flow3D_smooth, ndim: int) -> tuple[float, ...]:
    """Per-axis Gaussian sigmas from a scalar or a sequence; raise ValueError if invalid."""
    if np.ndim(flow3D_smooth) == 0:
        sig = (float(flow3D_smooth),) * ndim
    else:
        sig = tuple(float(s) for s in flow3D_smooth)
        if len(sig) != ndim:
            raise ValueError(
                f"flow3D_smooth={list(flow3D_smooth)!r} has {len(sig)} values but the flows "
                f"are {ndim}D: give one sigma (voxels) or exactly {ndim}, one per axis."
            )
    if not all(math.isfinite(s) and s >= 0 for s in sig):
        raise ValueError(
            f"flow3D_smooth={flow3D_smooth!r} has a negative or non-finite sigma: give "
            "sigmas >= 0 in voxels (0 turns smoothing off)."
        )
    return sig


def _check_flows(dP: np.ndarray, cellprob: np.ndarray) -> None:
    if dP.ndim not in (3, 4) or dP.shape[0] != dP.ndim - 1:
        raise ValueError(
            f"flows dP have shape {dP.shape}; expected (2, Y, X) or (3, Z, Y, X) with one "
            "channel per spatial axis: pass the flow channels without cellprob."
        )
    if cellprob.shape != dP.shape[1:]:
        raise ValueError(
            f"cellprob has shape {cellprob.shape} but the flows dP have spatial shape "
            f"{dP.shape[1:]}: pass the cellprob channel of the same prediction."
        )


def prepare_flows(
    dP: np.ndarray,
    cellprob: np.ndarray,
    *,
    cellprob_threshold: float = 0.0,
    flow3D_smooth: float | Sequence[float] = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn network flows into the step field that trajectories follow.

    Parameters
    ----------
    dP : (ndim, \\*S) ndarray, float16 or float32
        Flows in Cellpose's convention (``dZ, dY, dX`` or ``dY, dX``; in 3D the sum of
        the views, network scale, about 5 per view for a unit vector).
    cellprob : (\\*S) ndarray, float
        Cell-probability logits (in 3D the sum of the three views).
    cellprob_threshold : float, keyword-only
        Foreground is ``cellprob > cellprob_threshold``.
    flow3D_smooth : float or sequence of ndim floats, keyword-only
        Gaussian sigma(s) in voxels, per spatial axis. Where any is > 0, each flow
        channel is smoothed first with ``scipy.ndimage.gaussian_filter`` (float32,
        ``mode='reflect'``, default ``truncate``); 0 leaves that axis unsmoothed.

    Returns
    -------
    flow : (ndim, \\*S) ndarray, float32, C-contiguous
        ``(float32(dP) * fg) / 5`` in exactly this order of operations (as Cellpose), so
        a step of one trajectory is about one voxel per view.
    fg : (\\*S) ndarray, bool
        Foreground mask ``cellprob > cellprob_threshold``.

    Raises
    ------
    ValueError
        If the flows have the wrong shape, ``flow3D_smooth`` is invalid, or the flows
        hold NaN or infinite values.

    Notes
    -----
    Smoothing a block gives the same values as smoothing the whole volume only away
    from the block's edges (``truncate * sigma`` voxels); chunked callers smooth a
    larger read region and crop it.
    """
    dP = np.asarray(dP)
    cellprob = np.asarray(cellprob)
    _check_flows(dP, cellprob)
    ndim = dP.shape[0]
    sig = _sigmas(flow3D_smooth, ndim)
    flow = np.array(dP, dtype=np.float32, order="C", copy=True)
    if any(s > 0 for s in sig):
        for c in range(ndim):
            flow[c] = scipy.ndimage.gaussian_filter(flow[c], sigma=sig, mode="reflect")
    fg = cellprob > cellprob_threshold
    np.multiply(flow, fg, out=flow)
    np.divide(flow, np.float32(5.0), out=flow)
    if not np.isfinite(flow).all():
        bad = int(np.count_nonzero(~np.isfinite(flow)))
        raise ValueError(f"the flows hold {bad} NaN or infinite values")
    return flow, fg


# --------------------------------------------------------------------------------------
# 2. trajectories
# --------------------------------------------------------------------------------------


@njit(inline="always", cache=True)
def _corners(G, d, scale, shift, org, B, L):  # pragma: no cover
    """One axis of a sample: the block indices of the two corners and their weights.

    The trajectory is at volume position ``G + d`` (``G`` its integer start in the volume,
    ``d`` its float32 displacement); the flow is read at ``u = (G + d) * scale - shift`` (float64,
    from global values only, so every block computes the same bits), between voxels
    ``floor(u)`` and ``floor(u) + 1``. A corner outside the volume reads 0 (``grid_sample``'s
    zero padding): its weight is 0 and its index is the other corner's. ``esc`` is True when a
    corner inside the volume lies outside the block."""
    u = (np.float64(G) + np.float64(d)) * scale - shift
    f = math.floor(u)
    w = np.float32(u - f)
    wa = np.float32(1.0) - w
    wb = w
    a = f - org
    b = a + 1
    lo_ok = f >= 0
    hi_ok = f + 1 <= L - 1
    esc = (lo_ok and (a < 0 or a > B - 1)) or (hi_ok and (b < 0 or b > B - 1))
    if not lo_ok:
        wa = np.float32(0.0)
        a = b
    if not hi_ok:
        wb = np.float32(0.0)
        b = a
    return a, b, wa, wb, esc


@njit(parallel=True, fastmath=False, cache=True)
def _follow_3d(flow, starts, niter, origin, vshape, scale, shift, max_period, disp, escaped):  # pragma: no cover
    B0 = flow.shape[1]
    B1 = flow.shape[2]
    B2 = flow.shape[3]
    for i in prange(starts.shape[0]):
        s0 = starts[i, 0]
        s1 = starts[i, 1]
        s2 = starts[i, 2]
        G0 = origin[0] + s0
        G1 = origin[1] + s1
        G2 = origin[2] + s2
        # displacement bounds keeping the *volume* position in [0, L-1]
        lo0 = np.float32(-G0)
        lo1 = np.float32(-G1)
        lo2 = np.float32(-G2)
        hi0 = np.float32(vshape[0] - 1 - G0)
        hi1 = np.float32(vshape[1] - 1 - G1)
        hi2 = np.float32(vshape[2] - 1 - G2)
        d0 = np.float32(0.0)
        d1 = np.float32(0.0)
        d2 = np.float32(0.0)
        e0 = d0  # saved state for cycle detection (see follow_flows, Notes)
        e1 = d1
        e2 = d2
        lam = 0
        power = 1
        searching = True
        n_end = niter
        t = 0
        esc = False
        while t < n_end:
            a0, b0, v0, u0, x0 = _corners(G0, d0, scale[0], shift[0], origin[0], B0, vshape[0])
            a1, b1, v1, u1, x1 = _corners(G1, d1, scale[1], shift[1], origin[1], B1, vshape[1])
            a2, b2, v2, u2, x2 = _corners(G2, d2, scale[2], shift[2], origin[2], B2, vshape[2])
            if x0 or x1 or x2:
                esc = True
                break
            # trilinear: along axis 2, then 1, then 0; one channel after the other
            c00 = flow[0, a0, a1, a2] * v2 + flow[0, a0, a1, b2] * u2
            c01 = flow[0, a0, b1, a2] * v2 + flow[0, a0, b1, b2] * u2
            c10 = flow[0, b0, a1, a2] * v2 + flow[0, b0, a1, b2] * u2
            c11 = flow[0, b0, b1, a2] * v2 + flow[0, b0, b1, b2] * u2
            g0 = (c00 * v1 + c01 * u1) * v0 + (c10 * v1 + c11 * u1) * u0
            c00 = flow[1, a0, a1, a2] * v2 + flow[1, a0, a1, b2] * u2
            c01 = flow[1, a0, b1, a2] * v2 + flow[1, a0, b1, b2] * u2
            c10 = flow[1, b0, a1, a2] * v2 + flow[1, b0, a1, b2] * u2
            c11 = flow[1, b0, b1, a2] * v2 + flow[1, b0, b1, b2] * u2
            g1 = (c00 * v1 + c01 * u1) * v0 + (c10 * v1 + c11 * u1) * u0
            c00 = flow[2, a0, a1, a2] * v2 + flow[2, a0, a1, b2] * u2
            c01 = flow[2, a0, b1, a2] * v2 + flow[2, a0, b1, b2] * u2
            c10 = flow[2, b0, a1, a2] * v2 + flow[2, b0, a1, b2] * u2
            c11 = flow[2, b0, b1, a2] * v2 + flow[2, b0, b1, b2] * u2
            g2 = (c00 * v1 + c01 * u1) * v0 + (c10 * v1 + c11 * u1) * u0
            d0 = min(max(d0 + g0, lo0), hi0)
            d1 = min(max(d1 + g1, lo1), hi1)
            d2 = min(max(d2 + g2, lo2), hi2)
            t += 1
            if searching:
                lam += 1
                if d0 == e0 and d1 == e1 and d2 == e2:
                    # d_t == d_(t-lam): periodic from here on, d_niter == d_(n_end)
                    n_end = t + (niter - t) % lam
                    searching = False
                elif lam == power:
                    e0 = d0
                    e1 = d1
                    e2 = d2
                    lam = 0
                    if power < max_period:
                        power *= 2
        if not esc:  # the end voxel must lie in the block too
            q0 = s0 + math.floor(d0)
            q1 = s1 + math.floor(d1)
            q2 = s2 + math.floor(d2)
            esc = (q0 < 0 or q1 < 0 or q2 < 0 or q0 > B0 - 1 or q1 > B1 - 1
                   or q2 > B2 - 1)
        if esc:
            d0 = min(max(d0, np.float32(-s0)), np.float32(B0 - 1 - s0))
            d1 = min(max(d1, np.float32(-s1)), np.float32(B1 - 1 - s1))
            d2 = min(max(d2, np.float32(-s2)), np.float32(B2 - 1 - s2))
        disp[i, 0] = d0
        disp[i, 1] = d1
        disp[i, 2] = d2
        escaped[i] = esc


@njit(parallel=True, fastmath=False, cache=True)
def _follow_2d(flow, starts, niter, origin, vshape, scale, shift, max_period, disp, escaped):  # pragma: no cover
    B0 = flow.shape[1]
    B1 = flow.shape[2]
    for i in prange(starts.shape[0]):
        s0 = starts[i, 0]
        s1 = starts[i, 1]
        G0 = origin[0] + s0
        G1 = origin[1] + s1
        lo0 = np.float32(-G0)
        lo1 = np.float32(-G1)
        hi0 = np.float32(vshape[0] - 1 - G0)
        hi1 = np.float32(vshape[1] - 1 - G1)
        d0 = np.float32(0.0)
        d1 = np.float32(0.0)
        e0 = d0
        e1 = d1
        lam = 0
        power = 1
        searching = True
        n_end = niter
        t = 0
        esc = False
        while t < n_end:
            a0, b0, v0, u0, x0 = _corners(G0, d0, scale[0], shift[0], origin[0], B0, vshape[0])
            a1, b1, v1, u1, x1 = _corners(G1, d1, scale[1], shift[1], origin[1], B1, vshape[1])
            if x0 or x1:
                esc = True
                break
            g0 = ((flow[0, a0, a1] * v1 + flow[0, a0, b1] * u1) * v0
                  + (flow[0, b0, a1] * v1 + flow[0, b0, b1] * u1) * u0)
            g1 = ((flow[1, a0, a1] * v1 + flow[1, a0, b1] * u1) * v0
                  + (flow[1, b0, a1] * v1 + flow[1, b0, b1] * u1) * u0)
            d0 = min(max(d0 + g0, lo0), hi0)
            d1 = min(max(d1 + g1, lo1), hi1)
            t += 1
            if searching:
                lam += 1
                if d0 == e0 and d1 == e1:
                    n_end = t + (niter - t) % lam
                    searching = False
                elif lam == power:
                    e0 = d0
                    e1 = d1
                    lam = 0
                    if power < max_period:
                        power *= 2
        if not esc:
            q0 = s0 + math.floor(d0)
            q1 = s1 + math.floor(d1)
            esc = q0 < 0 or q1 < 0 or q0 > B0 - 1 or q1 > B1 - 1
        if esc:
            d0 = min(max(d0, np.float32(-s0)), np.float32(B0 - 1 - s0))
            d1 = min(max(d1, np.float32(-s1)), np.float32(B1 - 1 - s1))
        disp[i, 0] = d0
        disp[i, 1] = d1
        escaped[i] = esc


def sampling(volume_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Cellpose's sample position ``u = x * scale - shift`` per axis of a volume of this shape.

    Cellpose normalises positions by ``L - 1`` and samples with ``grid_sample(align_corners=False)``,
    so position ``x`` reads the flow at ``x * L / (L - 1) - 0.5``: 0.5 voxel before ``x`` at the
    first voxel, at ``x`` in the middle, 0.5 after it at the last. This depends on the *whole*
    volume's ``L`` only, which every block knows, so zseg samples exactly there. (An axis of one
    voxel: ``u = x``.)"""
    L = np.asarray(volume_shape, dtype=np.float64)
    many = L > 1
    scale = np.where(many, L / np.where(many, L - 1, 1.0), 1.0)
    shift = np.where(many, 0.5, 0.0)
    return scale, shift


def _int_vector(value, ndim: int, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != (ndim,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}={value!r} must be {ndim} integers, one per spatial axis")
    return arr.astype(np.int64)


def _check_niter(niter) -> int:
    if isinstance(niter, bool) or not isinstance(niter, (int, np.integer)) or niter < 0:
        raise ValueError(
            f"niter={niter!r} is not a whole number >= 0: give the number of flow steps "
            "per voxel (Cellpose's default is 200)."
        )
    return int(niter)


def follow_flows(
    flow: np.ndarray,
    starts: np.ndarray,
    *,
    niter: int,
    origin: Sequence[int],
    volume_shape: Sequence[int],
    device=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Follow the flow from integer start voxels for ``niter`` steps, inside one block.

    Each trajectory starts at its voxel ``s`` with displacement ``d = 0`` and repeats
    ``niter`` times: read the flow by multilinear interpolation at Cellpose's position
    ``u = (origin + s + d) * L / (L - 1) - 0.5`` per axis (:func:`sampling`; corners
    ``floor(u)`` and ``floor(u) + 1``, upper weight ``u - floor(u)``, a corner outside the
    volume reads 0), add it to ``d``, and clamp ``d`` per axis so that the position in the
    *volume* stays within ``[0, L - 1]``. ``u`` is computed in float64 from the global start and
    the float32 ``d`` only, so a trajectory's arithmetic is bitwise the same in every block
    that holds it.

    Parameters
    ----------
    flow : (ndim, \\*B) ndarray, float32
        Step field of one block of the volume (see :func:`prepare_flows`), voxels per
        step. Other float dtypes are converted.
    starts : (N, ndim) ndarray, int
        Start voxels in the *block's* frame, each inside ``B``.
    niter : int, keyword-only
        Number of steps, >= 0.
    origin : (ndim,) ints, keyword-only
        Volume coordinates of the block's first voxel.
    volume_shape : (ndim,) ints, keyword-only
        Shape of the whole volume; the block must lie inside it.
    device : torch.device or str, optional, keyword-only
        None (default): the numba kernel on the CPU. A torch device (e.g. ``"cuda"``): the
        same steps as torch tensor operations on that device (:func:`_follow_torch`), the
        same result on the CPU and identical to itself in every block on any device (a GPU
        may fuse multiply-adds, so its bits can differ from the CPU's).

    Returns
    -------
    disp : (N, ndim) ndarray, float32
        Final displacement of each trajectory, in voxels. The end voxel is
        ``starts + floor(disp)`` (:func:`end_points`).
    escaped : (N,) ndarray, bool
        True where the trajectory needed a flow value outside the block (a corner inside
        the volume but outside the block), or
        where its end voxel lies outside the block; the block's halo was too small for
        it. Such a trajectory stops at that step and its ``disp`` is clamped so that
        ``starts + disp`` lies in ``[0, B - 1]``; its value is meaningless. The end
        voxel of every trajectory therefore lies in the block. A trajectory that does
        not escape has the same ``disp``, bit for bit, in every block (any origin and
        extent) that it does not escape from.

    Notes
    -----
    A corner beyond the volume's border has weight 0 (``grid_sample``'s zero padding: at the
    first and last voxel of an axis half of the read is zero, as in Cellpose).
    The kernel is a numba ``prange`` loop over points (set threads with
    ``numba.set_num_threads``); all work of one trajectory stays in registers.

    A step is a fixed function of the displacement, so once a trajectory returns to a
    displacement it had ``p`` steps before, it repeats with period ``p`` to the end. The
    kernel detects such cycles (``p`` up to 16, Brent's method with a capped power) and
    jumps to the step with the same phase as step ``niter``. This is exact, not an
    approximation: the result is the one of all ``niter`` steps (up to the sign of a
    zero), and every displacement skipped was already sampled, so ``escaped`` does not
    change either. Most trajectories of Cellpose flows settle into a fixed point or a
    short cycle after a few dozen steps, so large ``niter`` costs little.
    """
    flow = np.ascontiguousarray(flow, dtype=np.float32)
    if flow.ndim not in (3, 4) or flow.shape[0] != flow.ndim - 1:
        raise ValueError(f"flow must have shape (ndim, *B) with ndim 2 or 3, got {flow.shape}")
    ndim = flow.shape[0]
    block = np.array(flow.shape[1:], dtype=np.int64)
    starts = np.asarray(starts)
    if starts.ndim != 2 or starts.shape[1] != ndim or not (
        np.issubdtype(starts.dtype, np.integer) or starts.shape[0] == 0
    ):
        raise ValueError(f"starts must be integers of shape (N, {ndim}), got {starts.shape} "
                         f"{starts.dtype}")
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    niter = _check_niter(niter)
    origin = _int_vector(origin, ndim, "origin")
    vshape = _int_vector(volume_shape, ndim, "volume_shape")
    if np.any(origin < 0) or np.any(origin + block > vshape):
        raise ValueError(f"block at origin {tuple(origin)} with shape {tuple(block)} does "
                         f"not lie inside the volume of shape {tuple(vshape)}")
    if starts.shape[0] and (np.any(starts < 0) or np.any(starts >= block)):
        raise ValueError(f"starts must lie inside the block of shape {tuple(block)}")
    n = starts.shape[0]
    disp = np.zeros((n, ndim), dtype=np.float32)
    escaped = np.zeros(n, dtype=np.bool_)
    if n == 0 or niter == 0:
        return disp, escaped
    if device is not None:
        return _follow_torch(flow, starts, niter, origin, vshape, device)
    kernel = _follow_3d if ndim == 3 else _follow_2d
    # Trajectories differ in cost (cycle skipping): hand out points in small chunks.
    previous = numba.set_parallel_chunksize(_CHUNK_POINTS)
    try:
        scale, shift = sampling(vshape)
        kernel(flow, starts, niter, origin, vshape, scale, shift, _MAX_PERIOD, disp, escaped)
    finally:
        numba.set_parallel_chunksize(previous)
    return disp, escaped


def _follow_torch(flow, starts, niter, origin, vshape, device):
    """:func:`follow_flows` as torch tensor operations, all trajectories advancing together.

    The arithmetic of one step is the numba kernel's, in the same order (sample position in
    float64, interpolate along the last axis, then the middle, then the first; clamp to the
    volume), so on the CPU the result is the kernel's bit for bit. A trajectory that needs a
    corner outside the block stops there (it escaped). No cycle skipping: every step is computed.
    """
    import torch

    dev = torch.device(device)
    nd = flow.shape[0]
    shape = flow.shape[1:]
    f = torch.from_numpy(flow).to(dev).reshape(nd, -1)
    s = torch.from_numpy(starts).to(dev)
    org = torch.from_numpy(origin).to(dev)
    vs = torch.from_numpy(vshape).to(dev)
    scale, shift = (torch.from_numpy(v).to(dev) for v in sampling(vshape))
    last = torch.tensor(shape, device=dev) - 1
    g_start = org + s
    g_float = g_start.to(torch.float64)
    lo = (-g_start).to(torch.float32)
    hi = (vs - 1 - g_start).to(torch.float32)
    strides = [int(np.prod(shape[k + 1:])) for k in range(nd)]
    d = torch.zeros(s.shape, dtype=torch.float32, device=dev)
    esc = torch.zeros(s.shape[0], dtype=torch.bool, device=dev)
    one = torch.tensor(1.0, dtype=torch.float32, device=dev)
    zero = torch.tensor(0.0, dtype=torch.float32, device=dev)
    for _ in range(niter):
        pos = (g_float + d.to(torch.float64)) * scale - shift
        fl = torch.floor(pos)
        u = (pos - fl).to(torch.float32)
        v = one - u
        fi = fl.to(torch.int64)
        a = fi - org
        b = a + 1
        lo_ok = fi >= 0
        hi_ok = fi + 1 <= vs - 1
        esc |= ((lo_ok & ((a < 0) | (a > last))) | (hi_ok & ((b < 0) | (b > last)))).any(dim=1)
        if bool(esc.all()):
            break
        v = torch.where(lo_ok, v, zero)
        a = torch.where(lo_ok, a, b)
        u = torch.where(hi_ok, u, zero)
        b = torch.where(hi_ok, b, a)
        a = torch.minimum(a.clamp(min=0), last)  # escaped rows: any index in range
        b = torch.minimum(b.clamp(min=0), last)
        corner = [(a[:, k], b[:, k]) for k in range(nd)]

        def at(c, idx):
            flat = sum(i * st for i, st in zip(idx, strides))
            return f[c][flat]

        g = []
        for c in range(nd):
            if nd == 3:
                (a0, b0), (a1, b1), (a2, b2) = corner
                c00 = at(c, (a0, a1, a2)) * v[:, 2] + at(c, (a0, a1, b2)) * u[:, 2]
                c01 = at(c, (a0, b1, a2)) * v[:, 2] + at(c, (a0, b1, b2)) * u[:, 2]
                c10 = at(c, (b0, a1, a2)) * v[:, 2] + at(c, (b0, a1, b2)) * u[:, 2]
                c11 = at(c, (b0, b1, a2)) * v[:, 2] + at(c, (b0, b1, b2)) * u[:, 2]
                g.append((c00 * v[:, 1] + c01 * u[:, 1]) * v[:, 0] + (c10 * v[:, 1] + c11 * u[:, 1]) * u[:, 0])
            else:
                (a0, b0), (a1, b1) = corner
                g.append((at(c, (a0, a1)) * v[:, 1] + at(c, (a0, b1)) * u[:, 1]) * v[:, 0]
                         + (at(c, (b0, a1)) * v[:, 1] + at(c, (b0, b1)) * u[:, 1]) * u[:, 0])
        step = torch.minimum(torch.maximum(d + torch.stack(g, dim=1), lo), hi)
        d = torch.where(esc[:, None], d, step)
    q = s + torch.floor(d).to(torch.int64)
    esc |= ((q < 0) | (q > last)).any(dim=1)
    d = torch.where(esc[:, None], torch.minimum(torch.maximum(d, (-s).to(torch.float32)), (last - s).to(torch.float32)), d)
    return d.cpu().numpy(), esc.cpu().numpy()


def end_points(starts: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """End voxel of each trajectory: ``starts + floor(disp)``.

    Parameters
    ----------
    starts : (N, ndim) ndarray, int
        Start voxels (any frame).
    disp : (N, ndim) ndarray, float32
        Displacements from :func:`follow_flows`.

    Returns
    -------
    (N, ndim) ndarray, int64
        End voxels in the frame of ``starts``. (Cellpose truncates the non-negative end
        position, which is the same voxel.)
    """
    starts = np.asarray(starts)
    disp = np.asarray(disp)
    if starts.shape != disp.shape:
        raise ValueError(f"starts {starts.shape} and disp {disp.shape} differ in shape")
    return starts.astype(np.int64) + np.floor(disp).astype(np.int64)


# --------------------------------------------------------------------------------------
# 3. histogram and seeds
# --------------------------------------------------------------------------------------


@njit(cache=True)
def _hist(flat, size):  # pragma: no cover
    h = np.zeros(size, dtype=np.int32)
    for j in range(flat.shape[0]):
        h[flat[j]] += 1
    return h


def histogram(points: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Count points per voxel.

    Parameters
    ----------
    points : (N, ndim) ndarray, int
        Voxel coordinates, each inside ``shape``.
    shape : ndim ints
        Shape of the histogram.

    Returns
    -------
    ndarray of ``shape``, int32
        Number of points in each voxel.

    Raises
    ------
    ValueError
        If a point lies outside ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != len(shape):
        raise ValueError(f"points must have shape (N, {len(shape)}), got {points.shape}")
    if points.shape[0] == 0:
        return np.zeros(shape, dtype=np.int32)
    if np.any(points < 0) or np.any(points >= np.array(shape)):
        raise ValueError(f"points lie outside the histogram shape {shape}")
    flat = np.ravel_multi_index(tuple(points.T), shape)
    return _hist(flat, int(np.prod(shape))).reshape(shape)


def _as3d(a: np.ndarray) -> np.ndarray:
    """View a 2D array as 3D with a leading axis of length 1."""
    return a[np.newaxis] if a.ndim == 2 else a


def _points3d(p: np.ndarray) -> np.ndarray:
    """(N, 2) or (N, 3) int64 points as (N, 3), with z = 0 for 2D."""
    p = np.ascontiguousarray(p, dtype=np.int64)
    if p.shape[1] == 2:
        p = np.ascontiguousarray(np.concatenate([np.zeros((len(p), 1), np.int64), p], axis=1))
    return p


@njit(parallel=True, cache=True)
def _is_local_max(h, cand, half, out):  # pragma: no cover
    Z, Y, X = h.shape
    for k in prange(cand.shape[0]):
        z, y, x = cand[k, 0], cand[k, 1], cand[k, 2]
        v = h[z, y, x]
        ok = True
        for zz in range(max(z - half, 0), min(z + half + 1, Z)):
            for yy in range(max(y - half, 0), min(y + half + 1, Y)):
                for xx in range(max(x - half, 0), min(x + half + 1, X)):
                    if h[zz, yy, xx] > v:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        out[k] = ok


def _normalise_within(within, shape) -> tuple[slice, ...]:
    if within is None:
        return tuple(slice(0, s) for s in shape)
    within = tuple(within)
    if len(within) != len(shape) or not all(isinstance(s, slice) for s in within):
        raise ValueError(f"within must be {len(shape)} slices, got {within!r}")
    out = []
    for s, n in zip(within, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"within slices must have step 1, got {s!r}")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def find_seeds(h: np.ndarray, *, within: tuple[slice, ...] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Seeds of masks: local maxima of the end-point histogram (as Cellpose).

    A voxel is a seed if its count is > ``SEED_MIN_COUNT`` (10) and equals the maximum
    of the ``5^ndim`` window centred on it (the window is clipped at the array's edge).

    Parameters
    ----------
    h : (\\*S) ndarray, int
        End-point histogram (:func:`histogram`), ndim 2 or 3.
    within : tuple of ndim slices, optional, keyword-only
        Only voxels in this region may be seeds (the window still looks outside it).
        Default: the whole array.

    Returns
    -------
    seeds : (K, ndim) ndarray, int64
        Seed voxels in the frame of ``h``, in C order of position.
    counts : (K,) ndarray, int32
        Histogram count at each seed.
    """
    h = np.asarray(h)
    if h.ndim not in (2, 3) or not np.issubdtype(h.dtype, np.integer):
        raise ValueError(f"h must be a 2D or 3D integer array, got {h.ndim}D {h.dtype}")
    region = _normalise_within(within, h.shape)
    sub = h[region]
    cand = np.argwhere(sub > SEED_MIN_COUNT).astype(np.int64)
    cand += np.array([s.start for s in region], dtype=np.int64)
    if cand.shape[0] == 0:
        return np.zeros((0, h.ndim), np.int64), np.zeros(0, np.int32)
    h3 = np.ascontiguousarray(_as3d(h), dtype=np.int32)
    ok = np.zeros(cand.shape[0], dtype=np.bool_)
    _is_local_max(h3, _points3d(cand), SEED_WINDOW // 2, ok)
    seeds = cand[ok]
    counts = h[tuple(seeds.T)].astype(np.int32)
    return seeds, counts


# --------------------------------------------------------------------------------------
# 4. regions around seeds
# --------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _grow(h, seeds, hz, thr, niter, out):  # pragma: no cover
    # Rows along the last axis are REGION_WINDOW-bit masks; a dilation by the full 3^ndim
    # neighbourhood is a shift-or along x followed by ORs of neighbouring rows.
    Z, Y, X = h.shape
    W = REGION_WINDOW
    wz = 2 * hz + 1
    full = (1 << W) - 1
    for k in prange(seeds.shape[0]):
        allowed = np.zeros((wz, W), dtype=np.int64)
        for a in range(wz):
            z = seeds[k, 0] + a - hz
            if z < 0 or z >= Z:
                continue
            for b in range(W):
                y = seeds[k, 1] + b - _RH
                if y < 0 or y >= Y:
                    continue
                m = 0
                for c in range(W):
                    x = seeds[k, 2] + c - _RH
                    if x >= 0 and x < X and h[z, y, x] > thr:
                        m |= 1 << c
                allowed[a, b] = m
        cur = np.zeros((wz, W), dtype=np.int64)
        cur[hz, _RH] = 1 << _RH
        rowx = np.zeros((wz, W), dtype=np.int64)
        rowy = np.zeros((wz, W), dtype=np.int64)
        for _ in range(niter):
            for a in range(wz):
                for b in range(W):
                    r = cur[a, b]
                    rowx[a, b] = (r | (r << 1) | (r >> 1)) & full
            for a in range(wz):
                for b in range(W):
                    r = rowx[a, b]
                    if b > 0:
                        r |= rowx[a, b - 1]
                    if b < W - 1:
                        r |= rowx[a, b + 1]
                    rowy[a, b] = r
            for a in range(wz):
                for b in range(W):
                    r = rowy[a, b]
                    if a > 0:
                        r |= rowy[a - 1, b]
                    if a < wz - 1:
                        r |= rowy[a + 1, b]
                    cur[a, b] = r & allowed[a, b]
        for a in range(wz):
            for b in range(W):
                r = cur[a, b]
                for c in range(W):
                    out[k, a, b, c] = ((r >> c) & 1) != 0


def grow_seeds(h: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Grow each seed over the populated histogram bins around it (as Cellpose).

    For each seed, take the ``11^ndim`` window of ``h`` centred on it (bins outside
    ``h`` count 0); start from the centre; ``GROW_ITERATIONS`` (5) times, dilate by the
    full ``3^ndim`` neighbourhood (nothing outside the window) and keep only bins with
    count > ``GROW_MIN_COUNT`` (2).

    Parameters
    ----------
    h : (\\*S) ndarray, int
        End-point histogram, ndim 2 or 3.
    seeds : (K, ndim) ndarray, int
        Seed voxels in the frame of ``h`` (inside ``h``).

    Returns
    -------
    regions : (K, 11, 11[, 11]) ndarray, bool
        Region of each seed in its window; ``regions[k][5, 5(, 5)]`` is the seed.
    """
    h = np.asarray(h)
    if h.ndim not in (2, 3):
        raise ValueError(f"h must be 2D or 3D, got {h.ndim}D")
    seeds = np.asarray(seeds)
    if seeds.ndim != 2 or seeds.shape[1] != h.ndim:
        raise ValueError(f"seeds must have shape (K, {h.ndim}), got {seeds.shape}")
    k = seeds.shape[0]
    out = np.zeros((k,) + (REGION_WINDOW,) * h.ndim, dtype=np.bool_)
    if k == 0:
        return out
    if np.any(seeds < 0) or np.any(seeds >= np.array(h.shape)):
        raise ValueError(f"seeds must lie inside h of shape {h.shape}")
    h3 = np.ascontiguousarray(_as3d(h), dtype=np.int32)
    hz = _RH if h.ndim == 3 else 0
    out3 = out if h.ndim == 3 else out[:, np.newaxis]
    _grow(h3, _points3d(seeds), hz, GROW_MIN_COUNT, GROW_ITERATIONS, out3)
    return out


@njit(cache=True)
def _paint(out, origin, seeds, regions, labels, order, hz):  # pragma: no cover
    Z, Y, X = out.shape
    wz = regions.shape[1]
    W = regions.shape[2]
    for j in range(order.shape[0]):
        k = order[j]
        z0 = seeds[k, 0] - hz - origin[0]
        y0 = seeds[k, 1] - _RH - origin[1]
        x0 = seeds[k, 2] - _RH - origin[2]
        lab = labels[k]
        for a in range(wz):
            z = z0 + a
            if z < 0 or z >= Z:
                continue
            for b in range(W):
                y = y0 + b
                if y < 0 or y >= Y:
                    continue
                for c in range(W):
                    x = x0 + c
                    if x >= 0 and x < X and regions[k, a, b, c]:
                        out[z, y, x] = lab


def paint_regions(
    shape: Sequence[int],
    origin: Sequence[int],
    seeds: np.ndarray,
    regions: np.ndarray,
    labels: np.ndarray,
    priority: np.ndarray,
) -> np.ndarray:
    """Paint seed regions into a box, the highest priority on top.

    Parameters
    ----------
    shape : ndim ints
        Shape of the box to paint.
    origin : ndim ints
        Volume coordinates of the box's first voxel.
    seeds : (K, ndim) ndarray, int
        Seed voxels in *volume* coordinates (centre of each region's window).
    regions : (K, 11, 11[, 11]) ndarray, bool
        Regions from :func:`grow_seeds`; the parts outside the box are dropped.
    labels : (K,) ndarray, unsigned or signed int
        Label of each seed; sets the output dtype.
    priority : (K,) ndarray
        Regions are painted in ascending ``priority`` (stable sort: among equal
        priorities the later seed is painted last), so where regions overlap the
        highest priority wins. Cellpose gives an overlapped bin to the seed with the
        larger histogram count; pass the counts, or counts with ties broken by order.

    Returns
    -------
    ndarray of ``shape``, ``labels.dtype``
        Label per histogram bin, 0 where no region reaches.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim not in (2, 3):
        raise ValueError(f"shape must be 2D or 3D, got {shape}")
    origin = _int_vector(origin, ndim, "origin")
    seeds = np.asarray(seeds)
    labels = np.asarray(labels)
    priority = np.asarray(priority)
    regions = np.asarray(regions, dtype=np.bool_)
    k = seeds.shape[0] if seeds.ndim == 2 else -1
    if (seeds.ndim != 2 or seeds.shape[1] != ndim
            or regions.shape != (k,) + (REGION_WINDOW,) * ndim
            or labels.shape != (k,) or priority.shape != (k,)):
        raise ValueError(
            f"inconsistent seeds {seeds.shape}, regions {regions.shape}, labels "
            f"{labels.shape}, priority {priority.shape} for a {ndim}D box")
    out = np.zeros(shape, dtype=labels.dtype)
    if k == 0:
        return out
    order = np.argsort(priority, kind="stable").astype(np.int64)
    hz = _RH if ndim == 3 else 0
    regions3 = np.ascontiguousarray(regions if ndim == 3 else regions[:, np.newaxis])
    origin3 = origin if ndim == 3 else np.concatenate([[0], origin]).astype(np.int64)
    _paint(_as3d(out), origin3, _points3d(seeds), regions3,
           np.ascontiguousarray(labels), order, hz)
    return out


# --------------------------------------------------------------------------------------
# 5. clean-up and the whole-volume reference
# --------------------------------------------------------------------------------------


def size_limits(sizes: np.ndarray, min_size: int, max_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Which cells of voxel counts ``sizes`` are too small and which too large (Cellpose's rule:
    fewer than ``min_size`` voxels when ``min_size > 0``; more than ``max_size`` when given).
    The one copy of the rule: the whole-volume reference and the chunked finalize both use it."""
    sizes = np.asarray(sizes)
    small = sizes < min_size if min_size > 0 else np.zeros(sizes.shape, bool)
    large = sizes > max_size if max_size is not None else np.zeros(sizes.shape, bool)
    return small, large


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill the enclosed voids of each label over whatever lies in them: Cellpose's
    ``fill_holes_and_remove_small_masks`` fill, in 2D and 3D alike.

    For each label in ascending order, within its bounding box (the labels' boxes before any
    fill), the voids its mask encloses (``fill_voids.fill``, true N-D) as that mask is when its
    turn comes (after the fills of the labels before it) are filled with the label, so a cell
    enclosed by another disappears into it.

    Parameters
    ----------
    labels : (\\*S) ndarray, int
        Label image, ndim 2 or 3, 0 = background.

    Returns
    -------
    ndarray like ``labels``
        A new array with the holes filled.
    """
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be 2D or 3D, got {labels.ndim}D")
    out = labels.copy()
    if not out.any():
        return out
    compact, mapping = fastremap.renumber(labels, preserve_zero=True, in_place=False)
    slices = scipy.ndimage.find_objects(compact)
    for old in sorted(int(v) for v in mapping if v != 0):
        view = out[slices[mapping[old] - 1]]
        view[fill_voids.fill(view == old, in_place=False)] = old
    return out


def filled_over(labels: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What Cellpose's hole filling (:func:`fill_holes`) takes from other cells:
    for each label ``j`` of ``ids`` present in ``labels``, the voids its own mask encloses (in its
    box) and the voxels of other labels in them.

    Returns ``(over, by, count)``: label ``over[i]`` loses ``count[i]`` voxels to label ``by[i]``.
    """
    over, by, count = [], [], []
    compact, mapping = fastremap.renumber(np.asarray(labels), preserve_zero=True, in_place=False)
    slices = scipy.ndimage.find_objects(compact)
    for j in sorted(int(v) for v in ids):
        if j not in mapping or j == 0:
            continue
        slc = slices[mapping[j] - 1]
        msk = compact[slc] == mapping[j]
        hole = fill_voids.fill(msk, in_place=False) & ~msk
        inside = np.asarray(labels)[slc][hole]
        u, c = fastremap.unique(inside[inside != 0], return_counts=True)
        over += [int(x) for x in u]
        by += [j] * len(u)
        count += [int(x) for x in c]
    return np.asarray(over, np.int64), np.asarray(by, np.int64), np.asarray(count, np.int64)


def _drop(labels: np.ndarray, which: np.ndarray) -> np.ndarray:
    """``labels`` with the labels ``i`` where ``which[i]`` set to 0 (``which``: one flag per
    label 0..k; the background stays as it is)."""
    which = np.asarray(which, bool).copy()
    which[0] = False
    if not which.any():
        return labels
    lut = np.arange(len(which), dtype=labels.dtype)
    lut[which] = 0
    return lut[labels]


def compute_masks(
    dP: np.ndarray,
    cellprob: np.ndarray,
    *,
    cellprob_threshold: float = 0.0,
    niter: int = 200,
    flow3D_smooth: float | Sequence[float] = 0,
    min_size: int = 15,
    max_size: int | None = None,
    flow_threshold: float = 0.0,
    seed_allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Labels of a whole volume from flows: the reference for chunked runs.

    Built only from this module's steps, on one block that is the whole volume:
    :func:`prepare_flows` → :func:`follow_flows` of every foreground voxel →
    :func:`end_points` → :func:`histogram` → :func:`find_seeds` (seed ``k`` in C order
    of position gets label ``k + 1``) → :func:`grow_seeds` → :func:`paint_regions` with
    priority (count, C-order index) → each foreground voxel takes the painted label at
    its end point → labels with more than ``max_size`` voxels are dropped → (2D, with
    ``flow_threshold``) labels whose flow error exceeds it are dropped → labels with fewer than
    ``min_size`` voxels are dropped → :func:`fill_holes` (over the cells the holes hold, as
    Cellpose fills them, then ``min_size`` again on what is left) → labels renumbered 1..N in
    ascending order. That is Cellpose's order: ``get_masks`` drops the large masks, then
    ``remove_bad_flow_masks``, then ``fill_holes_and_remove_small_masks``.

    Parameters
    ----------
    dP : (ndim, \\*S) ndarray, float16 or float32
        Flows in Cellpose's convention (see :func:`prepare_flows`).
    cellprob : (\\*S) ndarray, float
        Cell-probability logits.
    cellprob_threshold : float, keyword-only
        Foreground is ``cellprob > cellprob_threshold``.
    niter : int, keyword-only
        Flow steps per voxel.
    flow3D_smooth : float or ndim floats, keyword-only
        Gaussian sigma(s) in voxels applied to the flows first; 0 = off.
    min_size : int, keyword-only
        Drop labels with fewer voxels (before hole filling); 0 or -1 keeps all.
    max_size : int or None, keyword-only
        Drop labels with more voxels; None keeps all. (Cellpose's
        ``max_size_fraction=0.4`` is ``max_size = 0.4 * volume size``, but relative
        to the array it sees, which is why zseg takes an absolute size.)
    flow_threshold : float, keyword-only
        2D only (Cellpose applies it to 2D masks only): drop labels whose flow error
        (:func:`zseg.engine.flow_error.flow_errors`, with the image's own ``niter`` and
        precision) is above it; 0 (default) = off. Cellpose's 2D default is 0.4.
    seed_allowed : (\\*S) bool ndarray, optional
        Where seeds may lie (the multiplex track's informative patches): a cell whose seed
        lies where this is False is removed whole, last, after the size, flow and hole
        decisions, so every other cell is exactly the cell of the run without it.

    Returns
    -------
    (\\*S) ndarray, uint32 (uint64 for more than 2**32 - 1 cells)
        Labels 1..N, 0 = background.
    """
    dP = np.asarray(dP)
    cellprob = np.asarray(cellprob)
    _check_flows(dP, cellprob)
    niter = _check_niter(niter)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < -1:
        raise ValueError(f"min_size={min_size!r}: give a voxel count >= 0, or -1 to keep "
                        "cells of any size.")
    if max_size is not None and (isinstance(max_size, bool)
                                 or not isinstance(max_size, (int, np.integer)) or max_size < 1):
        raise ValueError(f"max_size={max_size!r}: give a voxel count >= 1, or None for no "
                        "upper limit.")
    if not (flow_threshold >= 0 and math.isfinite(flow_threshold)):
        raise ValueError(f"flow_threshold={flow_threshold!r}: give 0 (off) or more.")
    if flow_threshold > 0 and cellprob.ndim != 2:
        raise ValueError("flow_threshold applies to 2D images only (Cellpose's 3D masks have no flow QC).")
    shape = cellprob.shape
    if seed_allowed is not None and np.shape(seed_allowed) != shape:
        raise ValueError(f"seed_allowed {np.shape(seed_allowed)} must have the image's shape {shape}")
    ndim = len(shape)
    flow, fg = prepare_flows(dP, cellprob, cellprob_threshold=cellprob_threshold,
                             flow3D_smooth=flow3D_smooth)
    starts = np.argwhere(fg).astype(np.int64)
    zeros = np.zeros(ndim, np.int64)
    disp, escaped = follow_flows(flow, starts, niter=niter, origin=zeros, volume_shape=shape)
    if escaped.any():  # the block is the volume: nothing can escape
        raise RuntimeError("a trajectory escaped the whole volume; this is a bug in zseg")
    ends = end_points(starts, disp)
    h = histogram(ends, shape)
    seeds, counts = find_seeds(h)
    k = seeds.shape[0]
    dtype = np.uint32 if k <= np.iinfo(np.uint32).max else np.uint64
    if k == 0:
        return np.zeros(shape, dtype=np.uint32)
    regions = grow_seeds(h, seeds)
    ids = np.arange(1, k + 1, dtype=dtype)
    painted = paint_regions(shape, zeros, seeds, regions, ids, counts)
    labels = np.zeros(shape, dtype=dtype)
    labels[fg] = painted[tuple(ends.T)]
    sizes = np.bincount(labels.ravel(), minlength=k + 1)
    small, large = size_limits(sizes, min_size, max_size)
    labels = _drop(labels, large)
    drop = small.copy()
    if flow_threshold > 0 and labels.any():
        boxes = label_boxes(labels)
        fe_niter, f32 = diffusion_settings(shape, int(boxes.extents().max()) + 2)
        ids, err = flow_errors(labels, dP, niter=fe_niter, float32=f32, boxes=boxes)
        drop[ids[err > flow_threshold].astype(np.intp)] = True
    labels = fill_holes(_drop(labels, drop))
    if min_size > 0:  # Cellpose's second pass: a cell partly filled over may now be too small
        after = np.bincount(labels.ravel(), minlength=k + 1)
        labels = _drop(labels, (after > 0) & (after < min_size))
    if seed_allowed is not None:
        labels = _drop(labels, np.r_[False, ~np.asarray(seed_allowed, bool)[tuple(seeds.T)]])
    present = np.zeros(k + 1, dtype=bool)
    present[labels.ravel()] = True
    present[0] = False
    n = int(present.sum())
    out_dtype = np.uint32 if n <= np.iinfo(np.uint32).max else np.uint64
    lut = np.zeros(k + 1, dtype=out_dtype)
    lut[present] = np.arange(1, n + 1, dtype=out_dtype)
    return lut[labels]
