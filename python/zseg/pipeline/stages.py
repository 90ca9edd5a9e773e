"""The stages of a run, in order: the one table the runner, the CLI and Nextflow follow.

A phase of DESIGN.md §3 has one or more stages. A *map* stage works on one chunk at a time and
writes its chunk's marker ``work/<marker_dir>/cNNNNNNN.json`` last, after its data, so a
marker means the chunk is complete. A *reduce* stage runs once and writes ``work/<result>``.
No stage starts while a stage before it in this table is incomplete
(:func:`zseg.pipeline.verify.require_complete`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from zseg.errors import UserError
from zseg.storage import uri as U


@dataclass(frozen=True)
class Stage:
    name: str
    phase: str
    kind: Literal["map", "reduce"]
    fn: Callable
    marker_dir: str | None = None
    result: str | None = None
    applies: Callable = field(default=lambda run: True)
    batch: Callable | None = None
    """Optional ``batch(run, indices)``: yields ``(index, stats)`` as each chunk's data is written,
    in order. The runner then runs the stage in its own process through :meth:`run_chunks`, so
    the stage can keep state (a loaded network) and overlap I/O with work across chunks."""

    def run_chunks(self, run, indices):
        """Run the chunks ``indices`` (through ``batch`` when given), writing each marker as
        its chunk completes; yields ``(index, stats)``."""
        from zseg.pipeline.usage import measure

        if self.batch is None:
            for i in indices:
                yield i, self.run_chunk(run, i)
            return
        chunks = self.batch(run, list(indices))
        while True:
            with measure() as used:  # the seconds and peak memory since the previous chunk
                try:
                    i, stats = next(chunks)
                except StopIteration:
                    return
            stats = {**stats, **used}
            U.write_json(run.chunk_file(self.marker_dir, i, "json"), stats)
            yield i, stats

    def run_chunk(self, run, index: int) -> dict:
        from zseg.pipeline.usage import measure

        try:
            with measure() as used:  # seconds and this task's peak resident memory
                stats = dict(self.fn(run, index) or {})
        except UserError as e:  # say which task met the problem
            where = ", ".join(f"{a} {s.start}:{s.stop}" for a, s in zip("zyx"[-run.grid.ndim:], run.grid.core(index)))
            raise UserError(*(f"{self.name}, chunk {index} ({where}): {p}" for p in e.problems)) from None
        stats.update(used)
        U.write_json(run.chunk_file(self.marker_dir, index, "json"), stats)
        return stats

    def run_reduce(self, run) -> dict:
        from zseg.pipeline.runner import check_complete
        from zseg.pipeline.usage import measure, write_reduce

        check_complete(run, self)
        with measure() as used:
            out = self.fn(run)
        write_reduce(run, self.name, used)
        return out


def _build() -> dict[str, Stage]:
    from zseg.pipeline import finalize, masks, number, percentiles, predict, seeds, table

    stages = [
        Stage("percentiles", "percentiles", "map", percentiles.process_chunk, marker_dir="percentiles"),
        Stage("percentiles:reduce", "percentiles", "reduce", percentiles.reduce,
              result=percentiles.RESULT),
        Stage("predict", "predict", "map", predict.process_chunk, marker_dir=predict.PHASE,
              applies=predict.applies, batch=predict.predict_chunks),
        Stage("seeds:follow", "seeds", "map", seeds.follow_chunk, marker_dir="follow"),
        Stage("seeds:find", "seeds", "map", seeds.find_chunk, marker_dir="seeds"),
        Stage("number", "number", "reduce", number.reduce, result=number.RESULT),
        Stage("masks", "masks", "map", masks.process_chunk, marker_dir="masks"),
        Stage("finalize:sizes", "finalize", "map", finalize.sizes_chunk, marker_dir="sizes"),
        Stage("finalize:number", "finalize", "reduce", finalize.number_reduce,
              result=finalize.NUMBER_RESULT),
        Stage("finalize:labels", "finalize", "map", finalize.labels_chunk, marker_dir="labels"),
        Stage("finalize:cells", "finalize", "map", table.cells_chunk, marker_dir=table.CELLS),
        Stage("finalize:report", "finalize", "reduce", finalize.report_reduce,
              result=finalize.REPORT_RESULT),
    ]
    return {s.name: s for s in stages}


STAGES = _build()
