"""Phase 3, ``seeds``: follow the flows once per voxel, then find the seeds each core owns.

Stage ``follow`` (map): every foreground voxel of the core is followed through the flows of
its block (core + halo) for ``niter`` steps; its integer end displacement goes to
``work/ends.zarr``. Trajectories are integrated as displacements from the voxel's own integer
start (:func:`zseg.engine.dynamics.follow_flows`), so they are bitwise the same in every chunk
frame: this is what makes the labels independent of the chunking.

Stage ``find`` (map, after every ``follow``): the end points of all voxels of the block are
histogrammed over the core grown by ``MARGIN``; the histogram's local maxima that lie in the
core are the chunk's seeds, and each seed's region is grown as Cellpose grows it
(docs/architecture.md, "Invariants": what the halo must hold). Exact as
long as no trajectory is longer than ``halo - MARGIN`` (counted and reported otherwise).
"""

from __future__ import annotations

import datetime as dt
import os
import socket

import numpy as np

from zseg.engine import dynamics as D
from zseg.errors import UserError
from zseg.storage import uri as U
from zseg.storage.grid import box_origin, box_shape, grow, relative
from zseg.workspace import work as W
from zseg.workspace.context import RunContext
from zseg.workspace.progress import redo_from

#: Half-width of Cellpose's seed region window (:data:`zseg.engine.dynamics.REGION_WINDOW` wide):
#: how far around its core a chunk histograms end points.
MARGIN = D.REGION_WINDOW // 2
WINDOW = D.REGION_WINDOW


def smoothing_radius(sigmas) -> tuple[int, ...]:
    """Voxels a Gaussian of ``sigmas`` reaches (scipy's default truncate of 4)."""
    return tuple(int(4.0 * float(s) + 0.5) if s > 0 else 0 for s in sigmas)


def dynamics_device(spec: str):
    """Where trajectories run: None for the numba CPU kernel, else a torch GPU device.

    ``auto`` takes CUDA when there is one; ``cpu`` (or no GPU) keeps the numba kernel, which
    is faster than torch on a CPU and gives the same bits. Without an NVIDIA device node,
    ``auto`` decides without importing torch (hundreds of MiB per worker for nothing).
    """
    if spec == "cpu" or (spec == "auto" and not any(
            os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia"))):
        return None
    # torch (hundreds of MiB per worker) is imported only where a GPU may follow trajectories
    from zseg.storage.models import select_device

    dev = select_device(spec)
    return dev if dev.type == "cuda" else None  # MPS has no float64 for the sample positions


def _kind(device) -> str:
    return "cpu" if device is None else "cuda"


def _record(device) -> dict:
    return {"device": _kind(device), "host": socket.gethostname(), "pid": os.getpid(),
            "decided": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def recorded_device(run: RunContext) -> dict | None:
    """The record of where this run's trajectories are followed (``work/dynamics.json``), if made."""
    uri = run.path(W.DYNAMICS_RESULT)
    return U.read_json(uri) if U.exists(uri) else None


def run_device(run: RunContext):
    """The device this task follows trajectories on: the run's, decided once.

    The first ``seeds:follow`` task resolves ``--device`` where it runs (never the plan task:
    under Nextflow it runs on a CPU node) and records the result; every later task uses the same
    kind of device, since a CPU and a GPU give trajectories different last bits and a run must
    not mix them. A task on a machine that would decide otherwise is refused.
    """
    cache = run.__dict__.setdefault("_dynamics_device", [])  # decided once per process
    if cache:
        return cache[0]
    here = dynamics_device(run.params.device)
    uri = run.path(W.DYNAMICS_RESULT)
    rec = recorded_device(run)  # a read, not a create, once the first task has decided
    if rec is None and U.create_json(uri, _record(here)):
        cache.append(here)
        return here
    was = (rec or U.read_json(uri))["device"]
    if was != _kind(here):
        raise UserError(
            f"this run's trajectories are followed on {was} (decided by its first seeds:follow task: {uri}), but "
            f"this task would follow them on {_kind(here)}, which gives other bits; run seeds:follow with "
            f"--device {was} (on a {'GPU' if was == 'cuda' else 'CPU'} node), or resume with `zseg run` here, which "
            "redoes the seeds.")
    cache.append(here)
    return here


def adopt_device(run: RunContext) -> str | None:
    """``zseg run`` resuming on a machine that follows trajectories on another device than the
    run's first pass: forget the seeds and everything after them, which this run redoes. Returns
    what it did, for the log, or None when nothing changed."""
    rec = recorded_device(run)
    here = _kind(dynamics_device(run.params.device))
    if rec is None or rec["device"] == here:
        return None
    forgotten = redo_from(run, "seeds:follow")
    U.remove(run.path(W.DYNAMICS_RESULT))
    run.__dict__.pop("_dynamics_device", None)  # this process decides again
    return (f"the trajectories of this run were followed on {rec['device']} (on {rec['host']}), this machine follows "
            f"them on {here}: redoing {', '.join(forgotten)}")


def follow_chunk(run: RunContext, index: int) -> dict:
    """Reads the block's flows (plus the smoothing radius); writes the core of ``work/ends.zarr``.
    The marker counts foreground, escaped and too-long trajectories."""
    g, p = run.grid, run.params
    core, block = g.core(index), g.block(index)
    sigmas = p.flow3D_smooth[-g.ndim:]
    read_box = grow(block, smoothing_radius(sigmas), g.shape)
    raw = np.asarray(W.flows(run)[(slice(None), *read_box)])
    try:
        flow, fg = D.prepare_flows(
            raw[:-1], raw[-1], cellprob_threshold=p.cellprob_threshold, flow3D_smooth=sigmas
        )
    except ValueError as e:  # NaN or inf in the flow store: say where the flows came from
        raise UserError(f"{e}: the prediction is corrupt (or overflowed float16); recompute the flows "
                        "(the predict phase, or the store given with --flows).") from None
    crop = relative(block, read_box)
    flow = np.ascontiguousarray(flow[(slice(None), *crop)])
    fg = fg[crop]
    cib = g.core_in_block(index)
    local = np.argwhere(fg[cib])  # (N, ndim) in core coordinates
    starts = local + box_origin(cib)
    if run.stitching:  # Cellpose's 2D dynamics on each plane (the block has no Z halo to step into)
        disp, escaped = _follow_planes(run, flow, starts, block, run_device(run))
    else:
        disp, escaped = D.follow_flows(
            flow, starts, niter=int(run.manifest["niter"]), origin=box_origin(block), volume_shape=g.shape,
            device=run_device(run),
        )
    step = np.floor(disp).astype(np.int64)
    reach = np.asarray(g.halo) - MARGIN
    if run.planar:  # a slide's one plane, or stitch mode: the flows have no Z component, no Z steps
        reach[0] = np.iinfo(np.int64).max
    long = escaped | (np.abs(step) > reach).any(axis=1)
    dt = W.ends_dtype(g.shape)
    out = np.full((g.ndim, *box_shape(core)), np.iinfo(dt).min, dtype=dt)
    out[(slice(None), *local.T)] = step.T
    W.ends(run, mode="r+")[(slice(None), *core)] = out
    return {
        "foreground": int(len(local)),
        "escaped": int(escaped.sum()),
        "long": int(long.sum()),
        "max_step": [int(v) for v in (np.abs(step).max(axis=0) if len(step) else np.zeros(g.ndim))],
    }


def _follow_planes(run: RunContext, flow: np.ndarray, starts: np.ndarray, block, device):
    """Stitch mode: trajectories followed in 2D, plane by plane (Z steps are 0)."""
    disp = np.zeros((len(starts), 3), np.float32)
    escaped = np.zeros(len(starts), bool)
    origin = box_origin(block)
    for k in np.unique(starts[:, 0]).tolist():
        sel = starts[:, 0] == k
        d, e = D.follow_flows(np.ascontiguousarray(flow[1:, k]), starts[sel][:, 1:], niter=int(run.manifest["niter"]),
                              origin=origin[1:], volume_shape=run.grid.shape[1:], device=device)
        disp[sel, 1:], escaped[sel] = d, e
    return disp, escaped


def block_end_points(run: RunContext, box) -> tuple[np.ndarray, np.ndarray]:
    """Start and end points (volume coordinates) of the followed voxels of ``box``."""
    e = np.asarray(W.ends(run)[(slice(None), *box)])
    valid = e[0] != np.iinfo(e.dtype).min
    starts = np.argwhere(valid) + box_origin(box)
    return starts, starts + e[:, valid].T.astype(np.int64)


def find_chunk(run: RunContext, index: int) -> dict:
    """Reads the block's end points; writes the seeds the core owns, their histogram counts and
    regions to ``work/seeds/cNNNNNNN.npz``."""
    g = run.grid
    core = g.core(index)
    hbox = grow(core, MARGIN, g.shape)
    _, ends = block_end_points(run, g.block(index))
    boxes = [hbox]
    if run.stitching:  # each plane on its own, as Cellpose's 2D masks: a one-plane histogram per plane
        boxes = [(slice(z, z + 1), *hbox[1:]) for z in range(core[0].start, core[0].stop)]
    found = [_find(ends, box, core) for box in boxes]
    seeds = np.concatenate([f[0] for f in found]) if found else np.zeros((0, g.ndim), np.int64)
    counts = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.int64)
    regions = np.concatenate([f[2] for f in found]) if found else np.zeros((0, *(WINDOW,) * g.ndim), bool)
    U.write_npz(
        run.chunk_file(W.SEEDS_DIR, index),
        seeds=seeds.astype(np.int64),
        counts=counts.astype(np.int32),
        regions=np.packbits(regions.reshape(len(seeds), WINDOW**g.ndim), axis=1),
    )
    return {"seeds": int(len(seeds))}


def _find(ends: np.ndarray, hbox, core):
    """Seeds (volume coordinates), counts and regions of the end points inside ``hbox``; seeds only
    where ``hbox`` meets ``core``."""
    lo, hi = box_origin(hbox), np.array([s.stop for s in hbox])
    inside = np.all((ends >= lo) & (ends < hi), axis=1)
    h = D.histogram(ends[inside] - lo, box_shape(hbox))
    within = tuple(slice(max(c.start, b.start) - b.start, min(c.stop, b.stop) - b.start) for c, b in zip(core, hbox))
    seeds, counts = D.find_seeds(h, within=within)
    return seeds + lo, counts, D.grow_seeds(h, seeds)


def load_seeds(run: RunContext, index: int) -> dict[str, np.ndarray]:
    """The seeds of chunk ``index`` with their regions unpacked to ``(k, *window)`` booleans."""
    d = U.read_npz(run.chunk_file(W.SEEDS_DIR, index))
    k, nd = len(d["seeds"]), run.grid.ndim
    bits = np.unpackbits(d["regions"], axis=1, count=WINDOW**nd) if k else np.zeros((0, WINDOW**nd), np.uint8)
    d["regions"] = bits.astype(bool).reshape(k, *(WINDOW,) * nd)
    return d
