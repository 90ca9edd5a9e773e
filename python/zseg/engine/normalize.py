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
* **Invert** (``--invert``, Cellpose's ``invert``): after the above, ``1 - x`` on every channel
  that was normalised (a channel set to 0 for lack of signal stays 0, as in Cellpose).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PLANE_MIN_RANGE", "Normalization", "normalize"]

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
    """

    lowhigh: np.ndarray
    planes: np.ndarray | None = None
    varies: np.ndarray | None = None
    invert: bool = False

    @classmethod
    def of(cls, norm) -> Normalization:
        """``norm`` itself, or the global normalisation of a ``(C, 2)`` lowhigh."""
        return norm if isinstance(norm, Normalization) else cls(np.asarray(norm, np.float64).reshape(-1, 2))

    def apply(self, data: np.ndarray, z0: int = 0) -> np.ndarray:
        """``(C, z, ...)`` voxels of the volume's planes ``z0 .. z0 + z`` -> float32, normalised."""
        if self.planes is None:
            return normalize(data, self.lowhigh, invert=self.invert)
        nz = data.shape[1]
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

    def empty(self, data: np.ndarray, z0: int = 0) -> bool:
        """Whether every voxel of ``data`` (planes from ``z0``) normalises to no signal: at or
        below its low (with ``invert``: at or above its high), so the network sees nothing."""
        flat = data.reshape(data.shape[0], data.shape[1], -1)
        if self.planes is None:
            lo, hi = self.lowhigh[:, 0][:, None], self.lowhigh[:, 1][:, None]
        else:
            p = self.planes[z0 : z0 + data.shape[1]]
            lo, hi = p[:, :, 0].T, p[:, :, 1].T
        if self.invert:
            return bool(np.all(flat.min(axis=2).astype(np.float64) >= hi))
        return bool(np.all(flat.max(axis=2).astype(np.float64) <= lo))
