"""``zseg verify OUTPUT``, and the per-chunk digests it compares with.

:func:`verify_output` checks a finished output folder on its own (``work/`` may have been
deleted): the manifest is valid and marked complete; ``labels.zarr`` has valid NGFF metadata and
the shape and an integer type of the run; every chunk of the segmented level reads back
exactly what its task wrote (a CRC-32 and a voxel count per chunk, recorded in ``run.json``
by the report stage), so a missing, truncated or altered stored object is found; and the label
IDs are exactly ``1..N`` for the ``N`` cells the run recorded (and the cell table, when there is
one, has one row per cell). A 2D slide run is checked the same way layer by layer: its first
layer holds IDs ``1..N`` (one per row of the table), the others a part of them. Memory: one
chunk and one flag per cell.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
import pyarrow.parquet as pq
import zarr

from zseg.errors import UserError
from zseg.outputs.slide import LAYERS
from zseg.storage import uri as U
from zseg.storage.arrays import open_array
from zseg.storage.omezarr import axis_names, ome_attributes
from zseg.workspace import work as W
from zseg.workspace.context import MANIFEST, RunContext
from zseg.workspace.progress import chunk_ranges, short_ranges, stage_missing
from zseg.workspace.slide import SlideContext, is_slide_run
from zseg.workspace.stages import applicable, noun, size

log = logging.getLogger(__name__)

#: Key of the per-chunk digests in ``run.json``.
DIGESTS = "chunk_digests"


# -- digests -------------------------------------------------------------------------------------
def chunk_digest(core_labels: np.ndarray) -> dict:
    """What verify compares a chunk of the segmented level with: CRC-32 of its bytes (C order,
    the array's dtype) and its count of labelled voxels."""
    data = np.ascontiguousarray(core_labels)
    return {"crc32": zlib.crc32(data.tobytes()), "labelled_voxels": int(np.count_nonzero(data))}


def digest_lists(digests: list) -> dict:
    """Per-chunk digests (one :func:`chunk_digest` dict per chunk, in order) as ``run.json``
    keeps them; ``{}`` when a chunk has none."""
    if any(not d or d.get("crc32") is None for d in digests):
        return {}
    return {"crc32": [d["crc32"] for d in digests], "labelled_voxels": [d.get("labelled_voxels") for d in digests]}


def gather_digests(run: RunContext, stage_dir: str = W.LABELS_DIR) -> dict:
    """The per-chunk digests from the markers of ``finalize:labels``, for ``run.json``."""
    return digest_lists([U.read_json(run.chunk_file(stage_dir, i, "json")) for i in range(run.grid.nchunks)])


# -- verify --------------------------------------------------------------------------------------
def _segmented_path(run: RunContext) -> str:
    levels = ((run.manifest.get("result") or {}).get("outputs") or {}).get("levels") or []
    for lv in levels:
        if isinstance(lv, dict) and lv.get("role") == "segmented":
            return str(lv["path"])
    return "0"


def _check_ngff(run: RunContext, uri: str, problems: list[str]) -> list[str]:
    """Problems of the NGFF metadata of ``labels.zarr``; returns its dataset paths."""
    try:
        group = zarr.open_group(uri, mode="r", storage_options=U.storage_options(uri) or None)
        ome = ome_attributes(group)
    except Exception as e:
        problems.append(f"{uri}: not a readable zarr group ({type(e).__name__}: {e}); the labels are missing.")
        return []
    ms = ome.get("multiscales")
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
        problems.append(f"{uri}: no OME-Zarr 'multiscales' metadata; viewers cannot open it.")
        return []
    axes = axis_names(ms[0])
    if axes != list("zyx"[-run.grid.ndim:]):
        problems.append(f"{uri}: multiscales axes are {axes}, not {list('zyx'[-run.grid.ndim:])}.")
    paths = []
    for d in ms[0].get("datasets") or []:
        scale = next((t.get("scale") for t in d.get("coordinateTransformations") or []
                      if isinstance(t, dict) and t.get("type") == "scale"), None)
        if not (isinstance(scale, list) and len(scale) == run.grid.ndim
                and all(isinstance(v, (int, float)) and v > 0 for v in scale)):
            problems.append(f"{uri}: dataset {d.get('path')!r} has no valid scale (got {scale!r}).")
        paths.append(str(d.get("path")))
    if not paths:
        problems.append(f"{uri}: multiscales lists no datasets.")
    if "image-label" not in ome:
        problems.append(f"{uri}: no 'image-label' metadata; viewers will not show it as labels.")
    return paths


def verify_output(root: str) -> dict:
    """Check the output folder ``root``; return a summary, or raise one problem per line.

    Raises
    ------
    UserError
        One line per problem found.
    """
    if not U.exists(U.join(root, MANIFEST)):
        raise UserError(f"{root!r} holds no {MANIFEST}: it is not a zseg output folder (or the run never started).")
    slide = is_slide_run(root)
    run = SlideContext.open(root) if slide else RunContext.open(root)  # a damaged manifest: one line per problem
    problems: list[str] = [f"{p} since the run was planned." for p in run.input_changes()]
    if not run.manifest.get("complete"):
        lines = [f"{root}: the run is not finished (run.json says complete: false).", *problems]
        if U.exists(run.work):
            for stage in applicable(run):
                missing = stage_missing(run, stage)
                if stage.kind == "map" and missing:
                    lines.append(f"{stage.name}: {len(missing)} of {size(run, stage)} {noun(stage)}(s) not done "
                                 f"({short_ranges(chunk_ranges(missing))}).")
                elif stage.kind == "reduce" and missing:
                    lines.append(f"{stage.name}: not done.")
        lines.append("resume it with the same `zseg run` command, or run the stages listed above.")
        raise UserError(*lines)

    ncells = int((run.manifest.get("result") or {})["cells"])
    labels = U.join(run.root, "labels.zarr")
    digests = run.manifest.get(DIGESTS) or {}
    summary = {"output": run.root, "ok": True, "cells": ncells, "chunks": run.grid.nchunks}
    if slide:  # (image, its full-resolution level, its digests, every ID present, what it is)
        layers = LAYERS[run.compartment]
        images = [(U.join(labels, name), "0", digests.get(name) or {}, k == 0, f"layer {name!r}")
                  for k, name in enumerate(layers)]
        summary.update(labels=labels, layers=list(layers))
    else:
        seg = _segmented_path(run)
        images = [(labels, seg, digests, True, "the labels")]
        summary["labels"] = f"{labels}/{seg}"
    compared = []
    for uri, seg, chunk_digests, every_id, what in images:
        found, checked = _check_labels(run, uri, seg, ncells, chunk_digests, every_id=every_id, what=what)
        problems += found
        compared.append(checked)
    problems += _check_table(run, ncells)
    if problems:
        raise UserError(*problems)
    return {**summary, "digests_checked": all(compared)}


def _check_labels(run, labels: str, seg: str, ncells: int, digests: dict, *, every_id: bool,
                  what: str) -> tuple[list[str], bool]:
    """Problems of the label image ``labels`` (an NGFF multiscale) whose full-resolution level is
    ``seg``: its metadata, shape and type, each chunk against its recorded digest, IDs within
    ``1..ncells`` (and, with ``every_id``, every one of them present); and whether the chunks
    were compared with digests."""
    problems: list[str] = []
    paths = _check_ngff(run, labels, problems)
    if paths and seg not in paths:
        problems.append(f"{labels}: the segmented level {seg!r} is not among the datasets {paths}.")
    try:
        arr = open_array(U.join(labels, seg))
    except UserError as e:
        return [*problems, *e.problems], False
    g = run.grid
    if tuple(arr.shape) != tuple(g.shape):
        return [*problems, f"{labels}/{seg}: shape {tuple(arr.shape)} is not the run's {tuple(g.shape)}."], False
    if arr.dtype.kind != "u" or np.iinfo(arr.dtype).max < ncells:
        problems.append(f"{labels}/{seg}: data type {arr.dtype} cannot hold labels 1..{ncells}.")
    crcs, counts = digests.get("crc32"), digests.get("labelled_voxels")
    if not (isinstance(crcs, list) and len(crcs) == g.nchunks and isinstance(counts, list) and len(counts) == g.nchunks):
        crcs = counts = None
        log.warning("run.json has no per-chunk digests of %s (an older zseg): chunks are read but not compared", what)
    seen = np.zeros(ncells + 1, dtype=bool)
    beyond, altered, unreadable = set(), [], []
    for i in range(g.nchunks):
        try:
            data = np.asarray(arr[g.core(i)])
        except UserError as e:
            unreadable.append((i, e.problems[0]))
            continue
        ids = np.unique(data)
        big = ids[ids > ncells]
        beyond.update(int(v) for v in big[:10])
        seen[ids[ids <= ncells].astype(np.int64)] = True
        if crcs is not None:
            d = chunk_digest(data.astype(arr.dtype, copy=False))
            if d["crc32"] != crcs[i] or d["labelled_voxels"] != counts[i]:
                altered.append(i)
    if unreadable:
        problems.append(f"{labels}/{seg}: {len(unreadable)} chunk(s) cannot be read "
                        f"({short_ranges(chunk_ranges([i for i, _ in unreadable]))}): {unreadable[0][1]}")
    if altered:
        problems.append(
            f"{labels}/{seg}: {len(altered)} chunk(s) differ from what the run wrote "
            f"({short_ranges(chunk_ranges(altered))}): a stored chunk is missing or was changed; "
            f"re-run `{_writer(run)} --chunks ...` after deleting their markers, "
            "or run again."
        )
    if beyond:
        problems.append(f"{labels}/{seg}: label IDs above the run's {ncells} cells, e.g. {sorted(beyond)[:5]}.")
    absent = np.flatnonzero(~seen[1:]) + 1
    if every_id and len(absent) and not unreadable:
        problems.append(f"{labels}/{seg}: {len(absent)} of the IDs 1..{ncells} have no voxel "
                        f"(e.g. {', '.join(map(str, absent[:5]))}); the labels do not match the run's cell count.")
    return problems, crcs is not None


def _writer(run) -> str:
    """The command that writes the labels' chunks of ``run``."""
    if isinstance(run, SlideContext):
        return f"zseg slide --run {run.root} --stage layers"
    return f"zseg finalize --run {run.root} --stage labels"


def _check_table(run: RunContext, ncells: int) -> list[str]:
    """The cell table, when the run wrote one: one row per cell, IDs 1..N."""
    uri = U.join(run.root, "cells.parquet")
    if not U.exists(uri):
        return []
    try:
        with U.open_file(uri) as f:
            table = pq.read_table(f)
    except Exception as e:
        return [f"{uri}: cannot be read as Parquet ({type(e).__name__}: {e})."]
    problems = []
    if table.num_rows != ncells:
        problems.append(f"{uri}: {table.num_rows} rows, but the run recorded {ncells} cells.")
    column = next((c for c in ("label", "label_id", "id") if c in table.column_names), None)
    if column is not None and table.num_rows == ncells:
        ids = np.sort(np.asarray(table.column(column).to_numpy(), dtype=np.int64))
        if not np.array_equal(ids, np.arange(1, ncells + 1)):
            problems.append(f"{uri}: column {column!r} is not the IDs 1..{ncells}.")
    return problems
