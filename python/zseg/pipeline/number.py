"""Phase 4, ``number``: deterministic global seed IDs from per-chunk seed counts.

Seed ``k`` (0-based, in C order of position) of chunk ``c`` gets provisional ID
``offsets[c] + k + 1``, where ``offsets`` is the running total of seed counts in chunk order.
Memory is one integer per chunk.
"""

from __future__ import annotations

import numpy as np

from zseg.pipeline import flowstore as FS
from zseg.pipeline.manifest import Run
from zseg.storage import uri as U
from zseg.storage.arrays import create_array

RESULT = "number.json"


def id_dtype(n: int) -> str:
    return "uint32" if n < np.iinfo(np.uint32).max else "uint64"


def reduce(run: Run) -> dict:
    counts = [U.read_json(run.chunk_file("seeds", i, "json"))["seeds"] for i in range(run.grid.nchunks)]
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    total = int(offsets[-1])
    g = run.grid
    create_array(
        run.path("masks.zarr"), shape=g.shape, chunks=g.chunk_shape, dtype=id_dtype(total),
        zarr_format=run.params.zarr_format, overwrite=True,
    )
    result = {"offsets": [int(v) for v in offsets], "total": total, "dtype": id_dtype(total)}
    U.write_json(run.path(RESULT), result)
    return result


def load(run: Run) -> tuple[np.ndarray, str]:
    r = U.read_json(run.path(RESULT))
    return np.asarray(r["offsets"], dtype=np.int64), r["dtype"]


def owners(offsets: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Chunk owning each provisional ID (IDs ``offsets[c]+1 .. offsets[c+1]`` belong to ``c``)."""
    return np.searchsorted(offsets, np.asarray(ids, dtype=np.int64) - 1, side="right") - 1
