"""Where a run's flows and intermediate arrays live, and how they are laid out.

- flows: ``params.flows`` (a precomputed store) or ``work/flows.zarr`` (written by ``predict``),
  ``(ndim + 1, *shape)`` = dZ, dY, dX, cellprob in Cellpose's 3D convention.
- ``work/ends.zarr``: for every foreground voxel, the integer displacement to the voxel its
  trajectory ends in (``floor`` of the float displacement), ``(ndim, *shape)``; background
  voxels hold ``ENDS_EMPTY``.
- ``work/masks.zarr``: provisional labels (global seed IDs before size decisions).
"""

from __future__ import annotations

import numpy as np

from zseg.pipeline.manifest import Run
from zseg.storage.arrays import create_array, open_array

ENDS_EMPTY = np.iinfo(np.int16).min


def flows_uri(run: Run) -> str:
    return run.params.flows or run.path("flows.zarr")


def flows(run: Run):
    return open_array(flows_uri(run))


def ends_dtype(shape) -> np.dtype:
    return np.dtype(np.int16 if max(shape) < np.iinfo(np.int16).max else np.int32)


def create_ends(run: Run):
    g = run.grid
    dt = ends_dtype(g.shape)
    return create_array(
        run.path("ends.zarr"), shape=(g.ndim, *g.shape), chunks=(g.ndim, *g.chunk_shape), dtype=dt,
        zarr_format=run.params.zarr_format, fill_value=int(np.iinfo(dt).min), overwrite=True,
    )


def ends(run: Run, mode: str = "r"):
    return open_array(run.path("ends.zarr"), mode=mode)


def masks(run: Run, mode: str = "r"):
    return open_array(run.path("masks.zarr"), mode=mode)
