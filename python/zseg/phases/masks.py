"""Phase 5, ``masks``: label every core voxel by the seed region its trajectory ends in.

A task reads the seeds of the chunks whose cores meet its block (never the whole table),
paints their regions over the block with global IDs — overlaps go to the seed with the larger
histogram count, ties to the later position in C order, as Cellpose's painting order does —
and labels each foreground voxel of the core by the region at its end point. Every chunk is
processed, whether or not it owns seeds.
"""

from __future__ import annotations

import fastremap
import numpy as np

from zseg.engine import dynamics as D
from zseg.engine.blocks import label_boxes, labels_on_faces
from zseg.phases.seeds import block_end_points, load_seeds
from zseg.storage import uri as U
from zseg.storage.grid import box_origin, box_shape
from zseg.workspace import work as W
from zseg.workspace.context import RunContext


def _block_seeds(run: RunContext, box, offsets):
    parts = []
    for c in run.grid.intersecting(box):
        d = load_seeds(run, c)
        d["ids"] = offsets[c] + 1 + np.arange(len(d["seeds"]), dtype=np.int64)
        parts.append(d)
    nd = run.grid.ndim
    if not parts:
        return np.zeros((0, nd), np.int64), np.zeros(0, np.int32), np.zeros((0,) + (D.REGION_WINDOW,) * nd, bool), np.zeros(0, np.int64)
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("seeds", "counts", "regions", "ids")}
    return cat["seeds"], cat["counts"], cat["regions"], cat["ids"]


def seed_priority(seeds: np.ndarray, counts: np.ndarray, shape) -> np.ndarray:
    """Rank of each seed in painting order: by count, ties by position in C order."""
    linear = np.ravel_multi_index(tuple(seeds.T), shape) if len(seeds) else np.zeros(0, np.int64)
    order = np.lexsort((linear, counts))
    rank = np.empty(len(seeds), np.int64)
    rank[order] = np.arange(len(seeds))
    return rank


def process_chunk(run: RunContext, index: int) -> dict:
    """Reads the seeds of the chunks meeting the block and the core's end points; writes the
    core of ``work/masks.zarr`` and ``work/masks/cNNNNNNN.npz`` (voxels per provisional ID)."""
    g = run.grid
    core, block = g.core(index), g.block(index)
    offsets, dtype = W.seed_offsets(run)
    seeds, counts, regions, ids = _block_seeds(run, block, offsets)
    painted = D.paint_regions(
        box_shape(block), box_origin(block), seeds, regions,
        ids.astype(dtype), seed_priority(seeds, counts, g.shape),
    )
    starts, ends = block_end_points(run, core)
    local = ends - box_origin(block)
    outside = np.any((local < 0) | (local >= np.array(box_shape(block))), axis=1)
    local = np.clip(local, 0, np.array(box_shape(block)) - 1)
    labels = np.zeros(box_shape(core), dtype=dtype)
    labels[tuple((starts - box_origin(core)).T)] = painted[tuple(local.T)]
    labels[tuple((starts[outside] - box_origin(core)).T)] = 0
    W.masks(run, mode="r+")[core] = labels
    uniq, cnt = fastremap.unique(labels, return_counts=True)
    keep = uniq != 0
    extra = {}
    if run.planar:  # a slide's compartment or stitch mode: each 2D mask's box in this core, for the flow check
        boxes = label_boxes(labels, origin=box_origin(core))
        extra = {"start": boxes.start, "stop": boxes.stop}
    if run.params.exclude_on_edges:  # the cells this core shows on a face of the volume
        extra["edge"] = labels_on_faces(labels, core, g.shape)
    U.write_npz(run.chunk_file(W.MASKS_DIR, index), ids=uniq[keep].astype(np.int64), counts=cnt[keep].astype(np.int64),
                **extra)
    return {"labelled": int(cnt[keep].sum()), "ends_outside_block": int(outside.sum())}
