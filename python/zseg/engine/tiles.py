"""Cellpose's tiling of a 2D plane, one axis at a time, in the coordinates of the whole plane.

Cellpose runs its network on square tiles of ``bsize`` pixels. A plane of ``n`` pixels along
an axis is first zero-padded (:func:`plane_padding`): 8 pixels on each side, then up to a
multiple of 16, or up to ``bsize`` when the axis is shorter. The padded axis of ``p`` pixels
is covered by ``k`` tiles whose starts are ``linspace(0, p - bsize, k)`` truncated to
integers (:func:`tile_starts`), with ``k = 1`` when ``p <= bsize`` and
``ceil((1 + 2 * tile_overlap) * p / bsize)`` otherwise (``augment``: ``max(2, ceil(2p / bsize))``,
tiles overlapping by half). Outputs of overlapping tiles are averaged with the weights of a
sigmoid taper (:func:`taper`) that falls off over the outer ~20 pixels of a tile.

Padding, tile count and tile starts of an axis depend on nothing but the axis length of the
*whole* plane, the tile size and the overlap, and the tiles of a plane are the product of its
two axes' tiles. :class:`AxisTiles` holds one axis's tiles in the plane's own (unpadded)
coordinates, so a block of a large volume can pick exactly the tiles of the whole-volume run
that cover it (:meth:`AxisTiles.covering`) and blend them with the same weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["AxisTiles", "plane_padding", "tile_starts", "taper"]

#: Cellpose pads each plane axis to a multiple of this ...
PAD_MULTIPLE = 16
#: ... after adding half of this on each side.
PAD_EXTRA = 16
#: Width of the taper's fall-off region (pixels from a tile's edge) and its softness.
TAPER_MARGIN = 20
TAPER_SIGMA = 7.5


def plane_padding(n: int, bsize: int, *, pad_to_tile: bool = True) -> tuple[int, int]:
    """Zeros Cellpose adds before and after an axis of ``n`` pixels of a plane.

    ``pad_to_tile=False`` is Cellpose 3's padding: never up to ``bsize``; an axis shorter
    than a tile then gets a tile as long as the padded axis.

    Parameters
    ----------
    n : int
        Axis length of the whole plane (network scale), >= 1.
    bsize : int
        Tile size in pixels.

    Returns
    -------
    (before, after) : tuple of int
    """
    if n >= bsize or not pad_to_tile:
        extra = PAD_MULTIPLE * math.ceil(n / PAD_MULTIPLE) - n
    else:
        extra = max(0, bsize - n - PAD_EXTRA)
    half = PAD_EXTRA // 2
    return half + extra // 2, half + extra - extra // 2


def tile_starts(padded: int, bsize: int, *, tile_overlap: float = 0.1, augment: bool = False) -> np.ndarray:
    """Starts of Cellpose's tiles along a padded axis of ``padded`` pixels (padded coordinates).

    Parameters
    ----------
    padded : int
        Padded axis length, >= ``bsize`` (:func:`plane_padding` guarantees it).
    bsize : int
        Tile size in pixels.
    tile_overlap : float
        Fraction of a tile shared with its neighbour, in [0.05, 0.5] (ignored with ``augment``).
    augment : bool
        Cellpose's test-time augmentation: tiles overlap by half.

    Returns
    -------
    (k,) ndarray of int64, ascending; the last tile ends at ``padded``.
    """
    if padded < bsize:
        raise ValueError(f"a padded axis ({padded}) is never shorter than a tile ({bsize})")
    if augment:
        k = max(2, int(np.ceil(2.0 * padded / bsize)))
    elif padded <= bsize:
        k = 1
    else:
        k = int(np.ceil((1.0 + 2 * tile_overlap) * padded / bsize))
    return np.linspace(0, padded - bsize, k).astype(int).astype(np.int64)


def taper(bsize: int) -> np.ndarray:
    """One axis of Cellpose's tile weights; the 2D weights are ``outer(taper, taper)``.

    Returns
    -------
    (bsize,) ndarray of float64, in (0, 1], symmetric, close to 1 away from the edges.
    """
    full = max(224, bsize)  # Cellpose builds the taper on at least 224 pixels, then crops it
    xm = np.arange(full, dtype=np.float64)
    xm = np.abs(xm - xm.mean())
    w = 1.0 / (1.0 + np.exp((xm - (full / 2 - TAPER_MARGIN)) / TAPER_SIGMA))
    lo = full // 2 - bsize // 2
    return w[lo : lo + bsize]


@dataclass(frozen=True)
class AxisTiles:
    """The tiles of one axis of a plane, in the plane's unpadded (network-scale) coordinates.

    Attributes
    ----------
    n : int
        Axis length of the whole plane.
    bsize : int
        Tile size.
    starts : tuple of int
        Start of each tile; a tile covers ``[start, start + bsize)``, which may reach into
        the zero padding (``start < 0`` or ``start + bsize > n``).
    """

    n: int
    bsize: int
    starts: tuple[int, ...]

    @classmethod
    def of(cls, n: int, bsize: int, *, tile_overlap: float = 0.1, augment: bool = False,
           pad_to_tile: bool = True) -> "AxisTiles":
        """Cellpose's tiles for an axis of ``n`` pixels (``pad_to_tile=False``: Cellpose 3's,
        where an axis padded to fewer than ``bsize`` pixels is one tile of that length)."""
        if n < 1:
            raise ValueError(f"axis length must be >= 1, got {n}")
        before, after = plane_padding(n, bsize, pad_to_tile=pad_to_tile)
        if not pad_to_tile and not augment:
            bsize = min(bsize, n + before + after)
        if not pad_to_tile and augment and n + before + after < bsize:
            # Cellpose 3's augment extends a short padded axis with zeros to one tile, then
            # cuts two (identical, differently flipped) tiles from it
            return cls(int(n), int(bsize), (-before, -before))
        starts = tile_starts(n + before + after, bsize, tile_overlap=tile_overlap, augment=augment) - before
        return cls(int(n), int(bsize), tuple(int(s) for s in starts))

    def __len__(self) -> int:
        return len(self.starts)

    def covering(self, start: int, stop: int) -> list[int]:
        """Indices of the tiles that overlap ``[start, stop)`` (empty for an empty range)."""
        if stop <= start:
            return []
        return [k for k, s in enumerate(self.starts) if s < stop and s + self.bsize > start]

    def span(self, tiles) -> tuple[int, int]:
        """``[first start, last end)`` of the tiles ``tiles`` (indices), padding included."""
        tiles = list(tiles)
        return self.starts[tiles[0]], self.starts[tiles[-1]] + self.bsize
