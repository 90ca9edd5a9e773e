"""What the CLI calls: a whole run in this process (``zseg run``), or one stage on a set of
chunks (``zseg <phase> --run RUN``: what every Nextflow task runs)."""

from __future__ import annotations

import logging
import time

from zseg.errors import UserError
from zseg.params import RunParams
from zseg.phases import seeds
from zseg.phases import slide as SL
from zseg.phases.plan import plan
from zseg.run.pool import run_all, run_map, run_reduce
from zseg.run.tasks import open_run
from zseg.storage import uri as U
from zseg.workspace import work as W
from zseg.workspace.chunks import chunk_ranges, select_chunks
from zseg.workspace.context import RunContext, read_manifest
from zseg.workspace.lock import RunLock, check_task, release
from zseg.workspace.progress import done_work
from zseg.workspace.stages import SLIDE_STAGES, applicable, size, stage_table

log = logging.getLogger(__name__)


def finished(output: str) -> bool:
    """Whether ``output`` holds a finished zseg run (what plan refuses to redo without --overwrite)."""
    m = read_manifest(output)
    if m is None:
        return False
    if isinstance(m, dict) and m.get("kind") == "slide":
        return bool(m.get("complete"))
    return bool(RunContext.open(output).manifest.get("complete"))


def resume(run: RunContext) -> dict:
    """Before running the stages of ``run`` here: the work already done, which this run skips
    (after forgetting the seeds and what follows them when this machine follows trajectories on
    another device than the run's first pass did)."""
    redo = seeds.adopt_device(run)
    if redo:
        log.warning("%s", redo)
    return done_work(run)


def run_slide(params: RunParams) -> dict:
    """A 2D slide: plan (or resume) it, its inputs, each compartment's one-plane run, then the
    matching, layers and outputs; returns the run report."""
    t0 = time.perf_counter()
    run = SL.plan_slide(params)
    skipped = done_work(run)
    first = ["slide:inputs", "slide:compartments"]
    timings = run_all(run, workers=params.workers, stages=first)
    for c in U.read_json(run.path(W.COMPARTMENTS_RESULT))["compartments"]:
        sub = RunContext.open(c["run"])
        if sub.manifest.get("complete"):
            skipped[c["name"]] = "done"
            continue
        resume(sub)
        timings.update({f"{c['name']}/{k}": v for k, v in run_all(sub, workers=params.workers).items()})
    timings.update(run_all(run, workers=params.workers, stages=[s for s in SLIDE_STAGES if s not in first]))
    report = U.read_json(run.path(W.REPORT_RESULT))
    report["wall_seconds"] = round(time.perf_counter() - t0, 3)
    report["stage_seconds"] = timings
    report["skipped"] = skipped
    return report


def run_local(params: RunParams) -> dict:
    """Plan (or resume) and run every stage, holding the output folder's lock; returns the run report."""
    with RunLock(params.output):
        return run_slide(params) if SL.is_slide(params) else _run_volume(params)


def _run_volume(params: RunParams) -> dict:
    t0 = time.perf_counter()
    run = plan(params, check_model=True)
    skipped = resume(run)  # a resumed run: what it will not redo (the scheduler skips exactly this)
    if skipped:
        log.info("resuming: already done %s", skipped)
    timings = run_all(run, workers=params.workers)
    report = U.read_json(run.path(W.REPORT_RESULT))
    report["wall_seconds"] = round(time.perf_counter() - t0, 3)
    report["stage_seconds"] = timings
    report["skipped"] = skipped
    return report


def _stage(table: dict, phase: str, stage: str | None, reduce: bool, root: str):
    names = [n for n, s in table.items() if s.phase == phase]
    if not names:
        kind = "slide" if table is SLIDE_STAGES else "volume"
        raise UserError(f"{root} is a {kind} run, which has no {phase} phase.")
    if stage is not None:
        name = f"{phase}:{stage}"
        if name not in table:
            options = ", ".join(n.split(":", 1)[1] for n in names if ":" in n)
            raise UserError(f"--stage {stage!r} is not a stage of {phase}; use one of: {options}.")
        return table[name]
    kinds = [table[n] for n in names if (table[n].kind == "reduce") == reduce]
    return kinds[0]


def run_phase(root: str, phase: str, *, stage=None, chunks=None, shard=None, reduce=False,
              session: str | None = None) -> dict:
    """One stage of ``phase`` on the selected chunks (map) or once (reduce), skipping done work.
    ``session``: the Nextflow session this task belongs to (:mod:`zseg.workspace.lock`)."""
    check_task(root, session)
    run = open_run(root)
    st = _stage(stage_table(run), phase, stage, reduce, root)
    summary = _run_stage(run, st, root, chunks, shard)
    if session is not None and st.name == applicable(run)[-1].name and finished(root):
        release(root, session)  # the session's run is complete: the folder is free again
    return summary


def _run_stage(run, st, root: str, chunks, shard) -> dict:
    if not st.applies(run):  # e.g. predict in a run given precomputed --flows
        log.info("%s does not apply to this run: nothing to do", st.name)
        return {"run": root, "stage": st.name, "applies": False, "ran": []}
    if st.kind == "reduce":  # its result too: what the next task needs to know (e.g. a slide's compartments)
        ran = run_reduce(run, st)
        return {"run": root, "stage": st.name, "ran": ran, "nchunks": run.grid.nchunks,
                "result": U.read_json(run.path(st.result))}
    selected = select_chunks(size(run, st), chunks, shard, what="units" if st.over == "units" else "chunks")
    ran = run_map(run, st, selected)
    return {"run": root, "stage": st.name, "chunks": len(selected), "ran": ran, "skipped": len(selected) - len(ran),
            "skipped_chunks": chunk_ranges(sorted(set(selected) - set(ran)))}
