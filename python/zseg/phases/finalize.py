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
import pyarrow.parquet as pq

from zseg.engine import blocks as B
from zseg.engine import dynamics as D
from zseg.engine import flow_error as FE
from zseg.engine import stitch as ST
from zseg.engine.multiplex import allowed_at
from zseg.outputs import labels as L
from zseg.outputs import report as R
from zseg.outputs import table as T
from zseg.outputs.verify import DIGESTS, chunk_digest, gather_digests
from zseg.phases.masks import owned_linear
from zseg.phases.seeds import load_seeds, recorded_device
from zseg.storage import uri as U
from zseg.workspace import usage
from zseg.workspace import work as W
from zseg.workspace.context import RunContext, write_manifest
from zseg.workspace.stages import STAGES, flow_check, size

log = logging.getLogger(__name__)
#: Cellpose's ``max_size_fraction``: a 2D mask covering more of its plane is removed (stitch mode).
MAX_PLANE_FRACTION = 0.4


def sizes_chunk(run: RunContext, index: int) -> dict:
    """Reads the voxel counts (``work/masks/*.npz``) of the chunks the block meets; writes the
    kept cells the chunk owns, their sizes and seed positions to ``work/sizes/cNNNNNNN.npz``."""
    g, p = run.grid, run.params
    offsets, _ = W.seed_offsets(run)
    lo, hi = int(offsets[index]), int(offsets[index + 1])
    sizes = np.zeros(hi - lo, np.int64)
    plane = run.planar
    if plane:  # a slide compartment or stitch mode: each 2D mask's box too (for the flow check)
        start = np.full((hi - lo, g.ndim), np.iinfo(np.int64).max, np.int64)
        stop = np.full((hi - lo, g.ndim), -1, np.int64)
    edge = np.zeros(hi - lo, bool)
    if hi > lo:
        for c in g.intersecting(g.block(index)):
            d = U.read_npz(run.chunk_file(W.counts_dir(run), c))
            sel = (d["ids"] > lo) & (d["ids"] <= hi)
            rows = d["ids"][sel] - lo - 1
            np.add.at(sizes, rows, d["counts"][sel])
            if p.exclude_on_edges:
                e = d["edge"]
                edge[e[(e > lo) & (e <= hi)] - lo - 1] = True
            if plane:
                np.minimum.at(start, rows, d["start"][sel])
                np.maximum.at(stop, rows, d["stop"][sel])
    keep = sizes > 0
    if run.stitching:  # a plane's 2D masks: no min_size (Cellpose turns it off before stitching), and
        # Cellpose's 2D rule for large masks: more than 40 % of the plane
        small, large = np.zeros(len(sizes), bool), sizes > MAX_PLANE_FRACTION * g.shape[1] * g.shape[2]
    else:
        small, large = D.size_limits(sizes, p.min_size, p.max_size or None)
    small &= keep
    large &= keep
    present = keep.copy()
    keep &= ~small & ~large
    on_edges = keep & edge  # after the size limits, as Cellpose removes edge masks last
    keep &= ~edge
    if run.resamples:
        seeds = load_seeds(run, index)["seeds"]
        linear = np.ravel_multi_index(tuple(seeds[keep].T), g.shape) if keep.any() else np.zeros(0, np.int64)
    else:  # --no-resample: C order at the network's scale, where the seeds are (monotone in the volume's slabs)
        linear = owned_linear(run, index)[keep]
    out = dict(kept=(lo + 1 + np.flatnonzero(keep)).astype(np.int64), sizes=sizes[keep], linear=np.asarray(linear, np.int64))
    stats = {"kept": int(keep.sum()), "too_small": int(small.sum()), "too_large": int(large.sum()),
             "empty": int((sizes == 0).sum()), "on_edges": int(on_edges.sum())}
    if plane:
        out, more = _plane_sizes(run, lo, present, large, keep, seeds, start[present], stop[present], out)
        stats.update(more)
    U.write_npz(run.chunk_file(W.SIZES_DIR, index), **out)
    return stats


def _plane_sizes(run: RunContext, lo: int, present, large, keep, seeds, start, stop, out: dict):
    """A slide compartment's extra per-cell facts: each present cell's box in the slide
    (``start``, ``stop``) and whether it is too large (for the flow check), and which kept cells
    are skipped because their seed lies in an uninformative patch (removed last, after hole filling)."""
    g = run.grid
    ids = lo + 1 + np.flatnonzero(present)
    is_large = large[present]
    yx = slice(g.ndim - 2, None)  # a plane run's (1, Y, X): the box's Y and X
    extents = (stop[:, yx] - start[:, yx]).sum(axis=1)
    max_extent = int(extents[~is_large].max()) + 2 if (~is_large).any() else 0
    skip = np.zeros(int(keep.sum()), bool)
    if run.plane is not None and run.plane.get("patches"):
        skip = ~allowed_at(seeds[keep][:, -2:], run.plane["patch_size"], patch_flags_grid(run))
    out = dict(out, boxed=ids.astype(np.int64), start=start, stop=stop, large=is_large, skip=skip)
    return out, {"max_extent": max_extent, "skipped": int(skip.sum())}


def patch_flags_grid(run: RunContext) -> np.ndarray:
    """The ``(ny, nx)`` grid of ``is_informative`` of the slide's ``patches.parquet``."""
    t = pq.read_table(run.plane["patches"], columns=["y_start", "x_start", "is_informative"]).to_pydict()
    ps = int(run.plane["patch_size"])
    y = np.asarray(t["y_start"], np.int64) // ps
    x = np.asarray(t["x_start"], np.int64) // ps
    flags = np.zeros((int(y.max()) + 1, int(x.max()) + 1), bool)
    flags[y, x] = np.asarray(t["is_informative"], bool)
    return flags


def extent_reduce(run: RunContext) -> dict:
    """Reads every ``sizes`` marker; writes ``work/extent.json``: the flow check's diffusion
    settings, Cellpose's ``niter`` = 2 x the largest cell extent in the slide after the
    ``max_size`` decision, and its float32 switch (:func:`zseg.engine.flow_error.diffusion_settings`)."""
    ext = max((int(m.get("max_extent", 0)) for m in _markers(run, W.SIZES_DIR)), default=0)
    niter, f32 = FE.diffusion_settings(run.grid.shape[-2:], ext)
    result = {"max_extent": ext, "niter": niter, "float32": bool(f32)}
    if run.stitching:  # each plane is its own 2D image in Cellpose: its own largest mask sets its niter
        per = np.zeros(run.grid.shape[0], np.int64)
        for i in range(run.grid.nchunks):
            d = U.read_npz(run.chunk_file(W.SIZES_DIR, i))
            ok = ~d["large"]
            np.maximum.at(per, d["start"][ok, 0], (d["stop"][ok, 1:] - d["start"][ok, 1:]).sum(axis=1) + 2)
        result["niter_per_plane"] = [FE.diffusion_settings(run.grid.shape[-2:], int(e))[0] for e in per]
    U.write_json(run.path(W.EXTENT_RESULT), result)
    return result


def holes_chunk(run: RunContext, index: int) -> dict:
    """Cellpose fills each cell's holes over whatever lies in them (a volume in 3D, a slide or
    any one-plane run in 2D): for each cell the chunk owns that the size limits and the flow
    check kept, the cells its holes take voxels from, decided once for the whole cell over the
    owner's block (which holds the cell and all it encloses). Writes ``work/holes/cNNNNNNN.npz``
    (``over`` loses ``count`` voxels to ``by``); ``finalize:number`` drops the cells left empty,
    or below ``min_size`` (Cellpose's second pass)."""
    g = run.grid
    mine = U.read_npz(run.chunk_file(W.SIZES_DIR, index))["kept"]
    over = by = count = np.zeros(0, np.int64)
    if len(mine):
        prov = np.asarray(W.masks(run)[g.block(index)])
        ids = fastremap.unique(prov)
        ids = ids[ids != 0].astype(np.int64)
        kept = _checked(run, ids)
        labels = fastremap.mask_except(prov, ids[kept].tolist()) if kept.any() else np.zeros_like(prov)
        over, by, count = D.filled_over(labels[0] if g.shape[0] == 1 else labels, mine)
    U.write_npz(run.chunk_file(W.HOLES_DIR, index), over=over, by=by, count=count)
    return {"cells_filled_over": int(len(np.unique(over))), "voxels_filled_over": int(count.sum())}


def _filled_over(run: RunContext) -> dict[int, int]:
    """Voxels each cell loses to the hole filling of the cells enclosing it (every chunk's)."""
    if not STAGES["finalize:holes"].applies(run):
        return {}
    lost: dict[int, int] = {}
    for c in range(run.grid.nchunks):
        d = U.read_npz(run.chunk_file(W.HOLES_DIR, c))
        for k, n in zip(d["over"].tolist(), d["count"].tolist()):
            lost[k] = lost.get(k, 0) + n
    return lost


def _by_owner(run: RunContext, ids: np.ndarray, directory: str):
    """For provisional ``ids`` (ascending), each chunk owning some of them (the chunk of their
    seed): the rows of ``ids`` it owns and its ``directory`` result (``work/<directory>/c*.npz``)."""
    offsets, _ = W.seed_offsets(run)
    own = W.owners(offsets, ids)
    for c in np.unique(own).tolist():
        yield np.flatnonzero(own == c), U.read_npz(run.chunk_file(directory, int(c)))


def _boxes_of(run: RunContext, ids: np.ndarray) -> tuple[B.Boxes, np.ndarray]:
    """The slide boxes (Y, X) of provisional ``ids`` (ascending) and which are too large, from
    the ``sizes`` results of the chunks owning them."""
    start = np.zeros((len(ids), 2), np.int64)
    stop = np.zeros((len(ids), 2), np.int64)
    large = np.zeros(len(ids), bool)
    for sel, d in _by_owner(run, ids, W.SIZES_DIR):
        rows = np.searchsorted(d["boxed"], ids[sel])
        start[sel], stop[sel], large[sel] = d["start"][rows, -2:], d["stop"][rows, -2:], d["large"][rows]
    return B.Boxes(ids.astype(np.uint64), start, stop), large


def quality_chunk(run: RunContext, index: int) -> dict:
    """Cellpose's flow check (2D ``flow_threshold``) of the cells this chunk owns: reads the
    block's provisional labels and flows and the boxes of its cells; writes the owned cells whose
    flow error exceeds the threshold to ``work/quality/cNNNNNNN.npz``. A cell is decided when it
    and every cell touching it are whole in the block (:func:`zseg.engine.flow_error.block_flow_errors`);
    the others are kept and counted as undecided (a larger halo decides them)."""
    g = run.grid
    block = g.block(index)
    settings = U.read_json(run.path(W.EXTENT_RESULT))
    mine = U.read_npz(run.chunk_file(W.SIZES_DIR, index))["kept"]
    masks = np.asarray(W.masks(run)[block])
    flows = np.asarray(W.flows(run)[(slice(None), *block)])[1:3]
    ids = B.present_labels(masks).astype(np.int64)
    boxes, large = _boxes_of(run, ids)
    if large.any():  # Cellpose checks the flows after dropping the large masks
        masks = np.where(np.isin(masks, ids[large]), 0, masks)
    origin = [s.start for s in block[-2:]]
    core = g.core_in_block(index)
    threshold = float(run.params.flow_threshold if run.stitching else run.plane["flow_threshold"])
    bad, checked = [], 0
    undecided = len(np.setdiff1d(mine, ids))  # owned cells without a pixel in the block cannot be checked
    for k in range(core[0].start, core[0].stop):  # each plane is its own 2D image (a slide has one)
        here = np.isin(ids, B.present_labels(masks[k]))  # a 2D mask lies in one plane
        niter = settings["niter_per_plane"][block[0].start + k] if run.stitching else settings["niter"]
        r = FE.block_flow_errors(masks[k], flows[:, k], origin=origin, core=core[-2:], slide_shape=g.shape[-2:],
                                 niter=int(niter), float32=bool(settings["float32"]),
                                 boxes=B.Boxes(boxes.ids[here], boxes.start[here], boxes.stop[here]),
                                 owned=np.intersect1d(mine, ids[here]))
        bad.append(r["labels"][r["errors"] > threshold].astype(np.int64))
        checked += len(r["labels"])
        undecided += r["undecided"]
    bad = np.concatenate(bad) if bad else np.zeros(0, np.int64)
    U.write_npz(run.chunk_file(W.QUALITY_DIR, index), bad=bad)
    return {"checked": int(checked), "removed": int(len(bad)), "undecided": int(undecided)}


def _checked(run: RunContext, ids: np.ndarray) -> np.ndarray:
    """Which provisional ``ids`` (ascending) the sizes stage kept and the flow check did not
    remove: the cells that fill their holes (in stitch mode, each plane's 2D masks)."""
    out = np.zeros(len(ids), bool)
    for sel, d in _by_owner(run, ids, W.SIZES_DIR):
        out[sel] = np.isin(ids[sel], d["kept"])
    if flow_check(run):
        for sel, d in _by_owner(run, ids, W.QUALITY_DIR):
            out[sel] &= ~np.isin(ids[sel], d["bad"])
    return out


def _fill_planes(labels: np.ndarray) -> np.ndarray:
    """Each plane's masks with their holes filled in 2D over what they hold (Cellpose's 2D masks
    before stitching: a mask enclosed by another in its plane disappears)."""
    return np.stack([D.fill_holes(p) for p in labels]) if len(labels) else labels


def overlaps_chunk(run: RunContext, index: int) -> dict:
    """Stitch mode: each plane's 2D masks in the core (holes filled over the block, as the labels
    stage fills them), their areas and first pixels, and the pixel counts of every pair of masks
    of plane ``z + 1`` over plane ``z`` for the core's planes ``z``; to ``work/overlaps/cNNNNNNN.npz``."""
    g = run.grid
    core, block = g.core(index), g.block(index)
    z0, z1 = core[0].start, core[0].stop
    prov = np.asarray(W.masks(run)[(slice(z0, min(z1 + 1, g.shape[0])), *block[1:])])
    ids = fastremap.unique(prov)
    ids = ids[ids != 0].astype(np.int64)
    kept = ids[_checked(run, ids)]
    prov = np.where(np.isin(prov, kept), prov, 0)
    planes = _fill_planes(prov)[(slice(None), *g.core_in_block(index)[1:])]
    width = core[2].stop - core[2].start
    out = {k: [] for k in ("ids", "plane", "first", "area", "up", "low", "count")}
    for k in range(z1 - z0):
        u, first, area = np.unique(planes[k].ravel(), return_index=True, return_counts=True)
        u, first, area = u[u != 0], first[u != 0], area[u != 0]
        out["ids"].append(u.astype(np.int64))
        out["plane"].append(np.full(len(u), z0 + k, np.int64))
        out["first"].append((core[1].start + first // width) * g.shape[2] + core[2].start + first % width)
        out["area"].append(area.astype(np.int64))
        if k + 1 < len(planes):
            a, b, n = ST.overlaps(planes[k + 1], planes[k])
            for key, v in (("up", a), ("low", b), ("count", n)):
                out[key].append(v)
    arrays = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)).astype(np.int64) for k, v in out.items()}
    U.write_npz(run.chunk_file(W.OVERLAPS_DIR, index), **arrays)
    return {"masks": int(len(arrays["ids"])), "pairs": int(len(arrays["up"]))}


def stitch_reduce(run: RunContext) -> dict:
    """Stitch mode: Cellpose's ``stitch3D`` replayed over every chunk's overlap table
    (:func:`zseg.engine.stitch.replay`), then ``min_size`` / ``max_size`` once per stitched cell
    (its voxels after each plane's hole filling, as Cellpose counts them) and final IDs 1..N in C
    order of each cell's first seed; writes ``work/stitch.npz``. Memory: every 2D mask's row."""
    g, p = run.grid, run.params
    parts = [U.read_npz(run.chunk_file(W.OVERLAPS_DIR, i)) for i in range(g.nchunks)]
    cat = {k: np.concatenate([d[k] for d in parts]).astype(np.int64) for k in parts[0]}
    uid, inv = np.unique(cat["ids"], return_inverse=True)
    area = np.bincount(inv, weights=cat["area"], minlength=len(uid)).astype(np.int64)
    first = np.full(len(uid), np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, inv, cat["first"])
    plane = np.zeros(len(uid), np.int64)
    plane[inv] = cat["plane"]
    stitched = ST.replay(uid, plane, first, area, (cat["up"], cat["low"], cat["count"]),
                         float(p.stitch_threshold), g.shape[0])
    m = int(stitched.max()) if len(stitched) else 0
    total = np.bincount(stitched, weights=area, minlength=m + 1).astype(np.int64)[1:]
    small, large = D.size_limits(total, p.min_size, p.max_size or None)
    # each stitched cell is ordered (and owned) by its first seed in C order, whatever the chunking
    linear = _seed_linear(run, uid)
    order = np.lexsort((linear, stitched))  # within each stitched label (1..m, all present), by seed position
    rep = order[np.r_[True, stitched[order][1:] != stitched[order][:-1]]] if m else np.zeros(0, np.int64)
    best = linear[rep]
    alive = ~small & ~large
    final_of = np.zeros(m + 1, np.int64)
    ranked = np.flatnonzero(alive)[np.argsort(best[alive], kind="stable")]
    final_of[ranked + 1] = np.arange(1, len(ranked) + 1)
    owner = np.zeros(len(ranked) + 1, np.int64)
    offsets, _ = W.seed_offsets(run)
    owner[1:] = W.owners(offsets, uid[rep[ranked]]) if len(ranked) else np.zeros(0, np.int64)
    U.write_npz(run.path(W.STITCH_TABLE), ids=uid, final=final_of[stitched], owner=owner)
    result = {"masks": int(len(uid)), "stitched": m, "cells": int(len(ranked)), "too_small": int(small.sum()),
              "too_large": int(large.sum())}
    U.write_json(run.path(W.STITCH_RESULT), result)
    return result


def _seed_linear(run: RunContext, ids: np.ndarray) -> np.ndarray:
    """The C-order position of the seed of each provisional ID (ascending ``ids``)."""
    out = np.zeros(len(ids), np.int64)
    for sel, d in _by_owner(run, ids, W.SIZES_DIR):
        out[sel] = d["linear"][np.searchsorted(d["kept"], ids[sel])]
    return out


def number_reduce(run: RunContext) -> dict:
    """Final IDs 1..N in C order of the seeds' positions, so they do not depend on the chunking.

    Chunks are visited one z-slab of the grid at a time: every voxel of slab ``k`` precedes every
    voxel of slab ``k + 1`` in C order, so a seed's rank is the number of kept seeds in earlier
    slabs plus its rank within its slab. Memory is one slab's kept seeds.
    """
    g = run.grid
    if run.stitching:
        return _number_stitched(run)
    per_slab = int(np.prod(g.grid_shape[1:]))
    base = 0
    lost = _filled_over(run)
    for k in range(g.grid_shape[0]):
        chunks = range(k * per_slab, (k + 1) * per_slab)
        parts = [_numbered(run, c, lost) for c in chunks]
        linear = np.concatenate([p["linear"] for p in parts])
        rank = np.empty(len(linear), np.int64)
        rank[np.argsort(linear, kind="stable")] = np.arange(len(linear))
        start = 0
        for c, p in zip(chunks, parts):
            n = len(p["kept"])
            U.write_npz(run.chunk_file(W.FINAL_DIR, c), kept=p["kept"], final=base + 1 + rank[start:start + n],
                        skipped=p["skipped"])
            start += n
        base += len(linear)
    L.create_labels(run, W.id_dtype(base))
    result = {"cells": base, "dtype": W.id_dtype(base)}
    U.write_json(run.path(W.FINAL_NUMBER_RESULT), result)
    return result


def _number_stitched(run: RunContext) -> dict:
    """Stitch mode: the final IDs the stitch reduce decided, filed by the chunk owning each 2D mask."""
    t = U.read_npz(run.path(W.STITCH_TABLE))
    offsets, _ = W.seed_offsets(run)
    own = W.owners(offsets, t["ids"])
    for c in range(run.grid.nchunks):
        sel = (own == c) & (t["final"] > 0)
        U.write_npz(run.chunk_file(W.FINAL_DIR, c), kept=t["ids"][sel], final=t["final"][sel],
                    skipped=np.zeros(0, np.int64))
    n = len(t["owner"]) - 1
    L.create_labels(run, W.id_dtype(n))
    result = {"cells": n, "dtype": W.id_dtype(n)}
    U.write_json(run.path(W.FINAL_NUMBER_RESULT), result)
    return result


def _numbered(run: RunContext, chunk: int, lost: dict[int, int]) -> dict:
    """The cells of ``chunk`` that get a final ID: those kept by size, less the ones the holes of
    cells enclosing them leave empty or below ``min_size``, and (on a slide) the ones the flow
    check removed and the ones skipped (listed apart: they stay through hole filling)."""
    p = U.read_npz(run.chunk_file(W.SIZES_DIR, chunk))
    if lost:
        left = p["sizes"] - np.asarray([lost.get(int(k), 0) for k in p["kept"]], np.int64)
        floor = max(int(run.params.min_size), 1)
        ok = left >= floor  # the arrays aligned with "kept" (on a slide, "skip" too)
        p = {**p, **{k: p[k][ok] for k in ("kept", "sizes", "linear", "skip") if k in p}}
    if run.plane is None:
        return {**p, "skipped": np.zeros(0, np.int64)}
    bad = U.read_npz(run.chunk_file(W.QUALITY_DIR, chunk))["bad"] if flow_check(run) else np.zeros(0, np.int64)
    ok = ~np.isin(p["kept"], bad)
    number = ok & ~p["skip"]
    return {"kept": p["kept"][number], "linear": p["linear"][number], "skipped": p["kept"][ok & p["skip"]]}


def _final_ids(run: RunContext, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Final ID of each provisional ID (0 for cells removed), and which are skipped cells."""
    out = np.zeros(len(ids), np.int64)
    skipped = np.zeros(len(ids), bool)
    for sel, d in _by_owner(run, ids, W.FINAL_DIR):
        kept, final = d["kept"], d["final"]
        skipped[sel] = np.isin(ids[sel], d["skipped"])
        if not len(kept):
            continue
        pos = np.minimum(np.searchsorted(kept, ids[sel]), len(kept) - 1)
        out[sel] = np.where(kept[pos] == ids[sel], final[pos], 0)
    return out, skipped


def _fill(labels: np.ndarray, plane: bool) -> np.ndarray:
    """Each cell's holes filled over what they hold, as Cellpose fills them; a one-plane run (a
    2D image) is filled as the 2D image it is (in 3D, every void of a single plane touches the
    volume's faces and none would be filled)."""
    return D.fill_holes(labels[0])[None] if plane else D.fill_holes(labels)


def labels_chunk(run: RunContext, index: int) -> dict:
    """Reads the block of ``work/masks.zarr`` and the final IDs; writes the core into every
    dataset of ``labels.zarr`` a task writes, the core's cell statistics and its QC pieces."""
    g = run.grid
    block = g.block(index)
    numbered = U.read_json(run.path(W.FINAL_NUMBER_RESULT))
    dtype, cells = np.dtype(numbered["dtype"]), int(numbered["cells"])
    prov = np.asarray(W.masks(run)[block])
    ids = fastremap.unique(prov)
    ids = ids[ids != 0].astype(np.int64)
    new, skipped = _final_ids(run, ids)
    # skipped cells take part in hole filling under IDs above every final one, then go
    temp = np.where(skipped, cells + 1 + np.arange(len(ids)), new)
    mapping = {int(a): int(b) for a, b in zip(ids, temp)}
    mapping[0] = 0
    work = np.uint64 if skipped.any() else dtype
    if run.stitching:  # each plane's 2D masks are filled before stitching (Cellpose's order), then relabelled
        planes = np.where(np.isin(prov, ids[_checked(run, ids)]), prov, 0)
        filled = fastremap.remap(_fill_planes(planes), mapping, preserve_missing_labels=False).astype(work, copy=False)
    else:
        filled = _fill(fastremap.remap(prov, mapping, preserve_missing_labels=False).astype(work, copy=False),
                       g.shape[0] == 1)
    if skipped.any():
        filled[filled > cells] = 0
        filled = filled.astype(dtype)
    cib = g.core_in_block(index)
    core_labels = filled[cib]
    # cells of the core that reach an inner face of the block: their holes may need more halo
    cut = set()
    for ax in range(1 if run.stitching else 0, g.ndim):  # stitch mode fills holes in 2D: Z faces do not cut
        for side, at_border in ((0, block[ax].start == 0), (-1, block[ax].stop == g.shape[ax])):
            if not at_border:
                cut.update(np.unique(np.take(filled, side, axis=ax)).tolist())
    cut.discard(0)
    core_ids = set(fastremap.unique(core_labels).tolist())
    # every dataset of labels.zarr under this core, the cell statistics and the QC pieces
    if run.stitching:  # a stitched cell spans many 2D masks: one owner, its first seed's chunk
        owners = U.read_npz(run.path(W.STITCH_TABLE))["owner"][new]
    else:
        owners = W.owners(W.seed_offsets(run)[0], ids)
    written = _finish_chunk(run, index, core_labels, new, owners)
    return {"cells_in_core": len(core_ids - {0}), "cells_cut_by_block": len(cut & core_ids), **written,
            **chunk_digest(core_labels)}  # what `zseg verify` compares the stored chunk with


def _markers(run: RunContext, phase: str) -> list[dict]:
    """Every chunk's marker of ``phase`` (empty when the stage did not run), each read once."""
    if not U.exists(run.chunk_file(phase, 0, "json")):
        return []
    stage = next(s for s in STAGES.values() if s.marker_dir == phase)
    return [U.read_json(run.chunk_file(phase, i, "json")) for i in range(size(run, stage))]


def report_reduce(run: RunContext) -> dict:
    """Reads every marker; writes the coarse pyramid levels, ``cells.parquet``, ``qc/`` and the
    result into ``run.json`` (marking the run complete), then ``work/report.json``."""
    g = run.grid
    markers = {ph: _markers(run, ph) for ph in ("percentiles", "follow", "seeds", "masks", "sizes", "holes", "quality",
                                                 "labels")}

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
        "dynamics_device": (recorded_device(run) or {}).get("device"),
    }
    if run.params.exclude_on_edges:
        result["removed_on_edges"] = total("sizes", "on_edges")
    if STAGES["finalize:holes"].applies(run):  # cells whose voxels the holes of an enclosing cell took
        result["filled_over"] = {"cells": total("holes", "cells_filled_over"), "voxels": total("holes", "voxels_filled_over")}
    if run.stitching:
        result["stitch"] = U.read_json(run.path(W.STITCH_RESULT))
    if run.plane is not None:
        result["skipped_cells"] = total("sizes", "skipped")
    if flow_check(run):
        result["flow_check"] = {"removed": total("quality", "removed"), "undecided": total("quality", "undecided")}
    exact = (result["long_trajectories"] == 0 and result["ends_outside_block"] == 0 and result["cells_cut_by_block"] == 0
             and result.get("flow_check", {}).get("undecided", 0) == 0)
    result["chunk_exact"] = exact
    if not exact:
        need = [int(m) + 6 for m in max_step]
        if not run.resamples:  # trajectories at the network's scale: the halo that covers them in voxels
            need = [-(-n * s // ns) for n, s, ns in zip(need, g.shape, run.network_grid.shape)]
        if run.stitching:  # planes are segmented apart: no Z halo is ever needed
            need[0] = 0
        if result.get("flow_check", {}).get("undecided", 0):  # the flow check needs each mask and its
            need[-2:] = [max(n, 2 * h) for n, h in zip(need[-2:], g.halo[-2:])]  # neighbours whole: double YX
        result["suggested_halo"] = [max(a, b) for a, b in zip(need, g.halo)]
        log.warning(
            "halo %s is too small for this data: %d trajectories longer than the halo allows, %d cells cut "
            "by a block face, %d masks the flow check could not decide; labels near chunk faces may depend on "
            "the chunking. Re-run with --halo %s.",
            list(g.halo), result["long_trajectories"], result["cells_cut_by_block"],
            result.get("flow_check", {}).get("undecided", 0), ",".join(map(str, result["suggested_halo"])),
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
