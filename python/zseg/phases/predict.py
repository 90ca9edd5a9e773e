"""Phase 2, ``predict``: the network's flows for each chunk, equal to Cellpose's whole-volume run.

For each chunk, the block of input its core needs is normalised with the *global* low/high
values of the percentiles phase, resized with the whole volume's coordinates, cut into the
tiles of the *whole-volume* tile grid that cover the core, run through the network on the
YX, ZY and ZX planes, blended with the whole planes' weights, summed over the views and
resized back; the core is written to the flow store ``work/flows.zarr`` as float16 (or float32,
``flows_dtype``) ``(4, Z, Y, X)`` = dZ, dY, dX, cellprob. :mod:`zseg.engine.views` explains why this equals
``CellposeModel.eval(do_3D=True)`` on the whole volume whatever the chunk shape.

Chunks are processed in one process per task: the network is loaded once, a reader thread
reads and normalises the next chunk while the device runs this one, and a writer thread
stores the previous chunk's result, so the device does not wait on I/O. Each chunk's marker
(``work/predict/cNNNNNNN.json``) is written after its flows, with the planes and tiles it ran.

A chunk whose block (core plus the dynamics halo) is nowhere above the low percentile in any
channel (``skip_empty``), or where the user's ``mask`` is zero, is not run: its flows are 0
and its cellprob :data:`SKIPPED_CELLPROB`, so no threshold makes it foreground; its marker
records ``"skipped": "empty"`` or ``"mask"``. Skipping depends on the block, i.e. on the
chunk shape; ``--no-skip-empty`` and no mask give flows that never do.

With ``keep_views``, each view's own output (its two flows and its cellprob, at the volume's
resolution) goes to ``work/views.zarr`` ``(3, 3, Z, Y, X)``, views in the order YX, ZY, ZX.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from zseg.errors import UserError
from zseg.storage import uri as U
from zseg.storage.arrays import create_array, open_array
from zseg.storage.volume import open_volume
from zseg.workspace import work as W
from zseg.workspace.context import RunContext

# The network modules (zseg.engine.views, zseg.storage.models) bring torch, several hundred MiB
# per process: they are imported inside the functions that run or inspect a network, so the
# workers of the other stages, which import this module through the stage table, never load it.

log = logging.getLogger(__name__)

PHASE = "predict"
#: cellprob written for a skipped chunk: far below any threshold a user would set.
SKIPPED_CELLPROB = -100.0
VIEWS_STORE = W.VIEWS_STORE


# -- plan time ---------------------------------------------------------------------------------
def check(params, shape, anisotropy: float, *, nchannels: int | None = None, plane: bool = False) -> dict:
    """What ``plan`` records for this phase; raises ``UserError`` before anything is written.

    Resolves the model (downloading a missing built-in one) and reads its sizes, and checks
    the mask and that the network scale keeps every axis.
    """
    from zseg.engine import views as N
    from zseg.storage import models

    model = models.inspect_model(params.model)
    try:
        if plane:  # a slide's compartment: Cellpose's 2D eval, resized in Y and X only
            N.Geometry.plane(shape[1:], diameter=params.diameter, diam_mean=model.get("diam_mean", 30.0))
        else:
            N.scaled_shape(shape, diameter=params.diameter, anisotropy=anisotropy,
                           diam_mean=model.get("diam_mean", 30.0))
    except ValueError as e:
        raise UserError(f"{e}; use a smaller --diameter.") from None
    out = {"model": model, "mask": None}
    if params.model_ortho:
        out["model_ortho"] = models.inspect_model(params.model_ortho)
    for key in ("model", "model_ortho"):
        info = out.get(key)
        takes = info["network"]["nbase"][0] if info and info["family"] == "cp3" else None
        if takes is not None and nchannels is not None and nchannels > takes:
            raise UserError(
                f"--{key.replace('_', '-')} {info['name']!r} is a Cellpose 3 network that takes {takes} channels "
                f"(cytoplasm, then the optional nucleus channel) but the input has {nchannels}; choose them "
                f"with --channels (e.g. --channels 0,1)."
            )
    if params.mask is not None:
        out["mask"] = _open_mask(params.mask).describe()
    return out


def _open_mask(uri: str):
    if not U.exists(uri):
        raise UserError(f"--mask {uri!r} does not exist; give a volume whose nonzero voxels mark where to segment.")
    vol = open_volume(uri)
    if vol.nchannels != 1:
        raise UserError(f"--mask {uri!r} has {vol.nchannels} channels; give a single-channel volume.")
    return vol


def ensure_stores(run: RunContext) -> None:
    """Create the flow store (and the view store with ``keep_views``) unless it exists: ``plan``
    does this once, before any task, for a run without precomputed ``--flows``."""
    if not applies(run):
        return
    g = run.grid
    p = run.params
    if not U.exists(W.flows_uri(run)):
        _create_flows(run)
    if p.keep_views and not U.exists(run.path(VIEWS_STORE)):
        from zseg.engine.views import VIEWS

        create_array(
            run.path(VIEWS_STORE), shape=(3, 3, *g.shape), chunks=(3, 3, *g.chunk_shape), dtype="float16",
            zarr_format=p.zarr_format, fill_value=0, overwrite=True,
            attributes={"zseg": {"views": list(VIEWS), "content": "per view: flow along its first and "
                                 "second plane axis, cellprob"}},
        )


def _create_flows(run: RunContext) -> None:
    g = run.grid
    p = run.params
    create_array(
        W.flows_uri(run), shape=(4, *g.shape), chunks=(4, *g.chunk_shape), dtype=p.flows_dtype,
        zarr_format=p.zarr_format, fill_value=0, overwrite=True,
        attributes={"zseg": {"content": "dZ, dY, dX, cellprob (Cellpose 3D: views summed, network scale)"}},
    )


def applies(run: RunContext) -> bool:
    return run.params.flows is None


# -- a task -------------------------------------------------------------------------------------
@dataclass
class _Task:
    net: object  # the torch module
    device: object  # torch.device
    geometry: object  # zseg.engine.views.Geometry
    lowhigh: np.ndarray
    mask: object | None
    net_ortho: object | None = None  # the ZY/ZX network (--model-ortho)


def geometry(run: RunContext, bsize: int, *, family: str = "cpsam", diam_mean: float = 30.0):
    """The whole volume's network geometry (:class:`zseg.engine.views.Geometry`) for a
    network of ``family`` (Cellpose 3: rescale by its ``diam_mean``, Cellpose 3's tiles)."""
    from zseg.engine import views as N

    p = run.params
    cp3 = family == "cp3"
    if run.plane is not None:  # a slide's compartment: the 2D network pass of Cellpose's eval
        return N.Geometry.plane(run.grid.shape[1:], diameter=p.diameter, bsize=bsize, tile_overlap=p.tile_overlap,
                                augment=p.augment, diam_mean=diam_mean if cp3 else 30.0, pad_to_tile=not cp3)
    return N.Geometry.of(run.grid.shape, diameter=p.diameter, anisotropy=run.anisotropy, bsize=bsize,
                         tile_overlap=p.tile_overlap, augment=p.augment,
                         diam_mean=diam_mean if cp3 else 30.0, pad_to_tile=not cp3)


def _model_path(run: RunContext, key: str, model: str) -> str:
    """The weights file of ``model``: the one plan found if it is still there as it was."""
    from zseg.storage import models

    info = (run.manifest.get("network") or {}).get(key) or {}  # what plan found, if it looked
    path = info.get("path")
    if not (isinstance(path, str) and os.path.isfile(path) and os.path.getsize(path) == info.get("bytes")):
        if path:
            log.info("model file %s (found at plan) is not here as it was: resolving %s again", path, model)
        path = models.inspect_model(model)["path"]
    return path


def _task(run: RunContext) -> _Task:
    from zseg.storage import models

    p = run.params
    device = models.select_device(p.device)
    keep = 2 if p.model_ortho else 1
    net = models.load_network(_model_path(run, "model", p.model), device, use_bfloat16=p.use_bfloat16, keep=keep)
    ortho = None
    if p.model_ortho:
        ortho = models.load_network(_model_path(run, "model_ortho", p.model_ortho), device,
                                    use_bfloat16=p.use_bfloat16, keep=keep)
    lowhigh = W.lowhigh(run)
    mask = _open_mask(p.mask) if p.mask else None
    geo = geometry(run, net.bsize, family=getattr(net, "family", "cpsam"), diam_mean=float(net.diam_mean))
    if ortho is not None:  # same network scale (--model's), the ortho network's own tiles
        geo = geo.with_ortho(ortho.bsize, tile_overlap=p.tile_overlap,
                             pad_to_tile=getattr(ortho, "family", "cpsam") != "cp3")
    return _Task(net, device, geo, lowhigh, mask, ortho)


def _mask_box(core, shape, mshape):
    """The mask voxels under ``core`` (volume coordinates), for a mask of any resolution."""
    return tuple(
        slice(int(math.floor(s.start * m / n)), max(int(math.ceil(s.stop * m / n)), int(math.floor(s.start * m / n)) + 1))
        for s, n, m in zip(core, shape, mshape)
    )


def _skip_reason(run: RunContext, task: _Task, index: int) -> str | None:
    g = run.grid
    block = g.block(index)
    if task.mask is not None:
        m = task.mask.read(_mask_box(block, g.shape, task.mask.shape))
        if not np.any(m):
            return "mask"
    if run.params.skip_empty:
        data = run.volume.read(block)
        peak = data.reshape(data.shape[0], -1).max(axis=1).astype(np.float64)
        if np.all(peak <= task.lowhigh[:, 0]):
            return "empty"
    return None


def _prepare(run: RunContext, task: _Task, index: int):
    """Reader thread: the chunk's plan and each view's normalised input (host memory)."""
    from zseg.engine import views as N

    t0 = time.perf_counter()
    core = run.grid.core(index)
    reason = _skip_reason(run, task, index)
    if reason:
        return index, core, None, reason, [], time.perf_counter() - t0
    plan = N.plan_block(task.geometry, core, views=N.PLANE_VIEWS if run.plane is not None else N.VIEWS)
    inputs = N.view_inputs(plan, run.volume.read, task.lowhigh, pin=task.device.type == "cuda")
    return index, core, plan, None, inputs, time.perf_counter() - t0


def _compute(run: RunContext, task: _Task, plan, inputs) -> tuple[np.ndarray, np.ndarray | None]:
    """Device: the views of one chunk, summed and resized back to its core (host arrays)."""
    import torch

    from zseg.engine import views as N

    p = run.params
    flows, kept = N.run_block(task.net, plan, inputs, task.geometry, batch_size=p.batch_size, device=task.device,
                              dtype=task.net.dtype, keep_views=p.keep_views, net_ortho=task.net_ortho)
    out = flows.to(getattr(torch, p.flows_dtype)).cpu().numpy()
    views = np.stack([v.to(torch.float16).cpu().numpy() for v in kept]) if kept else None
    return out, views


def _write(run: RunContext, core, flows: np.ndarray, views: np.ndarray | None) -> float:
    """Writer thread: the core's flows (and views); returns the seconds it took."""
    t0 = time.perf_counter()
    open_array(W.flows_uri(run), mode="r+")[(slice(None), *core)] = flows
    if views is not None:
        open_array(run.path(VIEWS_STORE), mode="r+")[(slice(None), slice(None), *core)] = views
    return time.perf_counter() - t0


def _skipped(core, keep_views: bool):
    shape = tuple(s.stop - s.start for s in core)
    flows = np.zeros((4, *shape), np.float32)  # stored as the flow store's dtype
    flows[3] = SKIPPED_CELLPROB
    views = None
    if keep_views:
        views = np.zeros((3, 3, *shape), np.float16)
        views[:, 2] = SKIPPED_CELLPROB / 3
    return flows, views


def predict_chunks(run: RunContext, indices):
    """Predict the chunks ``indices`` in order; yield ``(index, stats)`` once each is written.

    Reading and normalising chunk ``i + 1`` (reader thread) and writing chunk ``i - 1`` (writer
    thread) overlap the network work on chunk ``i``.
    """
    indices = list(indices)
    if not indices:
        return
    task = _task(run)
    reader = ThreadPoolExecutor(1, thread_name_prefix="zseg-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="zseg-write")
    pending = None  # (index, stats, future) of the chunk being written
    try:
        ahead = reader.submit(_prepare, run, task, indices[0])
        for k in range(len(indices)):
            with _naming(run, indices[k]):
                index, core, plan, reason, inputs, read_s = ahead.result()
            if k + 1 < len(indices):
                ahead = reader.submit(_prepare, run, task, indices[k + 1])
            t0 = time.perf_counter()
            if reason:
                flows, views = _skipped(core, run.params.keep_views)
                stats = {"skipped": reason, "planes": 0, "tiles": 0}
            else:
                with _naming(run, index):
                    flows, views = _compute(run, task, plan, inputs)
                stats = {"skipped": None, "planes": plan.planes, "tiles": plan.ntiles}
            del inputs
            stats.update(read_seconds=round(read_s, 4), network_seconds=round(time.perf_counter() - t0, 4),
                         device=str(task.device))
            future = writer.submit(_write, run, core, flows, views)
            if pending is not None:
                yield _finish(*pending)
            pending = (index, stats, future)
        yield _finish(*pending)
        pending = None
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _naming(run: RunContext, index: int):
    """Say which chunk met a problem the user can fix (as the other stages do); running out of
    device memory is one (the batch size or the chunk shape is too large for the device)."""
    where = ", ".join(f"{a} {s.start}:{s.stop}" for a, s in zip("zyx", run.grid.core(index)))
    try:
        yield
    except UserError as e:
        raise UserError(*(f"{PHASE}, chunk {index} ({where}): {p}" for p in e.problems)) from None
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        raise UserError(
            f"{PHASE}, chunk {index} ({where}): out of device memory with --batch-size {run.params.batch_size} "
            f"and chunks of {run.grid.chunk_shape}; run again with a smaller --batch-size (the run resumes), "
            "or plan it with a smaller --chunk-shape."
        ) from None


def _finish(index, stats, future):
    stats["write_seconds"] = round(future.result(), 4)
    return index, stats


def process_chunk(run: RunContext, index: int) -> dict:
    """One chunk (the network stays loaded for the next call in this process)."""
    for _, stats in predict_chunks(run, [index]):
        return stats
    return {}
