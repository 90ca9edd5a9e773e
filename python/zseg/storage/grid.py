"""The chunk grid: cores, halos, ownership.

All intervals are half-open ``[start, stop)`` in voxel indices of the whole volume unless a
name says otherwise. The grid is N-dimensional (3D volumes and 2D slides use the same code).

- A **core** is one cell of a regular grid with ``chunk_shape`` (clipped at the volume end). The
  cores tile the volume: every voxel lies in exactly one core (:meth:`ChunkGrid.owner`). Output
  arrays are chunked with ``chunk_shape``, so a task that writes its cores writes whole zarr
  chunks that no other task writes.
- A **block** is a core grown by ``halo`` voxels on each side, clipped at the volume border. A
  task reads its block and writes its core. What the halo must hold for the labels to be exact:
  docs/architecture.md, "Invariants".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import numpy as np

from zseg.errors import UserError

Box = tuple[slice, ...]


@dataclass(frozen=True)
class ChunkGrid:
    """A regular grid of cores over ``shape`` with a halo around each.

    Parameters
    ----------
    shape : tuple of int, (ndim,)
        Shape of the volume (spatial axes only), in voxels.
    chunk_shape : tuple of int, (ndim,)
        Shape of a core, in voxels; also the chunk shape of every array the phases write.
    halo : tuple of int, (ndim,)
        Voxels added on each side of a core to make its block (clipped at the volume border).
    """

    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    halo: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "chunk_shape", tuple(int(s) for s in self.chunk_shape))
        object.__setattr__(self, "halo", tuple(int(s) for s in self.halo))
        nd = len(self.shape)
        if len(self.chunk_shape) != nd or len(self.halo) != nd:
            raise UserError(
                f"chunk shape {self.chunk_shape} and halo {self.halo} must have one value per axis "
                f"of the volume {self.shape}: give {nd} values."
            )
        if any(s <= 0 for s in self.shape):
            raise UserError(f"volume shape {self.shape} has an empty axis; nothing to segment.")
        if any(c <= 0 for c in self.chunk_shape):
            raise UserError(
                f"chunk shape {self.chunk_shape}: every side must be at least 1 voxel; "
                "set --chunk-shape to positive integers such as 128,256,256."
            )
        if any(h < 0 for h in self.halo):
            raise UserError(f"halo {self.halo}: a halo cannot be negative; use 0 or more voxels.")

    # -- the grid of cores ------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of cores along each axis."""
        return tuple(math.ceil(s / c) for s, c in zip(self.shape, self.chunk_shape))

    @property
    def nchunks(self) -> int:
        return math.prod(self.grid_shape)

    def coords(self, index: int) -> tuple[int, ...]:
        """Grid coordinates of chunk ``index`` (C order, the last axis fastest)."""
        if not 0 <= index < self.nchunks:
            raise IndexError(f"chunk {index} is outside the grid of {self.nchunks} chunks")
        return tuple(int(c) for c in np.unravel_index(index, self.grid_shape))

    def index(self, coords) -> int:
        """Chunk index of grid coordinates ``coords``."""
        return int(np.ravel_multi_index(tuple(coords), self.grid_shape))

    def core(self, index: int) -> Box:
        """The core of chunk ``index`` in volume coordinates."""
        return tuple(
            slice(g * c, min((g + 1) * c, s))
            for g, c, s in zip(self.coords(index), self.chunk_shape, self.shape)
        )

    def block(self, index: int) -> Box:
        """The core of chunk ``index`` grown by the halo, clipped to the volume."""
        return grow(self.core(index), self.halo, self.shape)

    def core_in_block(self, index: int) -> Box:
        """The core of chunk ``index`` in the coordinates of its block."""
        return tuple(
            slice(c.start - b.start, c.stop - b.start)
            for c, b in zip(self.core(index), self.block(index))
        )

    # -- ownership ---------------------------------------------------------------------------
    def owner(self, points) -> np.ndarray:
        """Index of the chunk whose core holds each voxel.

        Parameters
        ----------
        points : (N, ndim) array of int
            Voxel coordinates in the volume.

        Returns
        -------
        (N,) ndarray of int64
        """
        pts = np.asarray(points, dtype=np.int64).reshape(-1, self.ndim)
        if pts.size and ((pts < 0).any() or (pts >= np.asarray(self.shape)).any()):
            raise ValueError("points outside the volume have no owner")
        g = pts // np.asarray(self.chunk_shape, dtype=np.int64)
        if len(g) == 0:
            return np.zeros(0, np.int64)
        return np.ravel_multi_index(tuple(g.T), self.grid_shape).astype(np.int64)

    def intersecting(self, box: Box) -> list[int]:
        """Indices (ascending) of the chunks whose core intersects ``box`` (volume coordinates)."""
        ranges = []
        for sl, c, s in zip(box, self.chunk_shape, self.shape):
            lo, hi = max(sl.start, 0), min(sl.stop, s)
            if hi <= lo:
                return []
            ranges.append(range(lo // c, (hi - 1) // c + 1))
        return sorted(self.index(g) for g in product(*ranges))


def grow(box: Box, margin, shape) -> Box:
    """``box`` grown by ``margin`` voxels per side (an int or one per axis), clipped to ``shape``."""
    if np.isscalar(margin):
        margin = (int(margin),) * len(box)
    return tuple(
        slice(max(sl.start - m, 0), min(sl.stop + m, s)) for sl, m, s in zip(box, margin, shape)
    )


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(sl.stop - sl.start for sl in box)


def box_origin(box: Box) -> np.ndarray:
    """The first voxel of ``box`` (int64 array), e.g. to move points into its frame."""
    return np.array([sl.start for sl in box], dtype=np.int64)


def relative(box: Box, frame: Box) -> Box:
    """``box`` in the coordinates of ``frame`` (both in volume coordinates)."""
    return tuple(slice(b.start - f.start, b.stop - f.start) for b, f in zip(box, frame))


# -- two scales (--no-resample: the dynamics at the network's scale, the masks resized back) ----
def nearest_indices(size: int, source: int, start: int, stop: int) -> np.ndarray:
    """The source index of each index ``[start, stop)`` of an axis of ``size`` samples resized by
    nearest neighbour from ``source`` samples, with OpenCV's arithmetic (``INTER_NEAREST``, how
    Cellpose resizes masks back): ``floor(i * (1 / (size / source)))`` in double precision, at
    most ``source - 1``."""
    i = np.arange(start, stop, dtype=np.float64)
    return np.minimum(np.floor(i * (1.0 / (size / source))).astype(np.int64), source - 1)


def nearest_box(box: Box, shape, source_shape) -> Box:
    """The source samples that :func:`nearest_indices` maps the voxels ``box`` of ``shape`` to."""
    out = []
    for sl, n, m in zip(box, shape, source_shape):
        idx = nearest_indices(n, m, sl.start, sl.stop)
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def owner_voxels(points, shape, source_shape) -> np.ndarray:
    """The voxel of ``shape`` that owns each source sample ``points`` (``(N, ndim)``): per axis
    ``floor(k * size / source)``, monotone, so the samples a core of ``shape`` owns form a box
    (:func:`owned_box`)."""
    pts = np.asarray(points, dtype=np.int64).reshape(-1, len(shape))
    return pts * np.asarray(shape, np.int64) // np.asarray(source_shape, np.int64)


def owned_box(box: Box, shape, source_shape) -> Box:
    """The source samples whose owner voxel (:func:`owner_voxels`) lies in ``box``."""
    return tuple(slice(-(-sl.start * m // n), -(-sl.stop * m // n)) for sl, n, m in zip(box, shape, source_shape))
