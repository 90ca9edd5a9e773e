"""Phase 1, ``percentiles``: exact global intensity percentiles (map per chunk, one reduce).

Map: each chunk's core is histogrammed per channel (``work/percentiles/cNNNNNNN.npz``).
Reduce: the histograms are merged and the percentiles read off the merged histogram
(``work/percentiles.json``), equal to ``numpy.percentile`` on the whole volume for integer
inputs (see :mod:`zseg.engine.percentiles` for floats).

With ``--norm-per-plane`` each chunk also histograms each plane of its core, and the reduce
merges them slab by slab into each plane's own values (``planes`` in the result), as Cellpose's
``normalize99`` computes them per plane (:mod:`zseg.engine.normalize`). With
``--tile-norm-blocksize`` they histogram each plane's part of every normalisation tile the core
meets, and the reduce derives the smoothed tile grid (``tiles``).
"""

from __future__ import annotations

import logging

import numpy as np

from zseg.engine import normalize as NM
from zseg.engine import percentiles as P
from zseg.errors import UserError
from zseg.storage import uri as U
from zseg.workspace.context import RunContext

log = logging.getLogger(__name__)
PHASE = "percentiles"
RESULT = "percentiles.json"


def _parts(run: RunContext, core) -> list[tuple[str, tuple]]:
    """The local histograms a chunk's core adds to (name, window of the core): with
    ``--norm-per-plane`` one per plane (``zZ``), with ``--tile-norm-blocksize`` one per plane and
    normalisation tile the core meets (``zZ_tJ_I``), else none."""
    p = run.params
    nz = core[0].stop - core[0].start
    if p.norm_per_plane:
        return [(f"z{core[0].start + k}", (k, slice(None), slice(None))) for k in range(nz)]
    if not p.tile_norm_blocksize:
        return []
    shape = run.grid.shape
    axes = []
    for ax in (1, 2):
        starts, size = NM.norm_tiles(shape[ax], p.tile_norm_blocksize)
        c0, c1 = core[ax].start, core[ax].stop
        axes.append([(j, slice(max(t, c0) - c0, min(t + size, c1) - c0)) for j, t in enumerate(starts)
                     if t < c1 and t + size > c0])
    return [(f"z{core[0].start + k}_t{j}_{i}", (k, ys, xs))
            for k in range(nz) for j, ys in axes[0] for i, xs in axes[1]]


def process_chunk(run: RunContext, index: int) -> dict:
    """Histogram the core of chunk ``index``, one histogram per channel (and per channel and
    local part, :func:`_parts`)."""
    core = run.grid.core(index)
    data = run.volume.read(core)
    arrays = {}
    parts = _parts(run, core)
    for c in range(data.shape[0]):
        try:
            h = P.histogram(data[c], exclude_zeros=run.params.exclude_zeros)
            arrays.update({f"ch{c}_{k}": v for k, v in h.to_arrays().items()})
            for name, window in parts:
                hz = P.histogram(data[c][window], exclude_zeros=run.params.exclude_zeros)
                arrays.update({f"{name}_ch{c}_{n}": v for n, v in hz.to_arrays().items()})
        except ValueError as e:  # NaN or inf voxels
            raise UserError(f"{e}; the input must be finite: replace them (e.g. with 0 and set exclude_zeros) "
                            "before segmenting.") from None
    U.write_npz(run.chunk_file(PHASE, index), **arrays)
    return {"voxels": int(data[0].size)}


def _load(d: dict, prefix: str, nchannels: int) -> list[P.Histogram]:
    return [
        P.Histogram.from_arrays({k[len(f"{prefix}ch{c}_"):]: v for k, v in d.items() if k.startswith(f"{prefix}ch{c}_")})
        for c in range(nchannels)
    ]


def reduce(run: RunContext) -> dict:
    """Merge every chunk's histograms and write the global (and per-plane or tile) percentiles."""
    nch = run.volume.nchannels
    dtype = str(run.volume.dtype)
    merged = [P.Histogram.empty(dtype) for _ in range(nch)]
    p, g = run.params, run.grid
    q = list(p.percentiles)
    local = _Local(run, q, nch)
    slab: dict[str, list[P.Histogram]] = {}
    slab_z = None
    for i in range(g.nchunks):  # C order, Z slowest: a slab's chunks come together; memory is one slab's parts
        d = U.read_npz(run.chunk_file(PHASE, i))
        for c, h in enumerate(_load(d, "", nch)):
            merged[c] = P.merge([merged[c], h])
        core = g.core(i)
        if slab_z is not None and slab_z != core[0].start:  # the previous slab is complete
            local.add(slab)
            slab = {}
        slab_z = core[0].start
        for name, _ in _parts(run, core):
            h = _load(d, f"{name}_", nch)
            slab[name] = [P.merge([a, b]) for a, b in zip(slab[name], h)] if name in slab else h
    if slab:
        local.add(slab)
    try:
        values = [P.percentile(h, q) for h in merged]
    except ValueError as e:
        raise UserError(f"{e} (all zero and exclude_zeros set?); check the input, or turn exclude_zeros off.") from None
    result = {
        "percentiles": q,
        "low": [float(v[0]) for v in values],
        "high": [float(v[1]) for v in values],
        "voxels": [int(h.total) for h in merged],
        "exclude_zeros": p.exclude_zeros,
        **local.result(),
    }
    U.write_json(run.path(RESULT), result)
    log.info("percentiles %s: low %s high %s%s", q, result["low"], result["high"],
             "".join(f" (and {k})" for k in ("planes", "tiles") if k in result))
    return result


class _Local:
    """The per-plane or per-tile values, slab by slab in Z order, as Cellpose's ``normalize99``
    (or ``normalize99_tile``) computes them: float32 percentiles of each part
    (:func:`zseg.engine.percentiles.percentile_float32`); a part with no voxels counted (all zero
    with exclude_zeros) is flat."""

    def __init__(self, run: RunContext, q, nch: int):
        self.q, self.nch = q, nch
        self.per_plane = run.params.norm_per_plane
        self.blocksize = run.params.tile_norm_blocksize
        if self.blocksize:
            self.ny = len(NM.norm_tiles(run.grid.shape[1], self.blocksize)[0])
            self.nx = len(NM.norm_tiles(run.grid.shape[2], self.blocksize)[0])
        self.low, self.high, self.varies = [], [], []

    def _values(self, hists):
        low = [float(P.percentile_float32(h, self.q[0])) if h.total else 0.0 for h in hists]
        high = [float(P.percentile_float32(h, self.q[1])) if h.total else 0.0 for h in hists]
        return low, high, [bool(h.keys.size > 1) for h in hists]

    def add(self, slab: dict) -> None:
        planes = sorted({int(name.split("_")[0][1:]) for name in slab})
        for z in planes:
            if self.per_plane:
                low, high, varies = self._values(slab[f"z{z}"])
                self.low.append(low)
                self.high.append(high)
                self.varies.append(varies)
                continue
            low = np.zeros((self.ny, self.nx, self.nch), np.float32)
            high = np.zeros_like(low)
            for j in range(self.ny):
                for i in range(self.nx):
                    lo, hi, _ = self._values(slab[f"z{z}_t{j}_{i}"])
                    low[j, i], high[j, i] = lo, hi
            NM.fill_tiles(low, high)
            self.low.append(low)
            self.high.append(high)

    def result(self) -> dict:
        if self.per_plane:  # per channel: some plane varies (else the channel carries no signal)
            return {"planes": {"low": self.low, "high": self.high,
                               "varies": [bool(any(v[c] for v in self.varies)) for c in range(self.nch)]}}
        if self.blocksize:
            return {"tiles": {"blocksize": self.blocksize,
                              "low": NM.tile_grid(np.stack(self.low)).astype(np.float64).tolist(),
                              "high": NM.tile_grid(np.stack(self.high)).astype(np.float64).tolist()}}
        return {}
