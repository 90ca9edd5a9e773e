"""Where a run keeps its intermediate results under ``work/``, and how they are laid out.

One home for every name under the work folder, so a phase, an output and the progress
report all agree on it:

- flows: ``params.flows`` (a precomputed store) or ``work/flows.zarr`` (written by ``predict``),
  ``(ndim + 1, *shape)`` = dZ, dY, dX, cellprob in Cellpose's 3D convention.
- ``work/ends.zarr``: for every foreground voxel, the integer displacement to the voxel its
  trajectory ends in (``floor`` of the float displacement), ``(ndim, *shape)``; background
  voxels hold ``ENDS_EMPTY``.
- ``work/units/uNNNNNNN.zarr``: each predict unit's partial flow sums (int64 fixed point, over
  its reach at network scale), which ``predict:combine`` sums into ``work/flows.zarr``.
- ``work/masks.zarr``: provisional labels (global seed IDs before size decisions).
- with ``--no-resample`` the flows, ``ends.zarr`` and the seeds are at the network's scale (on
  ``run.json``'s ``network_grid``), ``masks`` paints ``work/network_masks.zarr``, ``masks:own``
  gives each seed an owner chunk of the volume's grid and an ID in that chunk's range
  (``work/own/cNNNNNNN.npz`` per network chunk, ``work/own.json``), and ``masks:resize`` writes
  ``work/masks.zarr`` at the volume's scale with those IDs (counts in ``work/resize/``).
- per-chunk results and markers in ``work/<stage dir>/cNNNNNNN.{npz,json}`` and the reduces'
  results ``work/<name>.json`` (the ``*_DIR`` and ``*_RESULT`` names below).
"""

from __future__ import annotations

import numpy as np

from zseg.engine.normalize import Normalization
from zseg.errors import UserError
from zseg.storage import uri as U
from zseg.storage.arrays import create_array, open_array

ENDS_EMPTY = np.iinfo(np.int16).min

# per-chunk folders (data and markers) of the map stages
PERCENTILES_DIR = "percentiles"
PREDICT_DIR = "predict"
COMBINE_DIR = "combine"
FOLLOW_DIR = "follow"
SEEDS_DIR = "seeds"
MASKS_DIR = "masks"
OWN_DIR = "own"
RESIZE_DIR = "resize"
SIZES_DIR = "sizes"
HOLES_DIR = "holes"
QUALITY_DIR = "quality"
OVERLAPS_DIR = "overlaps"
FINAL_DIR = "final"
LABELS_DIR = "labels"
CELLS_DIR = "cells"
PARTIALS_DIR = "partials"
# a slide run's own stages
SLIDE_INPUTS_DIR = "inputs"
MATCH_DIR = "match"
LAYERS_DIR = "layers"
MATCH_RESULT = "match.json"
COMPARTMENTS_RESULT = "compartments.json"
# results of the reduce stages
PERCENTILES_RESULT = "percentiles.json"
NUMBER_RESULT = "number.json"
OWN_RESULT = "own.json"
EXTENT_RESULT = "extent.json"
STITCH_RESULT = "stitch.json"
STITCH_TABLE = "stitch.npz"
FINAL_NUMBER_RESULT = "final_number.json"
REPORT_RESULT = "report.json"
#: the fingerprints' object tables of the zarr stores a run reads (``fingerprint/<name>.zarr``)
FINGERPRINT_DIR = "fingerprint"
#: the device the run's trajectories are followed on, decided once by its first seeds:follow task
DYNAMICS_RESULT = "dynamics.json"
VIEWS_STORE = "views.zarr"
#: the predict units' fixed-point partial sums, one array per unit (``work/units/uNNNNNNN.zarr``)
UNITS_DIR = "units"


def unit_uri(run, index: int) -> str:
    return run.path(UNITS_DIR, f"u{index:07d}.zarr")


def free_units(run) -> None:
    """Remove the predict units' partial sums (scratch): ``number`` does, once every chunk's
    flows are combined and followed."""
    if U.exists(run.path(UNITS_DIR)):
        U.remove(run.path(UNITS_DIR))


def flows_uri(run) -> str:
    return run.params.flows or run.path("flows.zarr")


class PlaneFlows:
    """A 2D flow store ``(3, Y, X)`` = dY, dX, cellprob read as a one-plane run's
    ``(4, 1, Y, X)`` = dZ (0), dY, dX, cellprob: given 2D flows are used as they are, not copied."""

    def __init__(self, array):
        self.array = array
        self.shape = (4, 1, *array.shape[1:])
        self.dtype = array.dtype

    def __getitem__(self, selection):
        c, z, *yx = selection
        if not (isinstance(c, slice) and c == slice(None)) or len(yx) != 2:
            raise IndexError(f"a plane flow store is read as [:, z, y, x], not {selection}")
        data = np.asarray(self.array[(slice(None), *yx)])
        nz = len(range(1)[z])
        out = np.zeros((4, nz, *data.shape[1:]), data.dtype)
        out[1:] = data[:, None]
        return out


class ReadChecked:
    """A given store read through the run's fingerprint of it (every box read is checked)."""

    def __init__(self, array, reads):
        self.array, self.reads = array, reads
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, selection):
        sel = selection if isinstance(selection, tuple) else (selection,)
        sel = sel + (slice(None),) * (len(self.shape) - len(sel))
        self.reads.check([s.indices(n)[:2] if isinstance(s, slice) else (int(s), int(s) + 1)
                          for s, n in zip(sel, self.shape)])
        return self.array[selection]


def flows(run):
    array = open_array(flows_uri(run))
    reads = run.reads("flows") if run.params.flows else None
    if reads is not None:
        array = ReadChecked(array, reads)
    if len(array.shape) == 3 and run.grid.ndim == 3 and run.grid.shape[0] == 1:  # a slide's given flows
        return PlaneFlows(array)
    return array


def ends_dtype(shape) -> np.dtype:
    return np.dtype(np.int16 if max(shape) < np.iinfo(np.int16).max else np.int32)


def create_ends(run):
    g = run.grid
    dt = ends_dtype(g.shape)
    return create_array(
        run.path("ends.zarr"), shape=(g.ndim, *g.shape), chunks=(g.ndim, *g.chunk_shape), dtype=dt,
        zarr_format=run.params.zarr_format, fill_value=int(np.iinfo(dt).min), overwrite=True,
    )


def ends(run, mode: str = "r"):
    return open_array(run.path("ends.zarr"), mode=mode)


def masks_uri(run) -> str:
    """The provisional labels of ``run``'s grid: at the network's scale on the network grid of a
    ``--no-resample`` run, else (and after ``masks:resize``) at the volume's."""
    return run.path("network_masks.zarr" if run.at_network_scale else "masks.zarr")


def masks(run, mode: str = "r"):
    return open_array(masks_uri(run), mode=mode)


def counts_dir(run) -> str:
    """Where the voxels per provisional ID of each chunk of the volume's grid are: the ``masks``
    stage's markers, or ``masks:resize``'s with ``--no-resample``."""
    return MASKS_DIR if run.resamples else RESIZE_DIR


def _percentiles(run) -> dict:
    path = run.path(PERCENTILES_RESULT)
    if not U.exists(path):
        raise UserError("percentiles have not been reduced yet; run `zseg percentiles --run RUN --reduce`.")
    return U.read_json(path)


def lowhigh(run) -> np.ndarray:
    """The ``(nchannels, 2)`` low/high values of the percentiles reduce (Cellpose's ``lowhigh``)."""
    r = _percentiles(run)
    return np.stack([r["low"], r["high"]], axis=1)


def normalization(run) -> Normalization:
    """How the predict phase normalises the input: the percentiles reduce's global (or, with
    ``--norm-per-plane``, per-plane; with ``--tile-norm-blocksize``, the tile grid's) values, and
    ``--invert``."""
    r = _percentiles(run)
    lh = np.stack([r["low"], r["high"]], axis=1)
    per, tiles = r.get("planes"), r.get("tiles")
    if tiles is not None:
        grid = np.stack([np.asarray(tiles["low"], np.float32), np.asarray(tiles["high"], np.float32)], axis=3)
        return Normalization(lh, invert=bool(run.params.invert), tiles=grid, plane=tuple(run.grid.shape[1:]))
    if per is None:
        return Normalization(lh, invert=bool(run.params.invert))
    planes = np.stack([np.asarray(per["low"], np.float64), np.asarray(per["high"], np.float64)], axis=2)
    return Normalization(lh, planes=planes, varies=np.asarray(per["varies"], bool), invert=bool(run.params.invert))


def id_dtype(n: int) -> str:
    """The label type for ``n`` cells: uint32, or uint64 past 2^32 - 1."""
    return "uint32" if n < np.iinfo(np.uint32).max else "uint64"


def seed_offsets(run) -> tuple[np.ndarray, str]:
    """The running total of seeds per chunk of ``run``'s grid, and the provisional ID type: the
    ``number`` reduce's, or on the volume's grid of a ``--no-resample`` run ``masks:own``'s."""
    resized = not run.resamples and not run.at_network_scale
    r = U.read_json(run.path(OWN_RESULT if resized else NUMBER_RESULT))
    return np.asarray(r["offsets"], dtype=np.int64), r["dtype"]


def owners(offsets: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Chunk owning each provisional ID (IDs ``offsets[c]+1 .. offsets[c+1]`` belong to ``c``)."""
    return np.searchsorted(offsets, np.asarray(ids, dtype=np.int64) - 1, side="right") - 1
