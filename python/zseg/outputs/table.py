"""The per-cell table ``cells.parquet`` (and ``cells.csv`` on request), exact for cells that
span chunks, with memory bounded by a chunk.

1. ``finalize:labels``, per chunk ``d``: :func:`write_partials` measures every label of the
   core (voxel count, coordinate sums, bounding box, sum and maximum of each input channel,
   :func:`zseg.engine.stats.block_stats`) and files each row under the chunk that owns the
   cell (the chunk of its seed): ``work/partials/o<owner>/c<d>.npz``.
2. ``finalize:cells``, per owner chunk ``o`` (:func:`cells_chunk`): merges every partial file
   under ``work/partials/o<o>/``. Those are exactly the chunks holding voxels of ``o``'s cells,
   whatever the cells' shape or size, so the rows are complete; they go to
   ``work/cells/c<o>.npz``.
3. ``finalize:report`` (:func:`write_table`): streams the rows, owner chunk after owner chunk
   (labels ascending within each), into ``cells.parquet``.

Columns (see :func:`zseg.engine.stats.cell_table`): ``label``; ``centroid_{z,y,x}`` in voxels
of the segmented grid and ``centroid_{z,y,x}_um``; ``bbox_{z,y,x}_{start,stop}`` (half-open,
voxels); ``volume_voxels``, ``volume_um3``; ``mean_intensity_c<i>`` and ``max_intensity_c<i>``
for each input channel ``i`` in the order the run read them. The file's metadata key
``zseg`` (JSON) gives the voxel size, the unit, the channels and the labels image.
"""

from __future__ import annotations

import contextlib
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from zseg.engine import stats as S
from zseg.outputs.labels import labels_uri, voxel_size_um
from zseg.storage import uri as U
from zseg.workspace import work as W
from zseg.workspace.context import RunContext

log = logging.getLogger(__name__)
#: Rows per Parquet row group (and the most rows held in memory while writing).
ROW_GROUP = 65536


def _owner_dir(run: RunContext, owner: int) -> str:
    return run.path(W.PARTIALS_DIR, f"o{owner:07d}")


def write_partials(run: RunContext, index: int, core_labels: np.ndarray, image: np.ndarray,
                   final_ids: np.ndarray, owners: np.ndarray) -> int:
    """Partial statistics of the core of chunk ``index``, filed by owner chunk; returns the
    number of owners written to."""
    g = run.grid
    offset = [s.start for s in g.core(index)]
    st = S.block_stats(core_labels, image, offset=offset)
    if not len(st["label"]):
        return 0
    final_ids = np.asarray(final_ids, np.int64)
    owners = np.asarray(owners, np.int64)
    keep = final_ids > 0
    order = np.argsort(final_ids[keep])
    known, known_owner = final_ids[keep][order], owners[keep][order]
    labels = st["label"].astype(np.int64)
    pos = np.minimum(np.searchsorted(known, labels), max(len(known) - 1, 0))
    if not len(known) or (known[pos] != labels).any():
        missing = labels if not len(known) else labels[known[pos] != labels]
        raise RuntimeError(f"chunk {index}: labels {missing[:5].tolist()} have no owner chunk")
    row_owner = known_owner[pos]
    for o in np.unique(row_owner):
        rows = S.select_rows(st, row_owner == o)
        U.write_npz(U.join(_owner_dir(run, int(o)), f"c{index:07d}.npz"), **rows)
    return int(len(np.unique(row_owner)))


def _columns(run: RunContext) -> list[str]:
    nch = len((run.manifest.get("input") or {}).get("channels") or [0])
    return list(S.cell_table(S.empty_stats(run.grid.ndim, nch), (1.0,) * run.grid.ndim))


def cells_chunk(run: RunContext, index: int) -> dict:
    """The ``finalize:cells`` stage: reads ``work/partials/o<index>/*.npz`` (every chunk's
    statistics of the cells chunk ``index`` owns); writes their merged, complete rows to
    ``work/cells/cNNNNNNN.npz``."""
    names = U.listdir(_owner_dir(run, index))
    parts = [U.read_npz(U.join(_owner_dir(run, index), n)) for n in names if n.endswith(".npz")]
    parts = [p for p in parts if len(p["label"])]
    if not parts:
        U.write_npz(run.chunk_file(W.CELLS_DIR, index), **{c: np.zeros(0) for c in _columns(run)})
        return {"cells": 0, "parts": 0}
    merged = S.merge_stats(parts)
    cols = S.cell_table(merged, voxel_size_um(run))
    U.write_npz(run.chunk_file(W.CELLS_DIR, index), **cols)
    log.debug("chunk %d: %d cells merged from %d chunks", index, len(merged["label"]), len(parts))
    return {"cells": int(len(merged["label"])), "parts": len(parts),
            "voxels": int(merged["count"].sum())}


def _schema(run: RunContext, label_dtype: str) -> pa.Schema:
    fields = []
    for name in _columns(run):
        if name == "label":
            t = pa.from_numpy_dtype(np.dtype(label_dtype))
        elif name.startswith("bbox_") or name == "volume_voxels":
            t = pa.int64()
        else:
            t = pa.float64()
        fields.append(pa.field(name, t))
    info = run.manifest.get("input") or {}
    meta = {
        "labels": labels_uri(run),
        "voxel_size": run.manifest.get("voxel_size"),
        "voxel_size_um": list(voxel_size_um(run)),
        "unit_of_voxel_size": run.manifest.get("input", {}).get("unit") if run.params.voxel_size is None
        else "micrometer",
        "axes": "zyx",
        "coordinates": "voxel indices of the segmented grid (labels.zarr dataset 'segmented'); "
                       "*_um = voxel index x voxel size",
        "channels": [{"column": f"c{i}", "input_channel": c, "name": n}
                     for i, (c, n) in enumerate(zip(info.get("channels") or [0], info.get("channel_names") or [None]))],
        "intensity": "raw input values (before normalisation)",
    }
    return pa.schema(fields, metadata={"zseg": json.dumps(meta)})


def table_uri(run: RunContext, ext: str = "parquet") -> str:
    return U.join(run.params.output, f"cells.{ext}")


def write_table(run: RunContext) -> dict:
    """Stream every owner chunk's rows into ``cells.parquet`` (and ``cells.csv`` when asked).

    Returns ``{"outputs": {...}, "summary": {...}, "volumes": bincount}`` where the summary has
    the row count, the labelled voxels and volume statistics, and ``volumes`` is the exact
    count of cells per volume in voxels (for the QC histogram; its length is the largest cell
    plus one, not the number of cells).
    """
    label_dtype = U.read_json(run.path(W.FINAL_NUMBER_RESULT))["dtype"]
    schema = _schema(run, label_dtype)
    csv = bool(getattr(run.params, "cells_csv", False))
    outputs = {"cells": table_uri(run)}
    if csv:
        outputs["cells_csv"] = table_uri(run, "csv")
    rows = voxels = 0
    volumes = np.zeros(1, np.int64)
    um3_min, um3_max = np.inf, -np.inf
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(U.atomic_file(outputs["cells"]))
        writer = stack.enter_context(pq.ParquetWriter(f, schema, compression="zstd"))
        csv_writer = None
        if csv:
            fc = stack.enter_context(U.atomic_file(outputs["cells_csv"]))
            csv_writer = stack.enter_context(pacsv.CSVWriter(fc, schema.remove_metadata()))
        pending, npending = [], 0

        def flush():
            nonlocal pending, npending
            if not pending:
                return
            table = pa.concat_tables(pending).cast(schema)
            writer.write_table(table, row_group_size=ROW_GROUP)
            if csv_writer is not None:
                csv_writer.write_table(table.replace_schema_metadata(None))
            pending, npending = [], 0

        for i in range(run.grid.nchunks):
            d = U.read_npz(run.chunk_file(W.CELLS_DIR, i))
            n = len(d["label"])
            if not n:
                continue
            cols = {name: d[name] for name in schema.names}
            pending.append(pa.table({k: pa.array(v.astype(schema.field(k).type.to_pandas_dtype(), copy=False))
                                     for k, v in cols.items()}))
            npending += n
            rows += n
            vox = d["volume_voxels"].astype(np.int64)
            voxels += int(vox.sum())
            counts = np.bincount(vox)
            if len(counts) > len(volumes):
                volumes = np.pad(volumes, (0, len(counts) - len(volumes)))
            volumes[: len(counts)] += counts
            um3_min, um3_max = min(um3_min, float(d["volume_um3"].min())), max(um3_max, float(d["volume_um3"].max()))
            if npending >= ROW_GROUP:
                flush()
        flush()
    summary = {"rows": rows, "labelled_voxels": voxels}
    if rows:
        nz = np.flatnonzero(volumes)
        cum = np.cumsum(volumes)
        summary.update({
            "volume_voxels_min": int(nz[0]), "volume_voxels_max": int(nz[-1]),
            "volume_voxels_median": int(np.searchsorted(cum, (rows + 1) // 2)),
            "volume_voxels_mean": voxels / rows,
            "volume_um3_min": um3_min, "volume_um3_max": um3_max,
        })
    log.info("cells.parquet: %d cells, %d labelled voxels", rows, voxels)
    return {"outputs": outputs, "summary": summary, "volumes": volumes}
