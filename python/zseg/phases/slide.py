"""A 2D multiplex slide run: plan, network inputs, compartments, matching, layers, table
(docs/architecture.md, "Multiplex slides").

Stages (:data:`zseg.workspace.stages.SLIDE_STAGES`), around the compartments:

- ``plan`` (:func:`plan_slide`): checks the slide, channels, options and given flows, measures the
  informative patches (refusing a slide with none) before writing anything, then writes
  ``run.json`` and ``patches.parquet``;
- ``slide:inputs`` (map): the network's input of each compartment, ``work/inputs.zarr``
  (C, 1, Y, X): the membrane composite (raw values combined pixelwise) and the nuclear channel;
- the compartments (:func:`plan_compartments`): ``work/cells`` and/or ``work/nuclei``, each a
  one-plane run of every volume stage with Cellpose's 2D semantics (flow check, patch skipping);
- ``match:decide`` (map, ``both``): each chunk decides the cell-nucleus components it owns
  (:func:`zseg.engine.matching.block_match`);
- ``match:number`` (reduce, ``both``): each kept cell's nucleus and new ID, 1..K in ascending
  cell label;
- ``slide:layers`` (map): the ``cells``/``nuclei``/``cytoplasm`` layers of the core and their
  statistics over every channel of the slide;
- ``slide:report`` (reduce): pyramids, ``cells.parquet`` (and ``cells.h5ad``, ``cells.geojson``),
  the result in ``run.json``.
"""

from __future__ import annotations

import datetime as dt
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from zseg.engine import blocks as B
from zseg.engine import matching as M
from zseg.engine import multiplex as MX
from zseg.engine import stats as S
from zseg.errors import UserError
from zseg.outputs import slide as O
from zseg.outputs.verify import DIGESTS, chunk_digest, digest_lists
from zseg.params import SLIDE_ONLY, VOLUME_ONLY, RunParams, flag_of
from zseg.phases.plan import (
    EXECUTION_ONLY,
    check_flow_store,
    existing_manifest,
    refuse_changed_inputs,
    refuse_unless_resumable,
    restore_fingerprint_tables,
    take_fingerprints,
    write_fingerprint_tables,
)
from zseg.phases.plan import plan as plan_volume
from zseg.storage import fingerprint as FP
from zseg.storage import uri as U
from zseg.storage.arrays import create_array, is_array, open_array
from zseg.storage.grid import ChunkGrid, box_origin, grow
from zseg.storage.slide import open_slide
from zseg.storage.volume import open_volume
from zseg.workspace import work as W
from zseg.workspace.context import RunContext, read_manifest, versions, write_manifest
from zseg.workspace.progress import planned_stages, refuse_other_stages
from zseg.workspace.slide import COMPARTMENT_RUNS, INPUTS, PATCHES, SlideContext

log = logging.getLogger(__name__)

#: The chunk shape of a slide run when --chunk-shape is not given.
DEFAULT_CHUNK = (2048, 2048)
#: The table's compartment of each layer.
TABLE_COMPARTMENT = {"cells": "cell", "nuclei": "nucleus", "cytoplasm": "cytoplasm"}
#: The compartment settings a slide run does not share between its compartments.
_OWN = ("input", "output", "work", "flows", "axes", "channels", "model", "diameter", "chunk_shape", "halo",
        "voxel_size", "overwrite")


# -- what is a slide ------------------------------------------------------------------------------
def is_slide(params: RunParams) -> bool:
    """Whether ``params`` ask for a 2D slide run: a slide option is given, ``--axes`` has no z, or
    the input opens as a 2D image (and not as a volume)."""
    if params.slide_options() or (params.axes is not None and "z" not in params.axes):
        return True
    if not U.exists(params.input):
        return False  # the volume plan says that it is missing
    try:
        open_volume(params.input, axes=params.axes, level=params.level, channels=params.channels,
                    timepoint=params.timepoint, channel_axis=params.channel_axis, z_axis=params.z_axis)
        return False
    except UserError as volume_error:
        try:
            open_slide(params.input, axes=params.axes, level=params.level, channel_axis=params.channel_axis)
        except UserError:
            raise volume_error from None
        return True


def _refuse_volume_options(params: RunParams) -> None:
    given = [flag_of(n) for n in VOLUME_ONLY if getattr(params, n) != RunParams.model_fields[n].default]
    if params.chunk_shape is not None and len(params.chunk_shape) != 2:
        given.append("--chunk-shape (a Z size)")
    if params.halo is not None and len(params.halo) != 2:
        given.append("--halo (a Z size)")
    if params.mask is not None:
        given.append("--mask")
    if given:
        flags = ", ".join(given)
        raise UserError(f"{flags}: 3D options do not apply to a 2D slide; choose channels with --nuclear-channel "
                        "and --membrane-channels, and give --chunk-shape and --halo as Y,X.")


# -- plan -----------------------------------------------------------------------------------------
def _compartment(params: RunParams) -> str:
    if params.compartment is not None:
        return params.compartment
    return "both" if params.membrane_channels else "nuclear"


def default_halo(params: RunParams) -> tuple[int, int]:
    """4 x the larger diameter: the flow check needs each cell and its neighbours whole."""
    d = max(params.diameter, params.nuclear_diameter or params.diameter)
    return (int(math.ceil(4 * d)),) * 2


def _patch_blocks(shape, patch_size: int, target: int = 2048):
    """Blocks of whole patches (about ``target`` pixels a side) covering the slide, in C order."""
    step = patch_size * max(1, target // patch_size)
    for y in range(0, shape[0], step):
        for x in range(0, shape[1], step):
            yield (slice(y, min(y + step, shape[0])), slice(x, min(x + step, shape[1])))


def _create_stores(run, slide, patches: dict | None = None) -> None:
    """What a slide's plan writes after ``run.json`` (the patch table, the inputs store, the label
    layers), each only where a plan killed midway did not finish it, so that a resume never
    replaces what a task wrote. ``patches``: the table just measured (None: measured again)."""
    params, g = run.params, run.grid
    if not U.exists(U.join(params.output, PATCHES)):
        if patches is None:
            patches = measure_patches(slide, run.channels["nuclear"], run.channels["membrane"], params)
        O.write_parquet(U.join(params.output, PATCHES), patches)
    if not is_array(run.path(INPUTS)):
        create_array(run.path(INPUTS), shape=(len(_input_channels(run)), 1, *g.shape), chunks=(1, 1, *g.chunk_shape),
                     dtype="float32", zarr_format=params.zarr_format, overwrite=True)
    if not O.layers_created(run):
        O.create_layers(run)


def measure_patches(slide, nuclear: int | None, membrane, params: RunParams) -> dict[str, np.ndarray]:
    """The patch table of the slide (:func:`zseg.engine.multiplex.patch_stats` and flags), read
    block by block: memory is one block of the segmentation channels."""
    parts = []
    for box in _patch_blocks(slide.shape, params.patch_size):
        images = {}
        if nuclear is not None:
            images["nuclear"] = slide.read(box, [nuclear])[0]
        if membrane:
            images["membrane"] = MX.combine_channels(slide.read(box, membrane), params.membrane_combine)
        if nuclear is None:  # a whole-cell run without a nuclear channel: the composite is QC'd instead
            images["nuclear"] = images["membrane"]
        parts.append(MX.patch_stats(images, origin=[b.start for b in box], slide_shape=slide.shape,
                                    patch_size=params.patch_size))
    table = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((table["x_start"], table["y_start"]))
    table = {k: v[order] for k, v in table.items()}
    table.update(MX.patch_flags(table, non_zero_threshold=params.patch_non_zero_threshold,
                                mean_threshold=params.patch_mean_threshold))
    for name in ("membrane_mean", "membrane_std", "membrane_non_zero_fraction"):
        if name not in table:
            table[name] = np.full(len(table["y_start"]), np.nan)
    return {k: table[k] for k in MX.PATCH_COLUMNS}


def _check_informative(slide, nuclear, membrane, params: RunParams, patches: dict) -> None:
    if not params.skip_uninformative or patches["is_informative"].any():
        return
    ch = nuclear if nuclear is not None else membrane[0]
    lo = min(float(v) for v in patches["nuclear_mean"]) if len(patches["nuclear_mean"]) else 0.0
    hi = max(float(v) for v in patches["nuclear_mean"]) if len(patches["nuclear_mean"]) else 0.0
    nz = max(float(v) for v in patches["nuclear_non_zero_fraction"])
    raise UserError(
        f"no informative patch in {params.input}: every {params.patch_size}-pixel patch of channel "
        f"{slide.channel_names[ch]!r} has a non-zero fraction below --patch-non-zero-threshold "
        f"{params.patch_non_zero_threshold} or a mean below --patch-mean-threshold {params.patch_mean_threshold} "
        f"(patch means {lo:g}-{hi:g}, largest non-zero fraction {nz:g}); lower the thresholds, or "
        "--no-skip-uninformative to segment it all.")


def plan_slide(params: RunParams) -> SlideContext:
    """Validate a slide run and write its manifest, or return the unfinished run to resume."""
    _refuse_volume_options(params)
    slide = open_slide(params.input, axes=params.axes, level=params.level, channel_axis=params.channel_axis)
    compartment = _compartment(params)
    nuclear = params.nuclear_channel
    if nuclear is None and compartment in ("nuclear", "both"):
        nuclear = 0
    nuc, mem = slide.segmentation_channels(compartment, nuclear, params.membrane_channels or ())
    shape = tuple(slide.shape)
    if params.flows is not None:
        if compartment == "nuclear":
            raise UserError("--flows holds whole-cell flows, but --compartment nuclear segments nuclei only; "
                            "give the nuclei's flows with --nuclear-flows.")
        check_flow_store(params.flows, (3, *shape), "--flows")
    if params.nuclear_flows is not None:
        if compartment == "whole-cell":
            raise UserError("--nuclear-flows: --compartment whole-cell segments no nuclei; use --compartment both.")
        check_flow_store(params.nuclear_flows, (3, *shape), "--nuclear-flows")
    chunk = tuple(params.chunk_shape or DEFAULT_CHUNK)
    halo = tuple(params.halo or default_halo(params))
    grid = ChunkGrid(shape, chunk, halo)
    params = params.model_copy(update={"chunk_shape": chunk, "compartment": compartment,
                                       "nuclear_channel": nuclear})
    resumed = existing_manifest(params)
    if resumed is not None:
        if resumed.get("kind") != "slide":
            raise UserError(f"output {params.output!r} holds a run of a volume; choose a new folder or pass --overwrite.")
        refuse_unless_resumable(params, RunParams.model_validate(resumed["params"]), bool(resumed.get("complete")))
        old = SlideContext(params.output, resumed)
        refuse_other_stages(old)
        refuse_changed_inputs(old, slide.describe(),
                              "pass --overwrite to start again with them.")
        resumed["params"].update(params.model_dump(mode="json", include=set(EXECUTION_ONLY)))
        write_manifest(params.output, resumed)
        run = SlideContext(params.output, resumed)
        restore_fingerprint_tables(run)  # killed between run.json and the tables
        _create_stores(run, slide)  # or between run.json and the stores
        return run
    patches = measure_patches(slide, nuc, mem, params)
    _check_informative(slide, nuc, mem, params, patches)
    fingerprints = take_fingerprints(params, slide)
    pixel = slide.pixel_size if slide.pixel_size is not None and slide.unit in (None, "micrometer", "µm", "um") else None
    manifest = {
        "kind": "slide",
        "zseg_version": versions()["zseg"],
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "params": params.model_dump(mode="json"),
        "input": slide.describe(),
        "compartment": compartment,
        "channels": {"names": list(slide.channel_names), "nuclear": nuc, "membrane": list(mem)},
        "pixel_size_um": list(pixel) if pixel is not None else [1.0, 1.0],
        "grid": {"shape": list(grid.shape), "chunk_shape": list(grid.chunk_shape), "halo": list(grid.halo),
                 "grid_shape": list(grid.grid_shape), "nchunks": grid.nchunks},
        "patches": {"uri": U.join(params.output, PATCHES), "patch_size": params.patch_size,
                    "total": int(len(patches["is_informative"])),
                    "informative": int(patches["is_informative"].sum()),
                    "empty": int(patches["is_empty"].sum()), "noisy": int(patches["is_noisy"].sum())},
        "fingerprint": {name: summary for name, (summary, _) in fingerprints.items()},
        "versions": versions(),
        "complete": False,
    }
    run = SlideContext(params.output, manifest)
    manifest["stages"] = planned_stages(run)  # run.manifest is this dict
    write_manifest(params.output, manifest)  # first: a folder holding anything else is a run
    write_fingerprint_tables(run, fingerprints)
    _create_stores(run, slide, patches)
    log.info("planned slide %s: %s, %d chunks of %s with halo %s, %d of %d patches informative", params.output,
             shape, grid.nchunks, chunk, halo, manifest["patches"]["informative"], manifest["patches"]["total"])
    return run


# -- network inputs -------------------------------------------------------------------------------
def _input_channels(run: SlideContext) -> list[str]:
    """The planes of ``work/inputs.zarr``: ``membrane`` (when whole cells are segmented), ``nuclear``."""
    ch = run.channels
    return [name for name, present in (("membrane", bool(ch["membrane"])), ("nuclear", ch["nuclear"] is not None))
            if present]


def inputs_chunk(run: SlideContext, index: int) -> dict:
    """Reads the core's segmentation channels; writes the core of ``work/inputs.zarr``."""
    core = run.grid.core(index)
    ch = run.channels
    planes = []
    for name in _input_channels(run):
        if name == "membrane":
            planes.append(MX.combine_channels(run.slide.read(core, ch["membrane"]), run.params.membrane_combine))
        else:
            planes.append(run.slide.read(core, [ch["nuclear"]])[0])
    data = np.stack([np.asarray(p, np.float32) for p in planes])[:, None]
    open_array(run.path(INPUTS), mode="r+")[(slice(None), slice(0, 1), *core)] = data
    return {"pixels": int(np.prod(data.shape[-2:]))}


# -- compartments ---------------------------------------------------------------------------------
def compartment_params(run: SlideContext, name: str) -> RunParams:
    """The one-plane run of compartment ``name`` (``cells`` or ``nuclei``)."""
    p = run.params
    planes = _input_channels(run)
    if name == "cells":  # the network sees (membrane, nucleus), as the cyto families expect
        channels = [planes.index("membrane")] + ([planes.index("nuclear")] if "nuclear" in planes else [])
        flows, model, diameter = p.flows, p.model, p.diameter
    else:
        channels = [planes.index("nuclear")]
        flows, model, diameter = p.nuclear_flows, p.nuclear_model or p.model, p.nuclear_diameter or p.diameter
    shared = {k: v for k, v in p.model_dump().items() if k not in _OWN and k in _VOLUME_FIELDS}
    py, px = run.pixel_size_um
    return RunParams.model_validate({
        **shared, "input": run.path(INPUTS), "output": run.compartment_root(name), "axes": "czyx",
        "channel_axis": None, "z_axis": None,  # the slide's own axes: the inputs store is czyx
        "channels": channels, "flows": flows, "model": model, "diameter": diameter,
        "chunk_shape": (1, *run.grid.chunk_shape), "halo": (0, *run.grid.halo), "voxel_size": (1.0, py, px),
    })


_VOLUME_FIELDS = [n for n in RunParams.model_fields if n not in SLIDE_ONLY]


def compartments_reduce(run: SlideContext) -> dict:
    """Plans each compartment's one-plane run (finding and checking its network); writes
    ``work/compartments.json``: ``{"compartments": [{"name", "run", "npredict"}], "nchunks": N}``
    (``npredict``: the compartment's predict units, one predict task each under Nextflow)."""
    runs = plan_compartments(run)
    result = {"compartments": [{"name": name, "run": r.root, "npredict": r.npredict}
                               for name, r in zip(COMPARTMENT_RUNS[run.compartment], runs)],
              "nchunks": run.grid.nchunks}
    U.write_json(run.path(W.COMPARTMENTS_RESULT), result)
    return result


def plan_compartments(run: SlideContext, *, check_model: bool = True) -> list[RunContext]:
    """Plan (or resume) each compartment's one-plane run; finished ones are returned as they are."""
    p = run.params
    plane = {"flow_threshold": p.flow_threshold, "patch_size": p.patch_size,
             "patches": run.manifest["patches"]["uri"] if p.skip_uninformative else None}
    out = []
    for name in COMPARTMENT_RUNS[run.compartment]:
        root = run.compartment_root(name)
        m = read_manifest(root)
        if m is not None and m.get("complete"):
            out.append(RunContext.open(root))
            continue
        params = compartment_params(run, name)
        # the compartment fingerprints its flows anew: they must still be those the slide was planned with
        store = "flows" if name == "cells" else "nuclear_flows"
        rec = (run.manifest.get("fingerprint") or {}).get(store)
        if params.flows is not None and rec is not None:
            FP.refuse_changes(FP.changes(store, rec, run.fingerprint_table(store, rec)), FP.Reads.ADVICE)
        out.append(plan_volume(params, check_model=check_model, plane=plane))
    return out


# -- matching -------------------------------------------------------------------------------------
def _labels_block(run: RunContext, box) -> np.ndarray:
    """A 2D box of a compartment's final labels (level 0 of its labels.zarr)."""
    return np.asarray(open_array(U.join(run.root, "labels.zarr", "0"))[(slice(0, 1), *box)])[0]


def _table_boxes(run: RunContext, present: np.ndarray, core) -> B.Boxes:
    """The boxes (Y, X) of the labels ``present`` in a block and of the cells whose box starts in
    ``core`` (slide coordinates), from the compartment's cell table."""
    t = ds.dataset(U.join(run.root, "cells.parquet"), format="parquet")
    (y0, y1), (x0, x1) = [(s.start, s.stop) for s in core]
    starts = ((pc.field("bbox_y_start") >= y0) & (pc.field("bbox_y_start") < y1)
              & (pc.field("bbox_x_start") >= x0) & (pc.field("bbox_x_start") < x1))
    f = pc.field("label").isin(pa.array(present.astype(np.int64))) | starts
    cols = t.to_table(columns=["label", "bbox_y_start", "bbox_x_start", "bbox_y_stop", "bbox_x_stop"], filter=f)
    d = {k: np.asarray(cols[k].to_numpy(zero_copy_only=False), np.int64) for k in cols.column_names}
    order = np.argsort(d["label"])
    return B.Boxes(d["label"][order].astype(np.uint64),
                   np.stack([d["bbox_y_start"], d["bbox_x_start"]], axis=1)[order],
                   np.stack([d["bbox_y_stop"], d["bbox_x_stop"]], axis=1)[order])


def match_chunk(run: SlideContext, index: int) -> dict:
    """Reads the block of both compartments' labels and their boxes; writes the pairs of the
    components this chunk owns to ``work/match/cNNNNNNN.npz``."""
    g = run.grid
    block = g.block(index)
    cells_run, nuclei_run = run.compartment_run("cells"), run.compartment_run("nuclei")
    cells, nuclei = _labels_block(cells_run, block), _labels_block(nuclei_run, block)
    core = g.core(index)
    r = M.block_match(cells, nuclei, origin=box_origin(block), core=g.core_in_block(index), slide_shape=g.shape,
                      cell_boxes=_table_boxes(cells_run, B.present_labels(cells), core),
                      nucleus_boxes=_table_boxes(nuclei_run, B.present_labels(nuclei), core))
    U.write_npz(run.chunk_file(W.MATCH_DIR, index), cells=r["cells"].astype(np.int64),
                nuclei=r["nuclei"].astype(np.int64))
    return {"pairs": int(len(r["cells"])), "undecided": int(r["undecided"]), "reach": [int(v) for v in r["reach"]]}


def _counts(run: SlideContext) -> dict[str, int]:
    return {name: int(run.compartment_run(name).manifest["result"]["cells"]) for name in COMPARTMENT_RUNS[run.compartment]}


def match_number(run: SlideContext) -> dict:
    """Reads every chunk's pairs; writes ``work/partner.zarr`` (each cell's nucleus, 0 for none)
    and ``work/newid.zarr`` (each cell's output ID, 0 for a cell that is not kept), and the
    matching summary. Memory: two integers per cell."""
    counts = _counts(run)
    ncells = counts["cells"]
    partner = np.zeros(ncells + 1, np.int64)
    for i in range(run.grid.nchunks):
        d = U.read_npz(run.chunk_file(W.MATCH_DIR, i))
        partner[d["cells"]] = d["nuclei"]
    matched = partner != 0
    if run.params.keep_unmatched_cells:
        newid = np.arange(ncells + 1, dtype=np.int64)  # the cells are 1..C already
    else:
        newid = np.where(matched, np.cumsum(matched), 0).astype(np.int64)
    for name, values in (("partner.zarr", partner), ("newid.zarr", newid)):
        a = create_array(run.path(name), shape=values.shape, chunks=(1 << 20,), dtype="int64",
                         zarr_format=run.params.zarr_format, overwrite=True)
        a[...] = values
    undecided = sum(int(U.read_json(run.chunk_file(W.MATCH_DIR, i, "json"))["undecided"])
                    for i in range(run.grid.nchunks))
    summary = MX.matching_summary(ncells, counts["nuclei"], int(matched.sum()))
    result = {"matching": summary, "cells": int(newid.max()) if len(newid) else 0, "undecided": undecided}
    U.write_json(run.path(W.MATCH_RESULT), result)
    return result


# -- layers and their statistics ------------------------------------------------------------------
def _lookup(run: SlideContext, name: str, ids: np.ndarray) -> np.ndarray:
    if len(ids) == 0:
        return np.zeros(0, np.int64)
    return np.asarray(open_array(run.path(name)).oindex[ids.astype(np.int64)], np.int64)


def chunk_layers(run: SlideContext, index: int) -> dict[str, np.ndarray]:
    """The output layers of chunk ``index``'s core: ``{layer: (y, x) uint32}``."""
    g = run.grid
    core = g.core(index)
    if run.compartment != "both":
        name = COMPARTMENT_RUNS[run.compartment][0]
        return {name: _labels_block(run.compartment_run(name), core).astype(np.uint32)}
    box = grow(core, (1, 1), g.shape)  # interiors need one pixel of real neighbours
    cells = _labels_block(run.compartment_run("cells"), box)
    nuclei = _labels_block(run.compartment_run("nuclei"), box)
    origin = box_origin(box)
    interior = (cells != 0) & ~M.inner_boundary(cells, known=B.closed_faces(origin, cells.shape, g.shape))
    present = B.present_labels(cells).astype(np.int64)
    partner, newid = _lookup(run, "partner.zarr", present), _lookup(run, "newid.zarr", present)
    matched = partner != 0
    c, n, cy = M.apply_matching(cells, nuclei, interior, present[matched], partner[matched], newid[matched],
                                keep_unmatched_cells=run.params.keep_unmatched_cells,
                                kept_cells=present, kept_ids=newid)
    inner = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(core, box))
    return {"cells": c[inner], "nuclei": n[inner], "cytoplasm": cy[inner]}


def layers_chunk(run: SlideContext, index: int) -> dict:
    """Writes the core of every layer (level 0) and, per layer, the statistics of its cells in the
    core over every channel of the slide (``work/layer_stats/<layer>/cNNNNNNN.parquet``); its
    marker holds each layer's count of cells and the digest `zseg verify` compares the stored
    core with."""
    core = run.grid.core(index)
    layers = chunk_layers(run, index)
    image = run.slide.read(core)  # every channel: the table measures them all
    origin = box_origin(core)
    written = {}
    for name, data in layers.items():
        written[name] = data.astype(np.uint32, copy=False)
        O.open_layer(run, name, mode="r+")[core] = written[name]
        O.write_stats(O.stats_uri(run, name, index), S.block_stats(data, image, offset=origin))
    if run.params.keep_unmatched_layers and run.compartment == "both":
        for name in ("cells", "nuclei"):
            written[f"{name}_unmatched"] = _labels_block(run.compartment_run(name), core).astype(np.uint32)
            O.open_layer(run, f"{name}_unmatched", mode="r+")[core] = written[f"{name}_unmatched"]
    return {**{name: int(len(B.present_labels(v))) for name, v in layers.items()},
            DIGESTS: {name: chunk_digest(v) for name, v in written.items()}}


# -- report ---------------------------------------------------------------------------------------
def output_cells(run: SlideContext) -> int:
    """How many cells the output layers hold (their IDs are 1..this)."""
    if run.compartment == "both":
        return int(U.read_json(run.path(W.MATCH_RESULT))["cells"])
    return int(run.compartment_run(COMPARTMENT_RUNS[run.compartment][0]).manifest["result"]["cells"])


def table_passes(run: SlideContext):
    """The cell table in passes of :data:`zseg.outputs.slide.TABLE_ROWS` labels: for each, the
    partial statistics of those labels from every chunk, merged per cell, as table columns
    (:func:`zseg.engine.multiplex.compartment_table`) with the cells' boxes. Memory: one pass."""
    layers = O.LAYERS[run.compartment]
    nch, dtype = run.slide.nchannels, run.slide.dtype
    uris = {name: [O.stats_uri(run, name, i) for i in range(run.grid.nchunks)] for name in layers}
    total = output_cells(run)
    for lo in range(1, max(total, 1) + 1, O.TABLE_ROWS):
        hi = min(lo + O.TABLE_ROWS, total + 1)
        parts = {}
        for name in layers:
            rows = O.read_stats(uris[name], lo, hi, nch)
            parts[TABLE_COMPARTMENT[name]] = S.merge_stats(rows) if rows else S.empty_stats(2, nch, dtype)
        table = MX.compartment_table(parts, run.channels["names"], run.pixel_size_um)
        first = parts[TABLE_COMPARTMENT[layers[0]]]  # ascending label, as the table's rows
        yield table, first["bbox_start"], first["bbox_stop"]


def report_reduce(run: SlideContext) -> dict:
    """Pyramid levels of every layer, ``cells.parquet`` (and the optional AnnData and GeoJSON),
    the QC report and the result in ``run.json`` (marking the run complete)."""
    written = O.finish_outputs(run, table_passes(run))
    compartments = {}
    exact = True
    for name in COMPARTMENT_RUNS[run.compartment]:
        r = run.compartment_run(name).manifest["result"]
        compartments[name] = {k: r.get(k) for k in ("cells", "chunk_exact", "flow_check", "skipped_cells",
                                                     "suggested_halo") if k in r}
        exact &= bool(r.get("chunk_exact"))
    result = {"cells": written["rows"], "compartments": compartments, "patches": run.manifest["patches"],
              "outputs": written["outputs"]}
    if run.compartment == "both":
        m = U.read_json(run.path(W.MATCH_RESULT))
        result["matching"] = m["matching"]
        result["matching_undecided"] = m["undecided"]
        exact &= m["undecided"] == 0
        if m["undecided"]:
            log.warning("%d cell-nucleus components reach beyond their chunk's block: their matching is not "
                        "decided; re-run with a larger --halo", m["undecided"])
    result["chunk_exact"] = bool(exact)
    result["outputs"]["qc"] = O.write_report(run, result, written["areas"])
    manifest = dict(run.manifest, complete=True, result=result, **{DIGESTS: _layer_digests(run)})
    write_manifest(run.root, manifest)
    U.write_json(run.path(W.REPORT_RESULT), result)
    return result


def _layer_digests(run: SlideContext) -> dict:
    """Each layer's per-chunk digests from the markers of ``slide:layers``, for ``run.json``."""
    marks = [U.read_json(run.chunk_file(W.LAYERS_DIR, i, "json")).get(DIGESTS) or {} for i in range(run.grid.nchunks)]
    lists = {name: digest_lists([m.get(name) for m in marks]) for name in O.layer_names(run)}
    return {name: d for name, d in lists.items() if d}
