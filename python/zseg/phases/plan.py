"""Phase 0, ``plan``: validate the input and parameters, fix the chunk grid, write ``run.json``.

Everything is checked before anything is written, so a refused run leaves no trace.
"""

from __future__ import annotations

import datetime as dt
import logging
import math

from zseg.errors import UserError
from zseg.params import RunParams
from zseg.phases import predict
from zseg.storage import fingerprint as FP
from zseg.storage import uri as U
from zseg.storage.arrays import is_array, open_array
from zseg.storage.grid import ChunkGrid
from zseg.storage.volume import open_volume
from zseg.workspace.context import RunContext, read_manifest, versions, write_manifest
from zseg.workspace.lock import LOCK
from zseg.workspace.progress import planned_stages, refuse_other_stages
from zseg.workspace.work import create_ends

log = logging.getLogger(__name__)

# Parameters that change how a run executes but not what it computes: a run may be resumed
# with other values of these.
EXECUTION_ONLY = ("workers", "device", "overwrite", "batch_size")


def default_halo(diameter: float, anisotropy: float) -> tuple[int, int, int]:
    """2 x diameter in Y and X, and in Z the same physical length in Z voxels."""
    yx = int(math.ceil(2 * diameter))
    return (int(math.ceil(2 * diameter / anisotropy)), yx, yx)


def _result_params(params: RunParams) -> dict:
    return params.model_dump(mode="json", exclude=set(EXECUTION_ONLY))


#: The chunk shape of a volume run when --chunk-shape is not given.
DEFAULT_CHUNK = (128, 256, 256)


def check_flow_store(uri: str, expected: tuple[int, ...], flag: str = "--flows") -> dict:
    """Refuse a flow store that is missing, not zarr, not floating point or of another shape."""
    layout = "(dZ, dY, dX, cellprob)" if len(expected) == 4 else "(dY, dX, cellprob)"
    want = f"a zarr array {expected} = {layout}"
    if not U.exists(uri):
        raise UserError(f"{flag}: flow store {uri!r} does not exist; give the path of {want}.")
    try:
        arr = open_array(uri)
    except Exception as e:
        raise UserError(f"{flag}: flow store {uri!r} is not a zarr array ({e}); give {want}.") from None
    if arr.dtype.kind != "f":
        raise UserError(
            f"{flag}: flow store {uri!r} has data type {arr.dtype}, but flows are floating point "
            f"(float16 or float32: {layout} as the network gives them); give the flows as floats."
        )
    if tuple(arr.shape) != tuple(expected):
        raise UserError(f"{flag}: flow store {uri!r} has shape {tuple(arr.shape)} but the input needs {want}; "
                        "give the flows computed for this input.")
    return {"uri": uri, "shape": list(arr.shape), "dtype": str(arr.dtype)}


def _check_flows(params: RunParams, shape, plane: bool = False) -> dict | None:
    if params.flows is None:
        return None
    expected = (len(shape) + 1, *shape)
    if not params.resample and U.exists(params.flows):  # at the network's scale: its shape is the network's
        given = open_array(params.flows).shape
        if len(given) == len(expected) and given[0] == expected[0]:
            expected = tuple(given)
    if plane and U.exists(params.flows) and len(open_array(params.flows).shape) == 3:  # a slide's (3, Y, X)
        expected = (3, *shape[1:])
    return check_flow_store(params.flows, expected)


def existing_manifest(params: RunParams) -> dict | None:
    """The ``run.json`` of the output folder, or None when there is a folder to create (missing,
    empty, or deleted for ``--overwrite``); a folder with other contents is refused."""
    out = params.output
    # the lock of the run planning it, and what an atomic write killed midway left, are no run
    if not U.exists(out) or not [e for e in U.listdir(out) if e != LOCK and not U.is_leftover(e)]:
        return None
    if params.overwrite:
        log.info("--overwrite: deleting the existing output folder %s", out)
        U.remove_entries(out, keep=(LOCK,))
        return None
    manifest = read_manifest(out)
    if manifest is None:
        raise UserError(
            f"output {out!r} exists and is not a zseg run folder; choose a new folder or pass --overwrite to replace it."
        )
    return manifest


def take_fingerprints(params: RunParams, volume) -> dict:
    """The fingerprint (:mod:`zseg.storage.fingerprint`) of every store the run will read: the
    input's array (``volume``: a volume or a slide), --flows, --nuclear-flows, --mask, and the
    model files given as paths."""
    stores = {"input": volume.describe()["array"], "flows": params.flows, "nuclear_flows": params.nuclear_flows,
              "mask": open_volume(params.mask).describe()["array"] if params.mask is not None else None}
    for key, path in (("model", params.model), ("model_ortho", params.model_ortho)):
        if path and params.flows is None and U.exists(path) and FP.is_file(path):  # not a built-in's name
            stores[key] = path
    stores = {name: uri for name, uri in stores.items() if uri is not None}
    return {name: FP.take(uri) for name, uri in stores.items()}


def write_fingerprint_tables(run, fingerprints: dict) -> None:
    for name, (summary, table) in fingerprints.items():
        if table is not None:
            FP.write_table(run.fingerprint_table(name, summary), table)


def restore_fingerprint_tables(run) -> None:
    """Write again the object tables a plan killed after ``run.json`` did not write whole (the
    stores are unchanged: :func:`refuse_changed_inputs` passed, so their listing now is the
    planned one)."""
    for name, rec in (run.manifest.get("fingerprint") or {}).items():
        table = run.fingerprint_table(name, rec)
        if table is not None and not FP.table_holds(table, rec):
            summary, values = FP.take(rec["uri"])
            if summary["digest"] == rec["digest"]:
                FP.write_table(table, values)


def refuse_changed_inputs(run, described: dict | None, advice: str) -> None:
    FP.refuse_changes(run.input_changes(described), f"a run must read one input throughout: restore it, or {advice}")


def refuse_unless_resumable(params: RunParams, before: RunParams, complete: bool) -> None:
    """Refuse to resume a finished run, or an unfinished one planned with other parameters
    (execution-only ones aside)."""
    out = params.output
    if complete:
        raise UserError(
            f"output {out!r} already holds a finished run; pass --overwrite to recompute it or choose a new folder."
        )
    was, now = _result_params(before), _result_params(params)
    changed = sorted(k for k in now if was.get(k) != now[k])
    if changed:
        raise UserError(
            f"output {out!r} holds an unfinished run with other parameters ({', '.join(changed)} differ); "
            "pass --overwrite to start again or choose a new folder."
        )


def _existing_output(params: RunParams, described: dict) -> RunContext | None:
    """Decide what to do with an existing output folder; return the run to resume, if any."""
    if existing_manifest(params) is None:
        return None
    old = RunContext.open(params.output)
    if old.manifest.get("complete"):  # the same command after the input changed: say so
        changes = old.input_changes(described)
        if changes:
            raise UserError(f"output {params.output!r} holds a finished run of the input as it was: "
                            f"{'; '.join(changes)} since; pass --overwrite to segment it as it is now, or choose "
                            "a new folder.")
    refuse_unless_resumable(params, old.params, bool(old.manifest.get("complete")))
    refuse_other_stages(old)
    refuse_changed_inputs(old, described, "pass --overwrite to start again with them.")
    return old


def _network_grid(params: RunParams, grid: ChunkGrid, flows: dict | None, predict_rec: dict | None,
                  anisotropy: float) -> dict:
    """``--no-resample``: the grid of the stages at the network's scale (``run.json``
    ``network_grid``). Its shape is Cellpose's network scale (``int(Lz * anisotropy * rescale),
    int(Ly * rescale), int(Lx * rescale)``), or the given flows' own; its cores have the
    ``--chunk-shape``; its halo is ``--halo`` brought to that scale, by default 2 x the network's
    diameter on every axis (a cell is isotropic there)."""
    if grid.shape[0] == 1:
        raise UserError("--no-resample: a single z plane is a 2D image, and zseg follows the flows of one at its own "
                        "scale; leave --no-resample out.")
    if flows is not None:
        nshape = tuple(flows["shape"][1:])
    else:
        sizes = predict_rec["sizes"]
        nshape = tuple(predict.make_geometry(params, grid.shape, anisotropy, False, sizes).scaled)
    if params.halo is not None:
        halo = tuple(-(-h * n // s) for h, n, s in zip(params.halo, nshape, grid.shape))
    else:
        diam_mean = 30.0 if predict_rec is None else float(predict_rec["sizes"]["model"].get("diam_mean") or 30.0)
        halo = default_halo(diam_mean, 1.0)
    g = ChunkGrid(nshape, tuple(min(c, n) for c, n in zip(grid.chunk_shape, nshape)), halo)
    return {"shape": list(g.shape), "chunk_shape": list(g.chunk_shape), "halo": list(g.halo),
            "grid_shape": list(g.grid_shape), "nchunks": g.nchunks}


def _diam_mean(params: RunParams, network: dict | None) -> float:
    """The network's ``diam_mean`` for the default ``niter`` (Cellpose: ``200 / rescale``)."""
    if params.niter is not None or params.flows is not None:
        return 30.0  # not used / flows given: Cellpose 4's rule
    if network is not None:
        return float(network["model"]["diam_mean"])
    from zseg.storage import models  # torch: imported only when a model must be read

    if params.model in models.BUILTIN:
        return 30.0
    try:  # reads only the tensor shapes; never downloads here
        return float(models.inspect_model(params.model, download=False)["diam_mean"])
    except UserError:
        log.warning("model %r is not here to read its diam_mean: niter defaults to 200 * diameter / 30; "
                    "give --niter for a Cellpose 3 model trained at another diameter", params.model)
        return 30.0


def plan(params: RunParams, *, check_model: bool = False, plane: dict | None = None) -> RunContext:
    """Validate ``params`` against the input and write the run manifest (or resume an unfinished run).

    ``check_model``: also find the network (downloading a missing built-in one) and read its
    sizes, so that a missing or wrong model stops the run before anything is written (``zseg run``
    and Nextflow's plan task do; without it the predict tasks find the model).

    ``plane``: this run is one compartment of a 2D slide run (:mod:`zseg.phases.slide`), a
    one-plane volume with Cellpose's 2D semantics; the dict (flow threshold, patch skipping) is
    kept in ``run.json`` as ``plane``.
    """
    if params.chunk_shape is None:
        params = params.model_copy(update={"chunk_shape": DEFAULT_CHUNK})
    elif len(params.chunk_shape) != 3:
        raise UserError(f"--chunk-shape {','.join(map(str, params.chunk_shape))}: a volume's chunks take three "
                        "numbers Z,Y,X (two, Y,X, are for 2D slides); e.g. 128,256,256.")
    if params.halo is not None and len(params.halo) != 3:
        raise UserError(f"--halo {','.join(map(str, params.halo))}: a volume's halo takes three numbers Z,Y,X "
                        "(two, Y,X, are for 2D slides); e.g. 8,32,32.")
    if not U.exists(params.input):
        raise UserError(f"input {params.input!r} does not exist; give the path or s3:// URI of a volume.")
    volume = open_volume(
        params.input, axes=params.axes, level=params.level, channels=params.channels, timepoint=params.timepoint,
        channel_axis=params.channel_axis, z_axis=params.z_axis,
    )
    shape = tuple(volume.shape)
    voxel_size = params.voxel_size or volume.voxel_size
    if params.anisotropy is not None:
        anisotropy = params.anisotropy
    elif voxel_size is not None:
        anisotropy = voxel_size[0] / voxel_size[1]
    else:
        anisotropy = 1.0
    if shape[0] == 1 and params.flows is None and plane is None and not params.stitch_threshold:
        raise UserError(
            f"input {params.input!r} has a single z plane (shape {shape}): 3D Cellpose would run its ZY and ZX "
            "views on images one pixel tall; segment it as a 2D image with Cellpose, or give flows computed "
            "for it with --flows."
        )
    if params.diameter > max(shape[1:]):
        log.warning(
            "diameter %g is larger than the volume's Y x X extent %d x %d: the halo is clipped to the volume, "
            "so every task reads the whole volume; is the diameter in voxels?", params.diameter, *shape[1:],
        )
    halo = params.halo or default_halo(params.diameter, anisotropy)
    if params.stitch_threshold and params.halo is None:  # planes are segmented apart: no Z halo
        halo = (0, *halo[1:])
    grid = ChunkGrid(shape, params.chunk_shape, halo)
    flows = _check_flows(params, shape, plane=plane is not None)
    planar = plane is not None or params.stitch_threshold > 0  # every plane segmented in 2D
    network = (predict.check(params, shape, anisotropy, nchannels=volume.nchannels, plane=planar)
               if check_model and params.flows is None else None)

    resumed = _existing_output(params, volume.describe())
    if resumed is not None:
        if params.flows is None and not resumed.manifest.get("complete") and not resumed.manifest.get("predict"):
            raise UserError(f"output {params.output!r} holds an unfinished run planned by an earlier zseg, whose "
                            "predict ran per chunk (no predict units in run.json); pass --overwrite to start again.")
        log.info("resuming the unfinished run in %s", params.output)
        restore_fingerprint_tables(resumed)  # killed between run.json and the tables
        if not is_array(resumed.path("ends.zarr")):  # killed between run.json and ends.zarr
            create_ends(resumed.network_scale())
        predict.ensure_stores(resumed.network_scale())
        # execution-only settings (device, batch size, ...) are the resuming command's: record
        # them so that every task of the resumed run uses them (e.g. a smaller --batch-size
        # after running out of GPU memory)
        now = params.model_dump(mode="json", include=set(EXECUTION_ONLY))
        if any(resumed.manifest["params"].get(k) != v for k, v in now.items()):
            resumed.manifest["params"].update(now)
            write_manifest(params.output, resumed.manifest)
            resumed = RunContext(params.output, resumed.manifest)
        return resumed

    predict_rec = (predict.plan_units(params, shape, anisotropy, nchannels=volume.nchannels, plane=planar,
                                      network=network) if params.flows is None else None)
    network_grid = None if params.resample else _network_grid(params, grid, flows, predict_rec, anisotropy)
    fingerprints = take_fingerprints(params, volume)
    manifest = {
        "zseg_version": versions()["zseg"],
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "params": params.model_dump(mode="json"),
        "input": volume.describe(),
        "voxel_size": list(voxel_size) if voxel_size else None,
        "anisotropy": anisotropy,
        "niter": params.effective_niter(_diam_mean(params, network)),
        "grid": {
            "shape": list(grid.shape),
            "chunk_shape": list(grid.chunk_shape),
            "halo": list(grid.halo),
            "grid_shape": list(grid.grid_shape),
            "nchunks": grid.nchunks,
        },
        "flows": flows,
        # where the flow store's samples lie: resized to the volume, or (--no-resample) at the network's scale
        "flows_scale": "volume" if network_grid is None else "network",
        "network_grid": network_grid,
        "network": network,
        "predict": predict_rec,
        "plane": plane,
        "fingerprint": {name: summary for name, (summary, _) in fingerprints.items()},
        "versions": versions(),
        "complete": False,
    }
    run = RunContext(params.output, manifest)
    manifest["stages"] = planned_stages(run)  # run.manifest is this dict
    write_manifest(params.output, manifest)
    write_fingerprint_tables(run, fingerprints)
    create_ends(run.network_scale())
    predict.ensure_stores(run.network_scale())
    log.info(
        "planned %s: volume %s, %d chunks of %s with halo %s",
        params.output, shape, grid.nchunks, grid.chunk_shape, grid.halo,
    )
    return run
