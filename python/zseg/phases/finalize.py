"""Phase 6, ``finalize``: per-cell decisions made once per cell, consecutive IDs, the labels
(docs/architecture.md, "Phases and stages" and "Invariants").

Stages:

- ``sizes`` (map): the owner chunk of each provisional cell (the chunk holding its seed) sums the
  cell's voxel counts over the chunks its block meets and decides ``min_size`` / ``max_size``
  once for the whole cell;
- ``number`` (reduce): final IDs 1..N in C order of the cells' seed positions (independent of
  the chunking); creates ``labels.zarr``;
- ``labels`` (map): relabels the block, fills each cell's holes over its block, writes the core
  into every dataset of ``labels.zarr`` a task can write (segmented level, pyramid levels made
  from the core, the input's full resolution), measures its cells and keeps its QC pieces
  (:func:`_finish_chunk`);
- ``cells`` (map, :func:`zseg.outputs.table.cells_chunk`): merges the measurements of the cells each chunk
  owns into complete rows of the cell table;
- ``report`` (reduce): counts, halo warnings, the coarse pyramid levels, ``cells.parquet``,
  ``qc/report.html``, time and memory per stage into ``run.json``; marks it complete.
"""

from __future__ import annotations

import logging
import time

import fastremap
import numpy as np

from zseg.engine import dynamics as D
from zseg.outputs import labels as L
from zseg.outputs import report as R
from zseg.outputs import table as T
from zseg.outputs.verify import DIGESTS, chunk_digest, gather_digests
from zseg.phases.seeds import load_seeds
from zseg.storage import uri as U
from zseg.workspace import usage
from zseg.workspace import work as W
from zseg.workspace.context import RunContext, write_manifest

log = logging.getLogger(__name__)


def sizes_chunk(run: RunContext, index: int) -> dict:
    """Reads the voxel counts (``work/masks/*.npz``) of the chunks the block meets; writes the
    kept cells the chunk owns, their sizes and seed positions to ``work/sizes/cNNNNNNN.npz``."""
    g, p = run.grid, run.params
    offsets, _ = W.seed_offsets(run)
    lo, hi = int(offsets[index]), int(offsets[index + 1])
    sizes = np.zeros(hi - lo, np.int64)
    if hi > lo:
        for c in g.intersecting(g.block(index)):
            d = U.read_npz(run.chunk_file(W.MASKS_DIR, c))
            sel = (d["ids"] > lo) & (d["ids"] <= hi)
            np.add.at(sizes, d["ids"][sel] - lo - 1, d["counts"][sel])
    keep = sizes > 0
    small, large = D.size_limits(sizes, p.min_size, p.max_size or None)
    small &= keep
    large &= keep
    keep &= ~small & ~large
    seeds = load_seeds(run, index)["seeds"]
    linear = np.ravel_multi_index(tuple(seeds[keep].T), g.shape) if keep.any() else np.zeros(0, np.int64)
    U.write_npz(run.chunk_file(W.SIZES_DIR, index), kept=(lo + 1 + np.flatnonzero(keep)).astype(np.int64),
                sizes=sizes[keep], linear=np.asarray(linear, np.int64))
    return {"kept": int(keep.sum()), "too_small": int(small.sum()), "too_large": int(large.sum()),
            "empty": int((sizes == 0).sum())}


def number_reduce(run: RunContext) -> dict:
    """Final IDs 1..N in C order of the seeds' positions, so they do not depend on the chunking.

    Chunks are visited one z-slab of the grid at a time: every voxel of slab ``k`` precedes every
    voxel of slab ``k + 1`` in C order, so a seed's rank is the number of kept seeds in earlier
    slabs plus its rank within its slab. Memory is one slab's kept seeds.
    """
    g = run.grid
    per_slab = int(np.prod(g.grid_shape[1:]))
    base = 0
    for k in range(g.grid_shape[0]):
        chunks = range(k * per_slab, (k + 1) * per_slab)
        parts = [U.read_npz(run.chunk_file(W.SIZES_DIR, c)) for c in chunks]
        linear = np.concatenate([p["linear"] for p in parts])
        rank = np.empty(len(linear), np.int64)
        rank[np.argsort(linear, kind="stable")] = np.arange(len(linear))
        start = 0
        for c, p in zip(chunks, parts):
            n = len(p["kept"])
            U.write_npz(run.chunk_file(W.FINAL_DIR, c), kept=p["kept"], final=base + 1 + rank[start:start + n])
            start += n
        base += len(linear)
    L.create_labels(run, W.id_dtype(base))
    result = {"cells": base, "dtype": W.id_dtype(base)}
    U.write_json(run.path(W.FINAL_NUMBER_RESULT), result)
    return result


def _final_ids(run: RunContext, ids: np.ndarray) -> np.ndarray:
    """Final ID of each provisional ID (0 for cells removed by size)."""
    offsets, _ = W.seed_offsets(run)
    out = np.zeros(len(ids), np.int64)
    own = W.owners(offsets, ids)
    for c in np.unique(own):
        sel = own == c
        d = U.read_npz(run.chunk_file(W.FINAL_DIR, int(c)))
        kept, final = d["kept"], d["final"]
        if not len(kept):
            continue
        pos = np.minimum(np.searchsorted(kept, ids[sel]), len(kept) - 1)
        out[sel] = np.where(kept[pos] == ids[sel], final[pos], 0)
    return out


def labels_chunk(run: RunContext, index: int) -> dict:
    """Reads the block of ``work/masks.zarr`` and the final IDs; writes the core into every
    dataset of ``labels.zarr`` a task writes, the core's cell statistics and its QC pieces."""
    g = run.grid
    block = g.block(index)
    dtype = np.dtype(U.read_json(run.path(W.FINAL_NUMBER_RESULT))["dtype"])
    prov = np.asarray(W.masks(run)[block])
    ids = fastremap.unique(prov)
    ids = ids[ids != 0].astype(np.int64)
    new = _final_ids(run, ids)
    mapping = {int(a): int(b) for a, b in zip(ids, new)}
    mapping[0] = 0
    relabelled = fastremap.remap(prov, mapping, preserve_missing_labels=False).astype(dtype, copy=False)
    filled = D.fill_holes(relabelled)
    cib = g.core_in_block(index)
    core_labels = filled[cib]
    # cells of the core that reach an inner face of the block: their holes may need more halo
    cut = set()
    for ax in range(g.ndim):
        for side, at_border in ((0, block[ax].start == 0), (-1, block[ax].stop == g.shape[ax])):
            if not at_border:
                cut.update(np.unique(np.take(filled, side, axis=ax)).tolist())
    cut.discard(0)
    core_ids = set(fastremap.unique(core_labels).tolist())
    # every dataset of labels.zarr under this core, the cell statistics and the QC pieces
    written = _finish_chunk(run, index, core_labels, new, W.owners(W.seed_offsets(run)[0], ids))
    return {"cells_in_core": len(core_ids - {0}), "cells_cut_by_block": len(cut & core_ids), **written,
            **chunk_digest(core_labels)}  # what `zseg verify` compares the stored chunk with


def _markers(run: RunContext, phase: str) -> list[dict]:
    """Every chunk's marker of ``phase`` (empty when the stage did not run), each read once."""
    if not U.exists(run.chunk_file(phase, 0, "json")):
        return []
    return [U.read_json(run.chunk_file(phase, i, "json")) for i in range(run.grid.nchunks)]


def report_reduce(run: RunContext) -> dict:
    """Reads every marker; writes the coarse pyramid levels, ``cells.parquet``, ``qc/`` and the
    result into ``run.json`` (marking the run complete), then ``work/report.json``."""
    g = run.grid
    markers = {ph: _markers(run, ph) for ph in ("percentiles", "follow", "seeds", "masks", "sizes", "labels")}

    def total(phase: str, key: str) -> int:
        return int(sum(m.get(key, 0) for m in markers[phase]))

    max_step = np.zeros(g.ndim, np.int64)
    for m in markers["follow"]:
        max_step = np.maximum(max_step, m["max_step"])
    result = {
        "cells": int(U.read_json(run.path(W.FINAL_NUMBER_RESULT))["cells"]),
        "seeds": int(U.read_json(run.path(W.NUMBER_RESULT))["total"]),
        "foreground_voxels": total("follow", "foreground"),
        "long_trajectories": total("follow", "long"),
        "escaped_trajectories": total("follow", "escaped"),
        "ends_outside_block": total("masks", "ends_outside_block"),
        "cells_cut_by_block": total("labels", "cells_cut_by_block"),
        "max_trajectory": [int(v) for v in max_step],
        "seconds": {ph: round(sum(m.get("seconds", 0) for m in ms), 3) for ph, ms in markers.items() if ms},
        "labels": L.labels_uri(run),
    }
    exact = result["long_trajectories"] == 0 and result["ends_outside_block"] == 0 and result["cells_cut_by_block"] == 0
    result["chunk_exact"] = exact
    if not exact:
        need = [int(m) + 6 for m in max_step]
        result["suggested_halo"] = [max(a, b) for a, b in zip(need, g.halo)]
        log.warning(
            "halo %s is too small for this data: %d trajectories longer than the halo allows, %d cells cut "
            "by a block face; labels near chunk faces may depend on the chunking. Re-run with --halo %s.",
            list(g.halo), result["long_trajectories"], result["cells_cut_by_block"],
            ",".join(map(str, result["suggested_halo"])),
        )
    result.update(_finish_run(run, result))  # coarse pyramid levels, cells.parquet, qc/report.html, usage
    # run.json's complete flag commits the run: written after every output, and before this
    # stage's own marker (the report file), so a report stage killed in between left a finished
    # run, and a re-run of the stage writes both again, identically.
    manifest = dict(run.manifest, complete=True, result=result, **{DIGESTS: gather_digests(run)})
    write_manifest(run.root, manifest)
    U.write_json(run.path(W.REPORT_RESULT), result)
    return result


def _finish_chunk(run: RunContext, index: int, core_labels: np.ndarray, final_ids: np.ndarray, owners: np.ndarray) -> dict:
    """Everything ``finalize:labels`` writes for its core besides level 0's hole filling.

    Parameters
    ----------
    core_labels : (z, y, x) ndarray
        Final labels of the core.
    final_ids, owners : (K,) ndarray of int
        The final IDs of the block's cells and the chunk that owns each (its seed's chunk);
        0 IDs (removed cells) are ignored.

    Returns
    -------
    dict
        For the chunk's marker.
    """
    lay = L.layout(run)
    L.write_levels(run, index, core_labels, lay)
    image = run.volume.read(run.grid.core(index))
    parts = T.write_partials(run, index, core_labels, image, final_ids, owners)
    R.write_chunk_views(run, index, core_labels, image)
    return {"owners": parts}


def _finish_run(run: RunContext, result: dict) -> dict:
    """The once-per-run outputs: the coarse pyramid, ``cells.parquet``, ``qc/report.html``.

    Returns what ``run.json``'s result gains: the output paths and counts, and the usage
    (time, peak memory) of every stage.
    """
    t0 = time.perf_counter()
    lay = L.layout(run)
    tiles = L.build_reduced_levels(run, lay)
    cells = T.write_table(run)
    out = {
        "outputs": {
            "labels": L.labels_uri(run),
            "levels": [{"path": lv.path, "role": lv.role, "shape": list(lv.shape), "scale": list(lv.scale)}
                       for lv in lay.levels],
            **cells["outputs"],
            "qc": U.join(run.params.output, "qc", "report.html"),
        },
        "table": cells["summary"],
        "pyramid_tiles": tiles,
    }
    out["usage"], chunk_seconds, chunk_cells = usage.scan(run)

    def so_far():  # this stage is still running: its time and peak memory so far
        out["usage"]["finalize:report"] = {"kind": "reduce", "phase": "finalize", "tasks": 1,
                                           "seconds": round(time.perf_counter() - t0, 3),
                                           "peak_rss_mib": round(usage.peak_mib(), 1)}

    so_far()
    R.write_report(run, {**result, **out}, lay, volumes=cells["volumes"], chunk_cells=chunk_cells,
                    chunk_seconds=chunk_seconds)
    so_far()
    out["usage_by_phase"] = usage.by_phase(out["usage"])
    return out
