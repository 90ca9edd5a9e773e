"""Cellpose's 2D flow error (the flow_threshold QC): zseg's engine against Cellpose, same run.

    python benchmarks/flow_error.py [--size 2048] [--diameter 24] [--chunk 1024] [--halo 96]

Builds a synthetic slide (``zseg.engine.synth.synth_multiplex``), gives it random network flows
(so every cell has an error to compute) and times, on the same masks and flows:

- ``cellpose.dynamics.flow_error`` on the whole slide (CPU, torch);
- ``zseg.engine.flow_error.flow_errors`` on the whole slide, with the slide's ``niter`` and
  precision;
- ``block_flow_errors`` chunk by chunk (cores of ``--chunk``, blocks grown by ``--halo``), as a
  chunked run decides them, one process.

It checks that zseg's errors equal Cellpose's to 1e-12 and that the chunks decide every cell
once with the whole slide's values, then prints a Markdown table and the peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from cellpose import dynamics

from zseg.engine import flow_error as F
from zseg.engine.blocks import label_boxes
from zseg.engine.synth import synth_multiplex
from zseg.storage.grid import ChunkGrid


def chunked(cells, flows, chunk, halo, niter, f32, boxes):
    labels, errors, undecided = [], [], 0
    grid = ChunkGrid(cells.shape, (chunk, chunk), (halo, halo))
    for i in range(grid.nchunks):
        block = grid.block(i)
        r = F.block_flow_errors(cells[block], flows[(slice(None), *block)], origin=[b.start for b in block],
                                core=grid.core_in_block(i), slide_shape=cells.shape, niter=niter, float32=f32,
                                boxes=boxes)
        labels.append(r["labels"])
        errors.append(r["errors"])
        undecided += r["undecided"]
    labels, errors = np.concatenate(labels), np.concatenate(errors)
    order = np.argsort(labels)
    return labels[order], errors[order], undecided


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--diameter", type=float, default=24.0)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--halo", type=int, default=96)
    a = ap.parse_args()
    cells = synth_multiplex((a.size, a.size), diameter=a.diameter, markers=0, seed=0)["cells"]
    flows = np.random.default_rng(0).normal(0, 3, (2, *cells.shape)).astype(np.float32)
    _, ext = F.mask_extents(cells)
    niter, f32 = F.diffusion_settings(cells.shape, int(ext.max()))
    n = int(cells.max())
    F.flow_errors(cells[:64, :64], flows[:, :64, :64], niter=2)  # compile the kernel

    t0 = time.perf_counter()
    theirs, _ = dynamics.flow_error(cells.astype(np.int64), flows, device=torch.device("cpu"))
    t_cp = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels, ours = F.flow_errors(cells, flows, niter=niter, float32=f32)
    t_ours = time.perf_counter() - t0
    boxes = label_boxes(cells)  # a run has them from its per-cell statistics: not timed
    t0 = time.perf_counter()
    c_labels, c_errors, undecided = chunked(cells, flows, a.chunk, a.halo, niter, f32, boxes)
    t_chunk = time.perf_counter() - t0
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)
    assert undecided == 0 and np.array_equal(c_labels, labels) and np.array_equal(c_errors, ours)
    same = int(np.sum(ours == theirs))
    print(f"slide {a.size}x{a.size}: {n} cells, niter {niter} ({'float32' if f32 else 'float64'}); "
          f"zseg = Cellpose to 1e-12 ({same}/{n} bit-identical), chunks {a.chunk} with halo {a.halo} "
          "decide every cell once with the whole slide's bits\n")
    print("| flow error | seconds | cells/s | vs Cellpose |")
    print("|---|---|---|---|")
    for name, t in (("cellpose.dynamics.flow_error, whole slide (CPU)", t_cp),
                    ("zseg flow_errors, whole slide", t_ours),
                    (f"zseg block_flow_errors, {(-(-a.size // a.chunk)) ** 2} chunks", t_chunk)):
        print(f"| {name} | {t:.2f} | {n / t:,.0f} | {t_cp / t:.1f}x |")
    print(f"\npeak RSS of this script: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
