"""Cell-nucleus matching: zseg's vectorised matcher against the reference pipeline's loop.

    python benchmarks/matching.py [--size 4096] [--diameter 21] [--chunk 2048] [--halo 64]

Builds a synthetic slide (``zseg.engine.synth.synth_multiplex``: about 30,000 cells on 4096²),
then makes the nuclei a second, independent segmentation would give: each nucleus moved by up to
±6 pixels (so some straddle two cells or touch the membrane), 5 % of the cells dropped (their
nuclei stay unmatched) and both label images given random, non-consecutive IDs. It times, in the
same run, on the same labels:

- the baseline: the reference pipeline's CPU matcher as a loop over cells in ascending label,
  with Python sets of pixel coordinates per cell, membrane and nucleus (the faster of the two
  published loops, with sets instead of lists), ties to the lowest nucleus label;
- ``zseg.engine.matching.match_masks`` on the whole slide;
- ``block_match`` chunk by chunk (cores of ``--chunk``, blocks grown by ``--halo``), as the
  chunked pipeline runs it, one process (the labels' boxes in the slide, which a run has from its
  per-cell statistics, are computed before the timing).

It checks that all three give the same pairs and prints a Markdown table and the peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from skimage.segmentation import find_boundaries

from zseg.engine import matching as M
from zseg.engine.blocks import label_boxes
from zseg.engine.synth import synth_multiplex
from zseg.storage.grid import ChunkGrid


def reference_loop(cells: np.ndarray, nuclei: np.ndarray) -> list[tuple[int, int]]:
    """The reference pipeline's matcher: per cell, sets of pixel tuples, greedy in label order."""
    membrane = np.where(find_boundaries(cells, mode="inner", connectivity=1), cells, 0)

    def coords(labels):
        flat = labels.ravel()
        order = np.argsort(flat, kind="stable")
        ids, starts = np.unique(flat[order], return_index=True)
        ys, xs = np.unravel_index(order, labels.shape)
        out = {}
        for k, (lab, a) in enumerate(zip(ids.tolist(), starts.tolist())):
            b = starts[k + 1] if k + 1 < len(starts) else len(order)
            if lab:
                out[lab] = set(zip(ys[a:b].tolist(), xs[a:b].tolist()))
        return out

    cell_px, mem_px, nuc_px = coords(cells), coords(membrane), coords(nuclei)
    taken: set[int] = set()
    pairs = []
    for c in sorted(cell_px):
        pix = cell_px[c]
        interior = pix - mem_px.get(c, set())
        if not interior:
            continue
        best = None
        for n in sorted({int(nuclei[p]) for p in pix} - {0}):
            if n in taken:
                continue
            nuc = nuc_px[n]
            outside = len(nuc - interior)
            if outside == len(nuc):
                continue
            key = (outside * 1.0 / len(nuc), n)
            if best is None or key < best:
                best = key
        if best is not None:
            taken.add(best[1])
            pairs.append((c, best[1]))
    return pairs


def chunked(cells, nuclei, chunk, halo, boxes):
    pairs, undecided = [], 0
    grid = ChunkGrid(cells.shape, (chunk, chunk), (halo, halo))
    for i in range(grid.nchunks):
        block = grid.block(i)
        got = M.block_match(cells[block], nuclei[block], origin=[b.start for b in block],
                            core=grid.core_in_block(i), slide_shape=cells.shape, **boxes)
        pairs += zip(got["cells"].tolist(), got["nuclei"].tolist())
        undecided += got["undecided"]
    return sorted(pairs), undecided


def second_segmentation(slide, seed=0):
    """Nuclei moved by up to ±6 px, 5 % of cells dropped, random non-consecutive IDs for both."""
    rng = np.random.default_rng(seed)
    cells, nuclei = slide["cells"], slide["nuclei"]
    n = int(cells.max())
    moved = np.zeros_like(nuclei)
    ys, xs = np.nonzero(nuclei)
    ids = nuclei[ys, xs]
    shift = rng.integers(-6, 7, (n + 1, 2))
    yy = np.clip(ys + shift[ids, 0], 0, cells.shape[0] - 1)
    xx = np.clip(xs + shift[ids, 1], 0, cells.shape[1] - 1)
    moved[yy, xx] = ids
    drop = rng.random(n + 1) < 0.05
    drop[0] = False
    cells = np.where(drop[cells], 0, cells)
    cell_ids = np.concatenate(([0], rng.choice(2**31, n, replace=False) + 1)).astype(np.uint32)
    nuc_ids = np.concatenate(([0], rng.choice(2**31, n, replace=False) + 1)).astype(np.uint32)
    return cell_ids[cells], nuc_ids[moved]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--diameter", type=float, default=21.0)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--halo", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    slide = synth_multiplex((a.size, a.size), diameter=a.diameter, markers=0, seed=0)
    cells, nuclei = second_segmentation(slide)
    ncell, nnuc = len(np.unique(cells)) - 1, len(np.unique(nuclei)) - 1

    def best(fn):
        times, out = [], None
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    t0 = time.perf_counter()
    ref = reference_loop(cells, nuclei)
    t_ref = time.perf_counter() - t0
    t_vec, (mc, mn) = best(lambda: M.match_masks(cells, nuclei))
    boxes = dict(cell_boxes=label_boxes(cells), nucleus_boxes=label_boxes(nuclei))  # a run: from its statistics
    t_chunk, (pairs, undecided) = best(lambda: chunked(cells, nuclei, a.chunk, a.halo, boxes))
    vec = list(zip(mc.tolist(), mn.tolist()))
    assert vec == ref, "the vectorised matcher differs from the reference loop"
    assert undecided == 0 and pairs == vec, "the chunked matcher differs from the whole slide's"
    print(f"slide {a.size}x{a.size}: {ncell} cells, {nnuc} nuclei, {len(vec)} matched "
          f"(identical pairs in all three); chunks {a.chunk}, halo {a.halo}\n")
    print("| matcher | seconds | cells/s | vs reference loop |")
    print("|---|---|---|---|")
    for name, t in (("reference loop (sets of pixels, one cell at a time), 1 run", t_ref),
                    (f"zseg match_masks, whole slide, best of {a.repeat}", t_vec),
                    (f"zseg block_match, {(-(-a.size // a.chunk)) ** 2} chunks, best of {a.repeat}", t_chunk)):
        print(f"| {name} | {t:.2f} | {ncell / t:,.0f} | {t_ref / t:.1f}x |")
    print(f"\npeak RSS of this script: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
