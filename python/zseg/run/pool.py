"""Scheduling for ``zseg run``: every stage of every phase, in order, over one process pool.

A *map* stage runs once per chunk and leaves a per-chunk marker; a *reduce* stage runs once
and leaves one result file. Both are skipped when their marker/result exists, so a killed
``zseg run`` resumes where it stopped. Nextflow runs the same stages as separate tasks
(``zseg <phase> --run RUN [--stage S] [--chunks|--shard]``).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

import numba
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from zseg.run import tasks
from zseg.storage import uri as U
from zseg.workspace.context import RunContext
from zseg.workspace.progress import require_complete
from zseg.workspace.stages import Stage, applicable, size, stage_table

log = logging.getLogger(__name__)

_RUNS: dict[str, RunContext] = {}


def _worker_init(threads: int) -> None:
    # Only the number of active threads: numba is already imported here (unpickling this
    # function imports the stages), and changing NUMBA_NUM_THREADS after its threads have
    # started makes the next compilation (a cold cache) fail.
    try:
        numba.set_num_threads(threads)
    except Exception:  # numba's threads already fixed: keep its default
        pass


def _run_chunk(root: str, stage_name: str, index: int) -> tuple[int, dict]:
    run = _RUNS.get(root)
    if run is None:
        run = _RUNS[root] = tasks.open_run(root)
    return index, tasks.run_chunk(run, stage_table(run)[stage_name], index)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def _pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes for map stages, started once per run (spawned: no inherited threads)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(
        workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(threads,)
    )


def run_map(run: RunContext, stage: Stage, chunks, *, pool: ProcessPoolExecutor | None = None,
            progress: Progress | None = None) -> list[int]:
    """Run a map stage on the pending chunks of ``chunks`` (in ``pool`` if given); return them."""
    chunks = list(chunks)
    todo = run.pending(stage.marker_dir, chunks, ext="json")
    skipped = len(chunks) - len(todo)
    if skipped:
        log.info("%s: %d chunk(s) already done, skipped", stage.name, skipped)
    if todo:
        require_complete(run, stage)
    task = progress.add_task(stage.name, total=len(todo)) if progress else None
    if pool is None or len(todo) <= 1 or stage.name in tasks.BATCHES:  # a batch stage runs in this process
        for i, stats in tasks.run_chunks(run, stage, todo):
            log.debug("%s: chunk %d: %s", stage.name, i, stats)
            if progress:
                progress.advance(task)
        return todo
    futures = {pool.submit(_run_chunk, run.root, stage.name, i) for i in todo}
    while futures:
        done, futures = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            i, stats = f.result()  # re-raise a worker's error here
            log.debug("%s: chunk %d: %s", stage.name, i, stats)
            if progress:
                progress.advance(task)
    return todo


def run_reduce(run: RunContext, stage: Stage) -> bool:
    """Run a reduce stage unless its result exists; True when it ran."""
    if U.exists(run.path(stage.result)):
        log.info("%s: already done, skipped", stage.name)
        return False
    tasks.run_reduce(run, stage)
    return True


def run_all(run: RunContext, *, workers: int = 1, show_progress: bool | None = None, stages=None) -> dict:
    """Every stage in order (or those of ``stages`` that apply); returns seconds per stage
    (stages skipped as done count 0)."""
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    timings: dict[str, float] = {}
    pool = _pool(workers) if workers > 1 else None
    try:
        with _progress(show_progress) as progress:
            for stage in applicable(run):
                if stages is not None and stage.name not in stages:
                    continue
                t0 = time.perf_counter()
                if stage.kind == "map":
                    ran = run_map(run, stage, range(size(run, stage)), pool=pool, progress=progress)
                else:
                    task = progress.add_task(stage.name, total=1)
                    ran = run_reduce(run, stage)
                    progress.advance(task)
                timings[stage.name] = round(time.perf_counter() - t0, 3)
                if ran:
                    log.info("%s: %s in %.1f s", stage.name,
                             f"{len(ran)} chunk(s)" if stage.kind == "map" else "done", timings[stage.name])
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return timings

