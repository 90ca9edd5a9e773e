"""Phase 6, ``finalize``: per-cell decisions made once per cell, consecutive IDs, the labels.

Stages:

- ``sizes`` (map): the owner chunk of each provisional cell (the chunk holding its seed) sums the
  cell's voxel counts over the chunks its block meets and decides ``min_size`` / ``max_size``
  once for the whole cell;
- ``number`` (reduce): final IDs 1..N in C order of the cells' seed positions (independent of
  the chunking); creates ``labels.zarr``;
- ``labels`` (map): relabels the block, fills each cell's holes over its block, writes the core
  into every dataset of ``labels.zarr`` a task can write (segmented level, pyramid levels made
  from the core, the input's full resolution), measures its cells and keeps its QC pieces
  (:func:`zseg.pipeline.outputs.finish_chunk`);
- ``cells`` (map, :mod:`zseg.pipeline.table`): merges the measurements of the cells each chunk
  owns into complete rows of the cell table;
- ``report`` (reduce): counts, halo warnings, the coarse pyramid levels, ``cells.parquet``,
  ``qc/report.html``, time and memory per stage into ``run.json``; marks it complete.
"""

from __future__ import annotations

import logging

import fastremap
import numpy as np

from zseg.engine import dynamics as D
from zseg.pipeline import flowstore as FS
from zseg.pipeline import number as N
from zseg.pipeline.manifest import Run, write_manifest
from zseg.pipeline.verify import DIGESTS, chunk_digest, gather_digests
from zseg.pipeline.seeds import load_seeds
from zseg.pipeline.outputs import create_labels, finish_chunk, finish_run, labels_uri
from zseg.storage import uri as U
from zseg.storage.grid import box_shape

log = logging.getLogger(__name__)
NUMBER_RESULT = "final_number.json"
REPORT_RESULT = "report.json"


def sizes_chunk(run: Run, index: int) -> dict:
    g, p = run.grid, run.params
    offsets, _ = N.load(run)
    lo, hi = int(offsets[index]), int(offsets[index + 1])
    sizes = np.zeros(hi - lo, np.int64)
    if hi > lo:
        for c in g.intersecting(g.block(index)):
            d = U.read_npz(run.chunk_file("masks", c))
            sel = (d["ids"] > lo) & (d["ids"] <= hi)
            np.add.at(sizes, d["ids"][sel] - lo - 1, d["counts"][sel])
    keep = sizes > 0
    small = keep & (sizes < p.min_size) if p.min_size > 0 else np.zeros_like(keep)
    large = keep & (sizes > p.max_size) if p.max_size else np.zeros_like(keep)
    keep &= ~small & ~large
    seeds = load_seeds(run, index)["seeds"]
    linear = np.ravel_multi_index(tuple(seeds[keep].T), g.shape) if keep.any() else np.zeros(0, np.int64)
    U.write_npz(run.chunk_file("sizes", index), kept=(lo + 1 + np.flatnonzero(keep)).astype(np.int64),
                sizes=sizes[keep], linear=np.asarray(linear, np.int64))
    return {"kept": int(keep.sum()), "too_small": int(small.sum()), "too_large": int(large.sum()),
            "empty": int((sizes == 0).sum())}


def number_reduce(run: Run) -> dict:
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
        parts = [U.read_npz(run.chunk_file("sizes", c)) for c in chunks]
        linear = np.concatenate([p["linear"] for p in parts])
        rank = np.empty(len(linear), np.int64)
        rank[np.argsort(linear, kind="stable")] = np.arange(len(linear))
        start = 0
        for c, p in zip(chunks, parts):
            n = len(p["kept"])
            U.write_npz(run.chunk_file("final", c), kept=p["kept"], final=base + 1 + rank[start:start + n])
            start += n
        base += len(linear)
    create_labels(run, N.id_dtype(base))
    result = {"cells": base, "dtype": N.id_dtype(base)}
    U.write_json(run.path(NUMBER_RESULT), result)
    return result


def _final_ids(run: Run, ids: np.ndarray) -> np.ndarray:
    """Final ID of each provisional ID (0 for cells removed by size)."""
    offsets, _ = N.load(run)
    out = np.zeros(len(ids), np.int64)
    own = N.owners(offsets, ids)
    for c in np.unique(own):
        sel = own == c
        d = U.read_npz(run.chunk_file("final", int(c)))
        kept, final = d["kept"], d["final"]
        if not len(kept):
            continue
        pos = np.minimum(np.searchsorted(kept, ids[sel]), len(kept) - 1)
        out[sel] = np.where(kept[pos] == ids[sel], final[pos], 0)
    return out


def labels_chunk(run: Run, index: int) -> dict:
    g = run.grid
    block = g.block(index)
    dtype = np.dtype(U.read_json(run.path(NUMBER_RESULT))["dtype"])
    prov = np.asarray(FS.masks(run)[block])
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
    written = finish_chunk(run, index, core_labels, new, N.owners(N.load(run)[0], ids))
    return {"cells_in_core": len(core_ids - {0}), "cells_cut_by_block": len(cut & core_ids), **written,
            **chunk_digest(core_labels)}  # what `zseg verify` compares the stored chunk with


def _markers(run: Run, phase: str) -> list[dict]:
    """Every chunk's marker of ``phase`` (empty when the stage did not run), each read once."""
    if not U.exists(run.chunk_file(phase, 0, "json")):
        return []
    return [U.read_json(run.chunk_file(phase, i, "json")) for i in range(run.grid.nchunks)]


def report_reduce(run: Run) -> dict:
    g = run.grid
    markers = {ph: _markers(run, ph) for ph in ("percentiles", "follow", "seeds", "masks", "sizes", "labels")}

    def total(phase: str, key: str) -> int:
        return int(sum(m.get(key, 0) for m in markers[phase]))

    max_step = np.zeros(g.ndim, np.int64)
    for m in markers["follow"]:
        max_step = np.maximum(max_step, m["max_step"])
    result = {
        "cells": int(U.read_json(run.path(NUMBER_RESULT))["cells"]),
        "seeds": int(U.read_json(run.path(N.RESULT))["total"]),
        "foreground_voxels": total("follow", "foreground"),
        "long_trajectories": total("follow", "long"),
        "escaped_trajectories": total("follow", "escaped"),
        "ends_outside_block": total("masks", "ends_outside_block"),
        "cells_cut_by_block": total("labels", "cells_cut_by_block"),
        "max_trajectory": [int(v) for v in max_step],
        "seconds": {ph: round(sum(m.get("seconds", 0) for m in ms), 3) for ph, ms in markers.items() if ms},
        "labels": labels_uri(run),
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
    result.update(finish_run(run, result))  # coarse pyramid levels, cells.parquet, qc/report.html, usage
    # run.json's complete flag commits the run: written after every output, and before this
    # stage's own marker (the report file), so a report stage killed in between left a finished
    # run, and a re-run of the stage writes both again, identically.
    manifest = dict(run.manifest, complete=True, result=result, **{DIGESTS: gather_digests(run)})
    write_manifest(run.root, manifest)
    U.write_json(run.path(REPORT_RESULT), result)
    return result
