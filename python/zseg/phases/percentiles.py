"""Phase 1, ``percentiles``: exact global intensity percentiles (map per chunk, one reduce).

Map: each chunk's core is histogrammed per channel (``work/percentiles/cNNNNNNN.npz``).
Reduce: the histograms are merged and the percentiles read off the merged histogram
(``work/percentiles.json``), equal to ``numpy.percentile`` on the whole volume for integer
inputs (see :mod:`zseg.engine.percentiles` for floats).
"""

from __future__ import annotations

import logging

import numpy as np

from zseg.engine import percentiles as P
from zseg.errors import UserError
from zseg.storage import uri as U
from zseg.workspace.context import RunContext

log = logging.getLogger(__name__)
PHASE = "percentiles"
RESULT = "percentiles.json"


def process_chunk(run: RunContext, index: int) -> dict:
    """Histogram the core of chunk ``index``, one histogram per channel."""
    data = run.volume.read(run.grid.core(index))
    arrays = {}
    for c in range(data.shape[0]):
        try:
            h = P.histogram(data[c], exclude_zeros=run.params.exclude_zeros)
        except ValueError as e:  # NaN or inf voxels
            raise UserError(f"{e}; the input must be finite: replace them (e.g. with 0 and set exclude_zeros) "
                            "before segmenting.") from None
        arrays.update({f"ch{c}_{k}": v for k, v in h.to_arrays().items()})
    U.write_npz(run.chunk_file(PHASE, index), **arrays)
    return {"voxels": int(data[0].size)}


def _load(run: RunContext, index: int, nchannels: int) -> list[P.Histogram]:
    d = U.read_npz(run.chunk_file(PHASE, index))
    return [
        P.Histogram.from_arrays({k.split("_", 1)[1]: v for k, v in d.items() if k.startswith(f"ch{c}_")})
        for c in range(nchannels)
    ]


def reduce(run: RunContext) -> dict:
    """Merge every chunk's histograms and write the global percentiles."""
    nch = run.volume.nchannels
    merged = [P.Histogram.empty(str(run.volume.dtype)) for _ in range(nch)]
    for i in range(run.grid.nchunks):  # streaming merge: memory is one histogram per channel
        for c, h in enumerate(_load(run, i, nch)):
            merged[c] = P.merge([merged[c], h])
    q = list(run.params.percentiles)
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
    U.write_json(run.path(RESULT), result)
    log.info("percentiles %s: low %s high %s", q, result["low"], result["high"])
    return result


def load(run: RunContext) -> np.ndarray:
    """The ``(nchannels, 2)`` low/high values written by the reduce (Cellpose's ``lowhigh``)."""
    path = run.path(RESULT)
    if not U.exists(path):
        raise UserError("percentiles have not been reduced yet; run `zseg percentiles --run RUN --reduce`.")
    r = U.read_json(path)
    return np.stack([r["low"], r["high"]], axis=1)
