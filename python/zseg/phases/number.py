"""Phase 4, ``number``: deterministic global seed IDs from per-chunk seed counts.

Seed ``k`` (0-based, in C order of position) of chunk ``c`` gets provisional ID
``offsets[c] + k + 1``, where ``offsets`` is the running total of seed counts in chunk order.
Memory is one integer per chunk.
"""

from __future__ import annotations

import numpy as np

from zseg.storage import uri as U
from zseg.storage.arrays import create_array
from zseg.workspace import work as W
from zseg.workspace.context import RunContext


def reduce(run: RunContext) -> dict:
    """Reads every ``seeds:find`` marker (its seed count); writes ``work/number.json`` (the
    running total per chunk) and creates the empty provisional-label store ``work/masks.zarr``."""
    counts = [U.read_json(run.chunk_file(W.SEEDS_DIR, i, "json"))["seeds"] for i in range(run.grid.nchunks)]
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    total = int(offsets[-1])
    g = run.grid
    create_array(
        W.masks_uri(run), shape=g.shape, chunks=g.chunk_shape, dtype=W.id_dtype(total),
        zarr_format=run.params.zarr_format, overwrite=True,
    )
    result = {"offsets": [int(v) for v in offsets], "total": total, "dtype": W.id_dtype(total)}
    U.write_json(run.path(W.NUMBER_RESULT), result)
    W.free_units(run)  # the flows are combined (predict:combine is complete): the units' sums are scratch
    return result

