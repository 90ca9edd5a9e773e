"""Time and peak memory of each task, and their summary per stage for ``run.json``.

A task's peak resident memory is the process's high-water mark (``VmHWM``) after the task,
with the mark reset before it (``/proc/self/clear_refs``, Linux), so a pool worker that runs
many tasks reports each task's own peak. Where the reset is not possible the value is
``resource.getrusage``'s ``ru_maxrss``: the peak of the process so far, an upper bound.

Map stages keep each task's numbers in its chunk marker (``seconds``, ``peak_rss_mib``);
reduce stages in ``work/usage/<stage>.json``.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time

import numpy as np

from zseg.storage import uri as U
from zseg.workspace.stages import context, size, stage_table

USAGE_DIR = "usage"


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_mib() -> float:
    """Peak resident memory of this process (since the last reset), MiB."""
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere


@contextlib.contextmanager
def measure():
    """``with measure() as m: ...`` fills ``m`` with ``seconds``, ``peak_rss_mib`` and
    ``start_rss_mib`` (what the process held before: imports, caches)."""
    out: dict = {}
    _reset_peak()
    start = _status_mib("VmRSS")
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = round(time.perf_counter() - t0, 4)
        out["peak_rss_mib"] = round(peak_mib(), 1)
        if start is not None:
            out["start_rss_mib"] = round(start, 1)


def write_reduce(run, stage_name: str, measured: dict) -> None:
    U.write_json(run.path(USAGE_DIR, stage_name.replace(":", "_") + ".json"), measured)


def scan(run) -> tuple[dict, np.ndarray, np.ndarray]:
    """One pass over every marker: the per-stage summary (tasks, summed and longest task
    seconds, largest task peak memory, in stage order), and per chunk the seconds of all its
    map tasks and the cells it owns (``finalize:cells``). Memory: a few numbers per chunk."""
    n = run.grid.nchunks
    per_chunk_seconds = np.zeros(n, np.float64)
    cells = np.zeros(n, np.int64)
    out = {}
    for stage in stage_table(run).values():
        if stage.kind == "map":
            present = set(U.listdir(run.path(stage.marker_dir)))
            seconds, longest, peak, tasks = 0.0, 0.0, 0.0, 0
            # predict units, and a --no-resample run's network chunks, are not the volume's chunks:
            # no per-chunk seconds
            units = stage.over == "units" or context(run, stage) is not run
            for i in range(size(run, stage)):
                if f"c{i:07d}.json" not in present:
                    continue
                m = U.read_json(run.chunk_file(stage.marker_dir, i, "json"))
                t = float(m.get("seconds", 0))
                tasks += 1
                seconds += t
                longest = max(longest, t)
                peak = max(peak, float(m.get("peak_rss_mib", 0)))
                if not units:
                    per_chunk_seconds[i] += t
                if stage.name == "finalize:cells":
                    cells[i] = int(m.get("cells", 0))
            if tasks:
                out[stage.name] = {"kind": "map", "phase": stage.phase, "tasks": tasks, "seconds": round(seconds, 3),
                                   "longest_task_seconds": round(longest, 3), "peak_rss_mib": round(peak, 1)}
        else:
            path = run.path(USAGE_DIR, stage.name.replace(":", "_") + ".json")
            if U.exists(path):
                m = U.read_json(path)
                out[stage.name] = {"kind": "reduce", "phase": stage.phase, "tasks": 1,
                                   "seconds": m.get("seconds"), "peak_rss_mib": m.get("peak_rss_mib")}
    return out, per_chunk_seconds, cells


def by_phase(stages: dict) -> dict:
    """Stage usage summed into phases: seconds added, peak memory the largest."""
    out: dict = {}
    for s in stages.values():
        p = out.setdefault(s["phase"], {"seconds": 0.0, "peak_rss_mib": 0.0, "tasks": 0})
        p["seconds"] = round(p["seconds"] + float(s.get("seconds") or 0), 3)
        p["peak_rss_mib"] = max(p["peak_rss_mib"], float(s.get("peak_rss_mib") or 0))
        p["tasks"] += int(s.get("tasks") or 0)
    return out
