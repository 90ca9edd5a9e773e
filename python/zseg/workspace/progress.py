"""What is done and what is not: the progress of a run, read from its markers.

Progress is read from the markers the stages leave (``work/<stage dir>/cNNNNNNN.json``, written
last by a map stage; a reduce's result file): a stage may start only when every applicable
stage before it is complete (:func:`require_complete`), and a resumed run reports what it
skipped (:func:`done_work`).
"""

from __future__ import annotations

from zseg.errors import UserError
from zseg.storage import uri as U
from zseg.workspace.chunks import chunk_ranges, short_ranges
from zseg.workspace import work as W
from zseg.workspace.context import RunContext
from zseg.workspace.stages import applicable, noun, size


# -- progress ------------------------------------------------------------------------------------
def stage_missing(run: RunContext, stage) -> list[int] | bool:
    """For a map stage the chunks without a marker; for a reduce whether its result is missing."""
    if stage.kind == "map":
        return run.pending(stage.marker_dir, range(size(run, stage)), ext="json")
    return not U.exists(run.path(stage.result))


def done_work(run: RunContext) -> dict:
    """The work already done: ``{stage: "0-5,9"}`` for map stages, ``{stage: "done"}`` for reduces."""
    done = {}
    for stage in applicable(run):
        missing = stage_missing(run, stage)
        if stage.kind == "map":
            have = sorted(set(range(size(run, stage))) - set(missing))
            if have:
                done[stage.name] = chunk_ranges(have)
        elif not missing:
            done[stage.name] = "done"
    return done


def command_for(run: RunContext, stage) -> str:
    """The ``zseg`` command that runs ``stage`` on every chunk not done yet."""
    sub = stage.name.partition(":")[2]
    cmd = f"zseg {stage.phase} --run {run.root}"
    if sub == "reduce":
        cmd += " --reduce"
    elif sub:
        cmd += f" --stage {sub}"
    return cmd


def planned_stages(run) -> list[str]:
    """The names of the stages ``run`` has, as this zseg runs them: what ``run.json`` records
    as ``stages`` when the run is planned."""
    return [s.name for s in applicable(run)]


def refuse_other_stages(run) -> None:
    """Refuse a run planned by a zseg whose stages differ from this one's (an upgrade in the
    middle of a long run): its work folder holds the results of other stages, and mixing them
    could leave cells numbered that a missing stage would have removed."""
    planned = run.manifest.get("stages")
    if planned is None:  # planned before runs recorded their stages
        return
    now = planned_stages(run)
    if list(planned) != now:
        new, gone = [n for n in now if n not in planned], [n for n in planned if n not in now]
        what = "; ".join(p for p in (f"new here: {', '.join(new)}" if new else "",
                                     f"gone here: {', '.join(gone)}" if gone else "") if p) or "another order"
        raise UserError(f"{run.root!r} holds a run planned by a zseg whose stages differ from this one's ({what}); "
                        "finish it with the zseg that planned it, or pass --overwrite to start again.")


def require_complete(run: RunContext, stage) -> None:
    """Refuse to start ``stage`` while an applicable stage before it is incomplete (or when the
    run was planned by a zseg with other stages: :func:`refuse_other_stages`).

    Names the first incomplete stage, its missing chunks, and the command that runs them. Only
    the stage just before ``stage`` is listed when all is well: each of its tasks passed this
    same check when it started, and markers are only ever added, so its being complete means
    every stage before it is complete too (one listing per task, however many stages).
    """
    refuse_other_stages(run)
    stages = applicable(run)
    names = [s.name for s in stages]
    before = stages[: names.index(stage.name)] if stage.name in names else stages
    if not before:
        return
    missing = stage_missing(run, before[-1])
    if not missing:
        return
    first = before[-1]
    for s in before[:-1]:  # the error path: name the earliest incomplete stage, each listed once
        earlier = stage_missing(run, s)
        if earlier:
            first, missing = s, earlier
            break
    if first.kind == "map":
        raise UserError(
            f"{stage.name} cannot start: {len(missing)} of {size(run, first)} {noun(first)}(s) of {first.name} "
            f"are not done ({short_ranges(chunk_ranges(missing))}); run `{command_for(run, first)}` first "
            f"(it skips the {noun(first)}s that are done)."
        )
    raise UserError(f"{stage.name} cannot start: {first.name} is not done; run `{command_for(run, first)}` first.")


def redo_from(run: RunContext, first: str) -> list[str]:
    """Forget the work of stage ``first`` and of every stage after it, so that they run again:
    their markers and results, and the table partials filed by owner chunk (a new pass may file
    them under other owners). Data files a stage rewrites whole (its arrays' cores, its chunk
    files) stay until it does. Returns the stages forgotten."""
    stages = applicable(run)
    names = [s.name for s in stages]
    forgotten = stages[names.index(first):]
    for s in forgotten:
        U.remove(run.path(s.marker_dir) if s.kind == "map" else run.path(s.result))
    U.remove(run.path(W.PARTIALS_DIR))
    return [s.name for s in forgotten]
