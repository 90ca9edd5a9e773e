"""Phase 2, ``predict``: the network's flows, equal to Cellpose's whole-volume run, each tile run once.

Two stages (docs/architecture.md, "Predict units"):

* ``predict`` (map over the *predict units* of :mod:`zseg.engine.units`, fixed by the volume's
  geometry, the network and ``--predict-memory``, never by the chunking): each unit normalises
  the input its tiles need with the *global* low/high values of the percentiles phase, resizes it
  to network scale with the whole volume's coordinates, runs the tiles it owns (the YX, ZY and ZX
  views' tiles batched together) and writes its fixed-point partial sums over its reach to
  ``work/units/uNNNNNNN.zarr``. Every tile of Cellpose's whole-volume run runs in exactly one unit.
* ``predict:combine`` (map over chunks): sums the partial sums of the units that reach the chunk,
  converts them to float32 once, resizes them back to the core and writes the core of
  ``work/flows.zarr`` as float16 (or float32, ``flows_dtype``) ``(4, Z, Y, X)`` = dZ, dY, dX, cellprob.
  Integer sums do not depend on order, so the flows are the same bits for any chunking, any
  unit size and any worker count.

Units are processed in one process per task: the network is loaded once, a reader thread reads
and normalises the next unit while the device runs this one, and a writer thread stores the
previous unit's sums. Each unit's marker (``work/predict/cNNNNNNN.json``, the index a unit's) is
written after its sums, with the planes and tiles it ran.

A unit whose input (everything its tiles read) is nowhere above the low percentile in any channel
(``skip_empty``), or where the user's ``mask`` is zero, does not run the network: each of its
tiles is taken to output flows 0 and cellprob :data:`SKIPPED_CELLPROB`, blended like any tile,
so no threshold makes its inside foreground; its marker records ``"skipped": "empty"`` or
``"mask"``. The decision is the unit's, so it does not depend on the chunking either.

With ``keep_views``, each view's own output (its two flows and its cellprob, at the volume's
resolution) goes to ``work/views.zarr`` ``(3, 3, Z, Y, X)``, views in the order YX, ZY, ZX; the
flows are the same integers summed, so keeping the views does not change them.
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
from zseg.storage.arrays import create_array, is_array, open_array
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
        if plane:  # every plane in 2D (a slide's compartment, stitch mode): resized in Y and X only
            N.Geometry.planes(shape, diameter=params.diameter, diam_mean=model.get("diam_mean", 30.0))
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


def network_sizes(params, network: dict | None) -> dict:
    """The tile size (``--bsize`` for a Cellpose 3 network), family and ``diam_mean`` of
    ``--model`` (and ``--model-ortho``): what the predict units depend on. From what plan found (``network``), else read from the weights
    without downloading them (a built-in CPSAM name not downloaded yet: CPSAM's own sizes)."""
    from zseg.storage import models

    out = {}
    for key in ("model", "model_ortho"):
        name = getattr(params, key)
        if name is None:
            continue
        info = (network or {}).get(key)
        if info is None:
            try:
                info = models.inspect_model(name, download=False)
            except UserError:
                if name not in models.BUILTIN:
                    raise
                info = {"bsize": 256, "family": "cpsam", "diam_mean": 30.0}
        bsize = int(info["bsize"])
        if params.bsize is not None and params.bsize != bsize:
            if info["family"] != "cp3":
                raise UserError(f"--bsize {params.bsize}: --{key.replace('_', '-')} {name!r} is a CPSAM network, which "
                                f"runs tiles of its own size only ({bsize}), as Cellpose refuses others; leave "
                                "--bsize out.")
            bsize = params.bsize  # a Cellpose 3 U-Net runs any multiple of 16 (Cellpose's bsize)
        out[key] = {"bsize": bsize, "family": info["family"], "diam_mean": float(info["diam_mean"])}
    return out


def make_geometry(params, shape, anisotropy: float, plane: bool, sizes: dict):
    """The whole volume's network geometry (:class:`zseg.engine.views.Geometry`) for the
    networks of ``sizes`` (:func:`network_sizes`); ``plane``: every plane is segmented in 2D
    (a slide's compartment, stitch mode)."""
    from zseg.engine import views as N

    m = sizes["model"]
    cp3 = m["family"] == "cp3"
    diam_mean = m["diam_mean"] if cp3 else 30.0
    if plane:  # a slide's compartment, or stitch mode: Cellpose's 2D pass per plane
        geo = N.Geometry.planes(shape, diameter=params.diameter, bsize=m["bsize"], tile_overlap=params.tile_overlap,
                                augment=params.augment, diam_mean=diam_mean, pad_to_tile=not cp3)
    else:
        geo = N.Geometry.of(shape, diameter=params.diameter, anisotropy=anisotropy, bsize=m["bsize"],
                            tile_overlap=params.tile_overlap, augment=params.augment, diam_mean=diam_mean,
                            pad_to_tile=not cp3)
    ortho = sizes.get("model_ortho")
    if ortho is not None and not plane:  # same network scale (--model's), the ortho network's own tiles
        geo = geo.with_ortho(ortho["bsize"], tile_overlap=params.tile_overlap, pad_to_tile=ortho["family"] != "cp3")
    return geo


def plan_units(params, shape, anisotropy: float, *, nchannels: int, plane: bool, network: dict | None) -> dict:
    """The predict decomposition ``plan`` records in ``run.json`` (``predict``): the networks'
    sizes, the tiles per unit that fit ``--predict-memory``, the number of units and their tiles."""
    from zseg.engine import units as UN
    from zseg.engine import views as N

    sizes = network_sizes(params, network)
    geo = make_geometry(params, shape, anisotropy, plane, sizes)
    views = N.PLANE_VIEWS if plane else N.VIEWS
    budget = int(params.predict_memory * 2**30)
    n = UN.tiles_per_unit(geo, budget, views=views, nchannels=nchannels, keep_views=params.keep_views)
    units = UN.Units.of(geo, views, n)
    need = UN.unit_bytes(units, nchannels, params.keep_views)
    if need > budget:
        log.warning("--predict-memory %.2f GiB is less than the smallest predict unit needs (%.2f GiB, one tile "
                    "per axis): units of one tile per axis", params.predict_memory, need / 2**30)
    return {
        "sizes": sizes,
        "tiles_per_unit": n,
        "units": len(units),
        "unit_grid": list(units.grid_shape),
        "unit_bytes": need,
        "tiles": units.total_tiles,
        "cellpose_tiles": sum(t for _p, t in geo.view_counts(views).values()),
    }


def units(run: RunContext):
    """The run's predict units (:class:`zseg.engine.units.Units`), as plan decided them."""
    from zseg.engine import units as UN
    from zseg.engine import views as N

    rec = run.manifest.get("predict")
    if not isinstance(rec, dict) or not isinstance(rec.get("sizes"), dict):
        raise UserError(f"{U.join(run.root, 'run.json')!r} records no predict units; plan the run again "
                        "(--overwrite), or it was edited.")
    geo = make_geometry(run.params, run.volume_grid.shape, run.anisotropy, run.planar, rec["sizes"])
    out = UN.Units.of(geo, N.PLANE_VIEWS if run.planar else N.VIEWS, int(rec["tiles_per_unit"]))
    if len(out) != rec["units"]:
        raise UserError(f"run.json records {rec['units']} predict units but its parameters give {len(out)}: "
                        "it was edited; restore it, or start the run again with --overwrite.")
    return out


def ensure_stores(run: RunContext) -> None:
    """Create the flow store (and the view store with ``keep_views``) unless it exists: ``plan``
    does this once, before any task, for a run without precomputed ``--flows``."""
    if not applies(run):
        return
    g = run.grid
    p = run.params
    if not is_array(W.flows_uri(run)):  # also a creation killed before its metadata
        _create_flows(run)
    if p.keep_views and not is_array(run.path(VIEWS_STORE)):
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
    units: object  # zseg.engine.units.Units
    norm: object  # zseg.engine.normalize.Normalization
    mask: object | None
    net_ortho: object | None = None  # the ZY/ZX network (--model-ortho)


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
    for key in ("model", "model_ortho"):  # the weights are the ones planned with
        reads = run.reads(key)
        if reads is not None:
            reads.check(())
    device = models.select_device(p.device)
    keep = 2 if p.model_ortho else 1
    net = models.load_network(_model_path(run, "model", p.model), device, use_bfloat16=p.use_bfloat16, keep=keep)
    ortho = None
    if p.model_ortho:
        ortho = models.load_network(_model_path(run, "model_ortho", p.model_ortho), device,
                                    use_bfloat16=p.use_bfloat16, keep=keep)
    sizes = run.manifest["predict"]["sizes"]
    for key, n in (("model", net), ("model_ortho", ortho)):
        if n is not None and (n.family != sizes[key]["family"]
                              or (n.family != "cp3" and int(n.bsize) != sizes[key]["bsize"])):
            raise UserError(f"--{key.replace('_', '-')} {getattr(p, key)!r} is now a {n.family} network with tiles of "
                            f"{n.bsize} pixels, a {sizes[key]['family']} one with {sizes[key]['bsize']} when the run "
                            "was planned: the weights changed; plan again with --overwrite.")
    mask = _open_mask(p.mask) if p.mask else None
    if mask is not None:
        mask.reads = run.reads("mask")
    return _Task(net, device, units(run), W.normalization(run), mask, ortho)


def _mask_box(core, shape, mshape):
    """The mask voxels under ``core`` (volume coordinates), for a mask of any resolution."""
    return tuple(
        slice(int(math.floor(s.start * m / n)), max(int(math.ceil(s.stop * m / n)), int(math.floor(s.start * m / n)) + 1))
        for s, n, m in zip(core, shape, mshape)
    )


def _skip_reason(run: RunContext, task: _Task, box, data) -> str | None:
    """Why a unit reading the voxels ``box`` (``data``) does not run the network, if it does not."""
    if task.mask is not None:
        m = task.mask.read(_mask_box(box, run.grid.shape, task.mask.shape))
        if not np.any(m):
            return "mask"
    if run.params.skip_empty and task.norm.empty(data, [b.start for b in box]):
        return "empty"
    return None


def _prepare(run: RunContext, task: _Task, index: int):
    """Reader thread: the unit's input, normalised (host memory), or why it is skipped."""
    import torch

    t0 = time.perf_counter()
    box = task.units.read(index)
    data = run.volume.read(box)
    reason = _skip_reason(run, task, box, data)
    x = None
    if reason is None:
        x = torch.from_numpy(task.norm.apply(data, [b.start for b in box]))
        if task.device.type == "cuda":
            x = x.pin_memory()
    del data
    return index, x, reason, time.perf_counter() - t0


def _compute(run: RunContext, task: _Task, index: int, x, reason) -> np.ndarray:
    """Device: the unit's fixed-point sums over its reach (host array)."""
    from zseg.engine import units as UN

    p = run.params
    u = task.units
    if reason is not None:  # every tile outputs flows 0 and a cellprob no threshold passes
        acc = UN.accumulate(u, index, None, keep_views=p.keep_views, constant=(0.0, 0.0, SKIPPED_CELLPROB))
    else:
        scaled = UN.scale_input(u, index, x.to(task.device, non_blocking=True))
        acc = UN.accumulate(u, index, scaled, net=task.net, net_ortho=task.net_ortho, batch_size=p.batch_size,
                            dtype=task.net.dtype, keep_views=p.keep_views)
        del scaled
    return acc.cpu().numpy()


def _unit_chunks(shape) -> tuple[int, ...]:
    """Zarr chunks of a unit's sums: the reach halved along its longest axis down to 2**19 voxels."""
    chunks = list(shape[1:])
    while math.prod(chunks) > 2**19:
        ax = int(np.argmax(chunks))
        chunks[ax] = (chunks[ax] + 1) // 2
    return (shape[0], *chunks)


def _write(run: RunContext, index: int, acc: np.ndarray) -> float:
    """Writer thread: the unit's sums, in an array of its own; returns the seconds it took."""
    t0 = time.perf_counter()
    arr = create_array(W.unit_uri(run, index), shape=acc.shape, chunks=_unit_chunks(acc.shape), dtype="int64",
                       zarr_format=run.params.zarr_format, fill_value=0, overwrite=True,
                       attributes={"zseg": {"content": "fixed-point partial flow sums of one predict unit",
                                            "fraction_bits": 32}})
    arr[...] = acc
    return time.perf_counter() - t0


def predict_units(run: RunContext, indices):
    """Run the predict units ``indices`` in order; yield ``(index, stats)`` once each is written.

    Reading and normalising unit ``i + 1`` (reader thread) and writing unit ``i - 1`` (writer
    thread) overlap the network work on unit ``i``.
    """
    indices = list(indices)
    if not indices:
        return
    task = _task(run)
    reader = ThreadPoolExecutor(1, thread_name_prefix="zseg-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="zseg-write")
    pending = None  # (index, stats, future) of the unit being written
    try:
        ahead = reader.submit(_prepare, run, task, indices[0])
        for k in range(len(indices)):
            with _naming(run, task, indices[k]):
                index, x, reason, read_s = ahead.result()
            if k + 1 < len(indices):
                ahead = reader.submit(_prepare, run, task, indices[k + 1])
            t0 = time.perf_counter()
            with _naming(run, task, index):
                acc = _compute(run, task, index, x, reason)
            del x
            ran = reason is None
            stats = {"skipped": reason, "planes": task.units.nplanes(index) if ran else 0,
                     "tiles": task.units.ntiles(index) if ran else 0,
                     "box": [[s.start, s.stop] for s in task.units.box(index)],
                     "read_seconds": round(read_s, 4), "network_seconds": round(time.perf_counter() - t0, 4),
                     "device": str(task.device)}
            future = writer.submit(_write, run, index, acc)
            del acc
            if pending is not None:
                yield _finish(*pending)
            pending = (index, stats, future)
        yield _finish(*pending)
        pending = None
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _naming(run: RunContext, task: _Task, index: int):
    """Say which unit met a problem the user can fix (as the other stages do); running out of
    device memory is one (the batch size or the unit is too large for the device)."""
    where = ", ".join(f"{a} {s.start}:{s.stop}" for a, s in zip("zyx", task.units.box(index)))
    where = f"{PHASE}, unit {index} (network scale {where})"
    try:
        yield
    except UserError as e:
        raise UserError(*(f"{where}: {p}" for p in e.problems)) from None
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        raise UserError(
            f"{where}: out of device memory with --batch-size {run.params.batch_size} and units of "
            f"{run.manifest['predict']['tiles_per_unit']} tiles per axis; run again with a smaller --batch-size "
            "(the run resumes), or plan it with a smaller --predict-memory."
        ) from None


def _finish(index, stats, future):
    stats["write_seconds"] = round(future.result(), 4)
    return index, stats


def process_unit(run: RunContext, index: int) -> dict:
    """One unit (the network stays loaded for the next call in this process)."""
    for _, stats in predict_units(run, [index]):
        return stats
    return {}


# -- combine ------------------------------------------------------------------------------------
def combine_chunk(run: RunContext, index: int) -> dict:
    """The flows of one chunk's core: the sums of the units that reach it, in float32, resized back
    (with ``--no-resample`` a core of the network grid, as summed)."""
    from zseg.engine import units as UN

    p = run.params
    core = run.grid.core(index)

    def read(u, box):
        uri = W.unit_uri(run, u)
        if not U.exists(uri):
            raise UserError(f"the sums of predict unit {u} ({uri}) are missing though its marker exists; "
                            f"run `zseg predict --run {run.root} --chunks {u}` again after deleting "
                            f"{run.chunk_file(W.PREDICT_DIR, u, 'json')}.")
        return open_array(uri)[(slice(None), *box)]

    us = units(run)
    if run.at_network_scale:  # --no-resample: the network-scale samples of the core, as summed
        meeting = us.meeting(core)
        flows, views = UN.to_float(UN.combine(us, core, read, UN.channels(p.keep_views)), keep_views=p.keep_views)
    else:
        flows, views, meeting = UN.assemble(us, core, read, keep_views=p.keep_views)
    open_array(W.flows_uri(run), mode="r+")[(slice(None), *core)] = flows.astype(p.flows_dtype)
    if views is not None:
        open_array(run.path(VIEWS_STORE), mode="r+")[(slice(None), slice(None), *core)] = views.astype(np.float16)
    return {"units": len(meeting)}

