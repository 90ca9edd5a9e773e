"""The stages of a run, in order: the one table the runner, the CLI and Nextflow follow.

A phase of DESIGN.md §3 has one or more stages. A *map* stage works on one chunk at a time and
writes its chunk's marker ``work/<marker_dir>/cNNNNNNN.json`` last, after its data, so a
marker means the chunk is complete. A *reduce* stage runs once, after every chunk of the map
stage it ``requires``, and writes ``work/<result>``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal

from zseg.storage import uri as U


@dataclass(frozen=True)
class Stage:
    name: str
    phase: str
    kind: Literal["map", "reduce"]
    fn: Callable
    marker_dir: str | None = None
    result: str | None = None
    requires: str | None = None
    applies: Callable = field(default=lambda run: True)

    def run_chunk(self, run, index: int) -> dict:
        t0 = time.perf_counter()
        stats = dict(self.fn(run, index) or {})
        stats["seconds"] = round(time.perf_counter() - t0, 4)
        U.write_json(run.chunk_file(self.marker_dir, index, "json"), stats)
        return stats

    def run_reduce(self, run) -> dict:
        from zseg.pipeline.runner import check_complete

        check_complete(run, self)
        return self.fn(run)


def _build() -> dict[str, Stage]:
    from zseg.pipeline import finalize, masks, number, percentiles, seeds

    stages = [
        Stage("percentiles", "percentiles", "map", percentiles.process_chunk, marker_dir="percentiles"),
        Stage("percentiles:reduce", "percentiles", "reduce", percentiles.reduce,
              result=percentiles.RESULT, requires="percentiles"),
        Stage("seeds:follow", "seeds", "map", seeds.follow_chunk, marker_dir="follow"),
        Stage("seeds:find", "seeds", "map", seeds.find_chunk, marker_dir="seeds"),
        Stage("number", "number", "reduce", number.reduce, result=number.RESULT, requires="seeds:find"),
        Stage("masks", "masks", "map", masks.process_chunk, marker_dir="masks"),
        Stage("finalize:sizes", "finalize", "map", finalize.sizes_chunk, marker_dir="sizes"),
        Stage("finalize:number", "finalize", "reduce", finalize.number_reduce,
              result=finalize.NUMBER_RESULT, requires="finalize:sizes"),
        Stage("finalize:labels", "finalize", "map", finalize.labels_chunk, marker_dir="labels"),
        Stage("finalize:report", "finalize", "reduce", finalize.report_reduce,
              result=finalize.REPORT_RESULT, requires="finalize:labels"),
    ]
    return {s.name: s for s in stages}


STAGES = _build()
