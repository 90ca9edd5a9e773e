"""Which function runs each stage, and running one stage's tasks: data, then the marker.

:data:`zseg.workspace.stages.STAGES` says what the stages are; this module binds each to its
phase function and runs it the one way every caller shares (``zseg run``'s pool, a Nextflow
task, a test): the function's data first, the chunk's marker (with the task's seconds and
peak memory) last, so a marker always means its chunk is complete.
"""

from __future__ import annotations

from typing import Callable

from zseg.errors import UserError, write_failure
from zseg.outputs import table
from zseg.phases import finalize, masks, number, percentiles, predict, seeds, slide
from zseg.storage import uri as U
from zseg.workspace import usage
from zseg.workspace.context import RunContext
from zseg.workspace.progress import require_complete
from zseg.workspace.slide import SlideContext, is_slide_run
from zseg.workspace.stages import SLIDE_STAGES, STAGES, Stage, context

#: ``fn(run, index) -> stats`` of each map stage, ``fn(run) -> result`` of each reduce.
FUNCTIONS: dict[str, Callable] = {
    "percentiles": percentiles.process_chunk,
    "percentiles:reduce": percentiles.reduce,
    "predict": predict.process_unit,
    "predict:combine": predict.combine_chunk,
    "seeds:follow": seeds.follow_chunk,
    "seeds:find": seeds.find_chunk,
    "number": number.reduce,
    "masks": masks.process_chunk,
    "masks:own": masks.own_reduce,
    "masks:resize": masks.resize_chunk,
    "finalize:sizes": finalize.sizes_chunk,
    "finalize:extent": finalize.extent_reduce,
    "finalize:quality": finalize.quality_chunk,
    "finalize:holes": finalize.holes_chunk,
    "finalize:overlaps": finalize.overlaps_chunk,
    "finalize:stitch": finalize.stitch_reduce,
    "finalize:number": finalize.number_reduce,
    "finalize:labels": finalize.labels_chunk,
    "finalize:cells": table.cells_chunk,
    "finalize:report": finalize.report_reduce,
    # a slide run's own stages
    "slide:inputs": slide.inputs_chunk,
    "slide:compartments": slide.compartments_reduce,
    "match:decide": slide.match_chunk,
    "match:number": slide.match_number,
    "slide:layers": slide.layers_chunk,
    "slide:report": slide.report_reduce,
}
#: Map stages that run a list of chunks in one process: ``batch(run, indices)`` yields
#: ``(index, stats)`` as each chunk's data is written, in order, so the stage can keep state
#: (a loaded network) and overlap I/O with work across chunks.
BATCHES: dict[str, Callable] = {"predict": predict.predict_units}

if set(FUNCTIONS) != set(STAGES) | set(SLIDE_STAGES):  # pragma: no cover - a stage added on one side only
    raise RuntimeError("stages without a function or functions without a stage: "
                       f"{set(FUNCTIONS) ^ (set(STAGES) | set(SLIDE_STAGES))}")


def open_run(root: str):
    """The context of the run in ``root``: a slide run's or a volume run's."""
    return SlideContext.open(root) if is_slide_run(root) else RunContext.open(root)


def _where(run, stage: Stage, index: int) -> str:
    if stage.over == "units":
        return f"unit {index}"
    where = ", ".join(f"{a} {s.start}:{s.stop}" for a, s in zip("zyx"[-run.grid.ndim:], run.grid.core(index)))
    return f"chunk {index} ({where})"


def _no_room(e: OSError, where: str) -> BaseException:
    """A full or read-only disk as one line naming the task and what it was writing; any other
    OS error unchanged."""
    failure = write_failure(e)
    return e if failure is None else UserError(f"{where}: {failure.problems[0]}")


def run_chunk(run: RunContext, stage: Stage, index: int) -> dict:
    """Run map stage ``stage`` on chunk ``index`` (of the stage's grid: :func:`context`); write its
    marker; return the marker's stats."""
    run = context(run, stage)
    try:
        with usage.measure() as used:  # seconds and this task's peak resident memory
            stats = dict(FUNCTIONS[stage.name](run, index) or {})
    except UserError as e:  # say which task met the problem
        raise UserError(*(f"{stage.name}, {_where(run, stage, index)}: {p}" for p in e.problems)) from None
    except OSError as e:  # a full or read-only disk: one line naming the task and the file
        raise _no_room(e, f"{stage.name}, {_where(run, stage, index)}") from None
    stats.update(used)
    U.write_json(run.chunk_file(stage.marker_dir, index, "json"), stats)
    return stats


def run_chunks(run: RunContext, stage: Stage, indices):
    """Run the chunks ``indices`` of map stage ``stage`` (in one process through its batch
    function when it has one), writing each marker as its chunk completes; yields ``(index, stats)``."""
    batch = BATCHES.get(stage.name)
    if batch is None:
        for i in indices:
            yield i, run_chunk(run, stage, i)
        return
    chunks = batch(run, list(indices))
    while True:
        with usage.measure() as used:  # the seconds and peak memory since the previous chunk
            try:
                i, stats = next(chunks)
            except StopIteration:
                return
            except OSError as e:
                raise _no_room(e, stage.name) from None
        stats = {**stats, **used}
        U.write_json(run.chunk_file(stage.marker_dir, i, "json"), stats)
        yield i, stats


def run_reduce(run: RunContext, stage: Stage):
    """Run reduce stage ``stage`` once every stage before it is complete; record its usage."""
    require_complete(run, stage)
    with usage.measure() as used:
        try:
            out = FUNCTIONS[stage.name](context(run, stage))
        except OSError as e:
            raise _no_room(e, stage.name) from None
    usage.write_reduce(run, stage.name, used)
    return out
