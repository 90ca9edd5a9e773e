"""Cellpose's intensity normalisation of a block, decided for the whole volume (numpy only).

Cellpose's ``normalize_img`` maps each channel to ``(x - low) / (high - low)``. Which ``low``
and ``high`` a voxel gets is what the ``percentiles`` phase decides once for the volume, so a
block is normalised exactly as the whole volume would be, whatever the chunking:

* **Global** (default; Cellpose 3D's ``norm3D=True`` with ``lowhigh``): one ``(low, high)`` per
  channel. A channel whose high is not above its low carries no signal and becomes 0, as
  Cellpose sets a channel it cannot normalise.
* **Per plane** (``--norm-per-plane``; Cellpose's ``normalize={"norm3D": False}``, each Z plane
  run through ``normalize99``): each plane has its own percentiles, computed as Cellpose
  computes them on the plane converted to float32 (float32 values and arithmetic,
  :func:`zseg.engine.percentiles.percentile_float32`). A plane whose ``high - low`` is not above
  1e-3 becomes 0 (``normalize99``). A channel none of whose planes varies is 0 everywhere.
  One difference from Cellpose: Cellpose leaves a *constant* plane of a channel that varies
  elsewhere at its raw value (``normalize99`` is not called on it); zseg sets it to 0, like
  any plane ``normalize99`` cannot stretch. An all-zero plane (padding) is 0 either way.
* **Tiles** (``--tile-norm-blocksize B``; Cellpose's ``tile_norm_blocksize``, which its 3D run
  applies with ``norm3D=True``): each plane is cut into Cellpose's grid of overlapping ``B``-pixel
  tiles (:func:`norm_tiles`, fixed by the plane's size, so the same for every chunk), each
  (plane, tile, channel) gets its own float32 percentiles, tiles with ``high - low < 1e-3`` take
  their nearest good tile's values (:func:`fill_tiles`), and the grid is smoothed and averaged
  over Z exactly as ``normalize99_tile`` does (:func:`tile_grid`: a Gaussian of sigma 1 along Z
  and the tile rows, the rows once more, the mean over Z; Cellpose's order, tile columns
  unsmoothed). A voxel's low and high are that grid resized linearly to the plane
  (OpenCV's rule, :func:`tile_field`, for just the voxels a block holds), and it becomes
  ``(x - low) / (high - low)`` in float32. A channel whose every tile is flat gets low 0, high 1.
* **Invert** (``--invert``, Cellpose's ``invert``): after the above, ``1 - x`` on every channel
  that was normalised (a channel set to 0 for lack of signal stays 0, as in Cellpose).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

from zseg.engine.interp import taps

__all__ = ["PLANE_MIN_RANGE", "Normalization", "normalize", "norm_tiles", "fill_tiles", "tile_grid", "tile_field"]

#: ``normalize99``'s smallest ``high - low`` that is stretched; a plane with less becomes 0.
PLANE_MIN_RANGE = 1e-3


def normalize(data: np.ndarray, lowhigh, *, invert: bool = False) -> np.ndarray:
    """Cellpose's fixed normalisation ``(x - low) / (high - low)`` per channel, in float32.

    Parameters
    ----------
    data : (C, ...) ndarray, any real dtype
    lowhigh : (C, 2) array-like of float
        Global low and high values per channel (the percentiles phase's result). A channel
        whose high is not above its low becomes 0.
    invert : bool
        ``1 - x`` afterwards on each channel that was normalised.

    Returns
    -------
    (C, ...) ndarray of float32 (a new array; ``data`` is not modified)
    """
    lh = np.asarray(lowhigh, dtype=np.float64).reshape(-1, 2)
    if lh.shape[0] != data.shape[0]:
        raise ValueError(f"lowhigh has {lh.shape[0]} channels, the data {data.shape[0]}")
    out = data.astype(np.float32, copy=True)
    for c, (lo, hi) in enumerate(lh):
        if not hi > lo:
            out[c] = 0
            continue
        # float64 scalars, in-place float32 results: the arithmetic of Cellpose's normalize_img
        np.subtract(out[c], np.float64(lo), out=out[c])
        np.divide(out[c], np.float64(hi - lo), out=out[c])
        if invert:
            np.subtract(1, out[c], out=out[c])
    return out


# -- tile normalisation (Cellpose's normalize99_tile with norm3D=True) ---------------------------
def norm_tiles(n: int, blocksize: int) -> tuple[np.ndarray, int]:
    """Starts and size of Cellpose's normalisation tiles along an axis of ``n`` pixels: tiles of
    ``min(blocksize, n)`` at ``linspace(0, n - size, k)``, ``k = ceil(1.2 n / blocksize)`` (one
    when the axis fits a tile)."""
    if n < 1 or blocksize < 1:
        raise ValueError(f"axis {n} and blocksize {blocksize} must be >= 1")
    size = min(blocksize, n)
    k = 1 if n <= blocksize else int(np.ceil((1.0 + 2 * 0.1) * n / blocksize))
    return np.linspace(0, n - size, k).astype(int), size


def fill_tiles(low: np.ndarray, high: np.ndarray) -> None:
    """One plane's ``(ny, nx, C)`` tile percentiles, in place: a tile whose range is under 1e-3
    takes the values of its nearest good tile (the first in C order among equals); a channel
    with no good tile gets 0 and 1."""
    for c in range(low.shape[2]):
        bad = high[:, :, c] - low[:, :, c] < 1e-3
        n = int(bad.sum())
        if 0 < n < bad.size:
            fy, fx = np.nonzero(bad)
            gy, gx = np.nonzero(~bad)
            near = ((fy - gy[:, None]) ** 2 + (fx - gx[:, None]) ** 2).argmin(axis=0)
            low[fy, fx, c] = low[gy[near], gx[near], c]
            high[fy, fx, c] = high[gy[near], gx[near], c]
        elif n == bad.size:
            low[:, :, c] = 0
            high[:, :, c] = 1


def tile_grid(planes: np.ndarray) -> np.ndarray:
    """``(Z, ny, nx, C)`` float32 filled tile percentiles of every plane -> the ``(ny, nx, C)``
    grid every plane is normalised with: smoothed (sigma 1) along Z, then the tile rows, then the
    rows again, and averaged over Z, as ``normalize99_tile(norm3D=True)`` does."""
    x = np.ascontiguousarray(planes, dtype=np.float32)
    for axis in (0, 1, 1):
        x = gaussian_filter1d(x, 1, axis=axis)
    return x.mean(axis=0)


def tile_field(grid: np.ndarray, plane: tuple[int, int], ys: slice, xs: slice) -> np.ndarray:
    """The ``(C, y, x)`` float32 values of the ``(ny, nx, C)`` ``grid`` resized linearly to the whole
    ``plane`` (OpenCV's ``resize``: X first, then Y), for the pixels ``ys``, ``xs`` only."""
    ny, nx = grid.shape[:2]
    i0, i1, w0, w1 = taps(nx, plane[1], xs.start, xs.stop, horizontal=True)
    g = grid[:, i0] * w0[None, :, None] + grid[:, i1] * w1[None, :, None]
    i0, i1, w0, w1 = taps(ny, plane[0], ys.start, ys.stop)
    f = g[i0] * w0[:, None, None] + g[i1] * w1[:, None, None]
    return np.ascontiguousarray(np.moveaxis(f, 2, 0))


@dataclass(frozen=True)
class Normalization:
    """How every voxel of the volume is normalised (module notes).

    Attributes
    ----------
    lowhigh : (C, 2) ndarray of float64
        The global low and high per channel (used unless ``planes`` is given).
    planes : (Z, C, 2) ndarray of float64 or None
        Per plane of the whole volume, its low and high (float32 values), for ``--norm-per-plane``.
    varies : (C,) ndarray of bool or None
        With ``planes``: whether some plane of the channel is not constant (else it is all 0).
    invert : bool
    tiles : (ny, nx, C, 2) ndarray of float32 or None
        For ``--tile-norm-blocksize``: :func:`tile_grid`'s low and high.
    plane : (Y, X) or None
        With ``tiles``: the size of the volume's planes.
    """

    lowhigh: np.ndarray
    planes: np.ndarray | None = None
    varies: np.ndarray | None = None
    invert: bool = False
    tiles: np.ndarray | None = None
    plane: tuple[int, int] | None = None

    @classmethod
    def of(cls, norm) -> Normalization:
        """``norm`` itself, or the global normalisation of a ``(C, 2)`` lowhigh."""
        return norm if isinstance(norm, Normalization) else cls(np.asarray(norm, np.float64).reshape(-1, 2))

    def apply(self, data: np.ndarray, origin=(0, 0, 0)) -> np.ndarray:
        """``(C, z, y, x)`` voxels of the volume from ``origin`` (Z, Y, X) -> float32, normalised."""
        if self.tiles is not None:
            low, high = self._field(data, origin)
            out = data.astype(np.float32, copy=True)
            out -= low[:, None]
            out /= (high - low)[:, None]
            if self.invert:
                np.subtract(1, out, out=out)
            return out
        if self.planes is None:
            return normalize(data, self.lowhigh, invert=self.invert)
        z0, nz = int(origin[0]), data.shape[1]
        planes = self.planes[z0 : z0 + nz]
        if planes.shape[0] != nz or planes.shape[1] != data.shape[0]:
            raise ValueError(f"planes {z0}..{z0 + nz} x {data.shape[0]} channels are not all in the "
                             f"normalisation's {self.planes.shape[0]} x {self.planes.shape[1]}")
        out = data.astype(np.float32, copy=True)
        for c in range(data.shape[0]):
            if not self.varies[c]:
                out[c] = 0
                continue
            for k in range(nz):
                lo, hi = np.float32(planes[k, c, 0]), np.float32(planes[k, c, 1])
                if hi - lo > np.float32(PLANE_MIN_RANGE):  # normalize99, in its float32 arithmetic
                    np.subtract(out[c, k], lo, out=out[c, k])
                    np.divide(out[c, k], hi - lo, out=out[c, k])
                else:
                    out[c, k] = 0
            if self.invert:
                np.subtract(1, out[c], out=out[c])
        return out

    def _field(self, data: np.ndarray, origin):
        ys = slice(int(origin[1]), int(origin[1]) + data.shape[2])
        xs = slice(int(origin[2]), int(origin[2]) + data.shape[3])
        return tile_field(self.tiles[..., 0], self.plane, ys, xs), tile_field(self.tiles[..., 1], self.plane, ys, xs)

    def empty(self, data: np.ndarray, origin=(0, 0, 0)) -> bool:
        """Whether every voxel of ``data`` (from ``origin``) normalises to no signal: at or below
        its low (with ``invert``: at or above its high), so the network sees nothing."""
        if self.tiles is not None:
            low, high = self._field(data, origin)
            if self.invert:
                return bool(np.all(data >= high[:, None]))
            return bool(np.all(data <= low[:, None]))
        flat = data.reshape(data.shape[0], data.shape[1], -1)
        if self.planes is None:
            lo, hi = self.lowhigh[:, 0][:, None], self.lowhigh[:, 1][:, None]
        else:
            p = self.planes[int(origin[0]) : int(origin[0]) + data.shape[1]]
            lo, hi = p[:, :, 0].T, p[:, :, 1].T
        if self.invert:
            return bool(np.all(flat.min(axis=2).astype(np.float64) >= hi))
        return bool(np.all(flat.max(axis=2).astype(np.float64) <= lo))
