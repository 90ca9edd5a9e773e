"""Phase 1, ``percentiles``: exact global intensity percentiles (map per chunk, one reduce).

Map: each chunk's core is histogrammed per channel (``work/percentiles/cNNNNNNN.npz``).
Reduce: the histograms are merged and the percentiles read off the merged histogram
(``work/percentiles.json``), equal to ``numpy.percentile`` on the whole volume for integer
inputs (see :mod:`zseg.engine.percentiles` for floats).

With ``--norm-per-plane`` each chunk also histograms each plane of its core, and the reduce
merges them slab by slab into each plane's own values (``planes`` in the result), as Cellpose's
``normalize99`` computes them per plane (:mod:`zseg.engine.normalize`).
"""

from __future__ import annotations

import logging


from zseg.engine import percentiles as P
from zseg.errors import UserError
from zseg.storage import uri as U
from zseg.workspace.context import RunContext

log = logging.getLogger(__name__)
PHASE = "percentiles"
RESULT = "percentiles.json"


def process_chunk(run: RunContext, index: int) -> dict:
    """Histogram the core of chunk ``index``, one histogram per channel (and, with
    ``--norm-per-plane``, one per channel and plane of the core)."""
    core = run.grid.core(index)
    data = run.volume.read(core)
    arrays = {}
    for c in range(data.shape[0]):
        try:
            h = P.histogram(data[c], exclude_zeros=run.params.exclude_zeros)
            arrays.update({f"ch{c}_{k}": v for k, v in h.to_arrays().items()})
            if run.params.norm_per_plane:
                for k in range(data.shape[1]):
                    hz = P.histogram(data[c, k], exclude_zeros=run.params.exclude_zeros)
                    arrays.update({f"z{core[0].start + k}_ch{c}_{n}": v for n, v in hz.to_arrays().items()})
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
    """Merge every chunk's histograms and write the global (and per-plane) percentiles."""
    nch = run.volume.nchannels
    dtype = str(run.volume.dtype)
    merged = [P.Histogram.empty(dtype) for _ in range(nch)]
    per_plane = run.params.norm_per_plane
    planes = {"low": [], "high": [], "varies": []}
    q = list(run.params.percentiles)
    g = run.grid
    slab: dict[int, list[P.Histogram]] = {}
    for i in range(g.nchunks):  # C order, Z slowest: a slab's chunks come together; memory is one slab's planes
        d = U.read_npz(run.chunk_file(PHASE, i))
        for c, h in enumerate(_load(d, "", nch)):
            merged[c] = P.merge([merged[c], h])
        if per_plane:
            core = g.core(i)
            if slab and min(slab) != core[0].start:  # the previous slab is complete
                _plane_values(slab, q, planes)
                slab = {}
            for z in range(core[0].start, core[0].stop):
                hz = _load(d, f"z{z}_", nch)
                slab[z] = [P.merge([a, b]) for a, b in zip(slab[z], hz)] if z in slab else hz
    if slab:
        _plane_values(slab, q, planes)
    try:
        values = [P.percentile(h, q) for h in merged]
    except ValueError as e:
        raise UserError(f"{e} (all zero and exclude_zeros set?); check the input, or turn exclude_zeros off.") from None
    result = {
        "percentiles": q,
        "low": [float(v[0]) for v in values],
        "high": [float(v[1]) for v in values],
        "voxels": [int(h.total) for h in merged],
        "exclude_zeros": run.params.exclude_zeros,
    }
    if per_plane:  # per channel: some plane varies (else the channel carries no signal)
        result["planes"] = {"low": planes["low"], "high": planes["high"],
                            "varies": [bool(any(v[c] for v in planes["varies"])) for c in range(nch)]}
    U.write_json(run.path(RESULT), result)
    log.info("percentiles %s: low %s high %s%s", q, result["low"], result["high"],
             f" (and per plane for {len(planes['low'])} planes)" if per_plane else "")
    return result


def _plane_values(slab: dict, q, out: dict) -> None:
    """Append the planes of ``slab`` (z -> per-channel histograms), in Z order: Cellpose's
    ``normalize99`` values per plane (float32, :func:`zseg.engine.percentiles.percentile_float32`);
    a plane with no voxels counted (all zero with exclude_zeros) is constant."""
    for z in sorted(slab):
        low, high, varies = [], [], []
        for h in slab[z]:
            if h.total == 0:
                low.append(0.0), high.append(0.0), varies.append(False)
                continue
            low.append(float(P.percentile_float32(h, q[0])))
            high.append(float(P.percentile_float32(h, q[1])))
            varies.append(bool(h.keys.size > 1))
        out["low"].append(low), out["high"].append(high), out["varies"].append(varies)
