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
from zseg.storage.arrays import create_array
from zseg.storage.grid import box_origin, box_shape, nearest_box, nearest_indices, owned_box, owner_voxels
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


# -- --no-resample: the network-scale masks brought back to the volume's scale -----------------
def _owners(run: RunContext, net: RunContext, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The chunk of the volume's grid owning each network-scale seed, and the seeds' network-scale
    C-order positions (the order final IDs follow)."""
    g, gn = run.grid, net.grid
    owner = g.owner(owner_voxels(seeds, g.shape, gn.shape)) if len(seeds) else np.zeros(0, np.int64)
    linear = np.ravel_multi_index(tuple(seeds.T), gn.shape) if len(seeds) else np.zeros(0, np.int64)
    return owner, np.asarray(linear, np.int64)


def own_reduce(run: RunContext) -> dict:
    """``masks:own``: give every seed an owner chunk of the volume's grid (the chunk holding the
    voxel that owns the seed's position, :func:`zseg.storage.grid.owner_voxels`) and a
    provisional ID in that chunk's range, so ``finalize`` decides each cell once, in its owner
    chunk, as without ``--no-resample``. Two passes over the network chunks' seeds (counts, then
    IDs in network-chunk order); memory is one integer per chunk and one chunk's seeds. Writes
    ``work/own/cNNNNNNN.npz`` per network chunk (each seed's ID, owner and position) and
    ``work/own.json`` (the running totals per chunk of the volume's grid); creates the empty
    ``work/masks.zarr``."""
    net = run.network_scale()
    g, gn = run.grid, net.grid
    counts = np.zeros(g.nchunks, np.int64)
    for n in range(gn.nchunks):
        owner, _ = _owners(run, net, U.read_npz(net.chunk_file(W.SEEDS_DIR, n))["seeds"])
        counts += np.bincount(owner, minlength=g.nchunks)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])
    given = offsets[:-1].copy()
    for n in range(gn.nchunks):
        owner, linear = _owners(run, net, U.read_npz(net.chunk_file(W.SEEDS_DIR, n))["seeds"])
        ids = np.zeros(len(owner), np.int64)
        for c in np.unique(owner):
            sel = owner == c
            ids[sel] = given[c] + 1 + np.arange(int(sel.sum()))
            given[c] += int(sel.sum())
        U.write_npz(net.chunk_file(W.OWN_DIR, n), ids=ids, owner=owner, linear=linear)
    create_array(W.masks_uri(run), shape=g.shape, chunks=g.chunk_shape, dtype=W.id_dtype(total),
                 zarr_format=run.params.zarr_format, overwrite=True)
    result = {"offsets": [int(v) for v in offsets], "total": total, "dtype": W.id_dtype(total)}
    U.write_json(run.path(W.OWN_RESULT), result)
    return result


def owned_linear(run: RunContext, index: int) -> np.ndarray:
    """The network-scale C-order positions of the seeds chunk ``index`` (volume grid) owns, in the
    order of their provisional IDs (``masks:own``)."""
    net = run.network_scale()
    box = owned_box(run.grid.core(index), run.grid.shape, net.grid.shape)
    ids, linear = [], []
    for n in net.grid.intersecting(box):
        d = U.read_npz(net.chunk_file(W.OWN_DIR, n))
        sel = d["owner"] == index
        ids.append(d["ids"][sel])
        linear.append(d["linear"][sel])
    ids, linear = (np.concatenate(ids), np.concatenate(linear)) if ids else (np.zeros(0, np.int64),) * 2
    return linear[np.argsort(ids)]


def resize_chunk(run: RunContext, index: int) -> dict:
    """``masks:resize``: the core of ``work/masks.zarr`` from the network-scale masks, resized back
    by nearest neighbour as Cellpose resizes its masks (:func:`zseg.storage.grid.nearest_indices`),
    each network seed's ID replaced by its ``masks:own`` ID; writes ``work/resize/cNNNNNNN.npz``
    (voxels per provisional ID at the volume's scale, and with ``--exclude-on-edges`` the IDs on
    the volume's faces)."""
    net = run.network_scale()
    g, gn = run.grid, net.grid
    core = g.core(index)
    src = nearest_box(core, g.shape, gn.shape)
    block = np.asarray(W.masks(net)[src])
    idx = [nearest_indices(n, m, sl.start, sl.stop) - s.start for sl, n, m, s in zip(core, g.shape, gn.shape, src)]
    net_ids = block[np.ix_(*idx)]
    offsets, _ = W.seed_offsets(net)
    _, out_dtype = W.seed_offsets(run)  # masks:own's ID type
    uniq = fastremap.unique(net_ids)
    uniq = uniq[uniq != 0].astype(np.int64)
    table = {0: 0}
    chunks = W.owners(offsets, uniq)
    for c in np.unique(chunks):
        own = U.read_npz(net.chunk_file(W.OWN_DIR, int(c)))["ids"]
        mine = uniq[chunks == c]
        table.update(zip(mine.tolist(), own[mine - offsets[c] - 1].tolist()))
    labels = fastremap.remap(net_ids.astype(np.int64), table, preserve_missing_labels=False).astype(out_dtype)
    W.masks(run, mode="r+")[core] = labels
    ids, cnt = fastremap.unique(labels, return_counts=True)
    keep = ids != 0
    extra = {}
    if run.params.exclude_on_edges:  # the cells this core shows on a face of the volume
        extra["edge"] = labels_on_faces(labels, core, g.shape)
    U.write_npz(run.chunk_file(W.RESIZE_DIR, index), ids=ids[keep].astype(np.int64),
                counts=cnt[keep].astype(np.int64), **extra)
    return {"labelled": int(cnt[keep].sum()), "network_box": [[s.start, s.stop] for s in src]}
