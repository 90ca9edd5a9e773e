"""2D trajectories: zseg's 2D numba kernel against the 3D kernel on the same plane (one Z voxel).

    python benchmarks/kernel2d.py [--size 1024] [--diameter 16] [--repeats 5]

Makes the exact Cellpose flows of a plane of `zseg synth` cells, then follows every foreground
pixel with ``zseg.engine.dynamics.follow_flows``: once on the 2D flows (the 2D kernel), once on
the same flows lifted to a volume of one Z plane with zero Z flow (the 3D kernel). Prints the
best-of-N seconds of each, their ratio, and whether the end pixels agree exactly. This is the
measurement behind docs/architecture.md's choice to keep a separate 2D kernel.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from zseg.engine.dynamics import follow_flows, prepare_flows
from zseg.engine.synth import flows_from_labels, synth_cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--diameter", type=float, default=16.0)
    ap.add_argument("--niter", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    _, labels = synth_cells((8, a.size, a.size), diameter=a.diameter, seed=0)
    plane = labels[4]
    f = flows_from_labels(plane)  # (3, Y, X): dY, dX, cellprob
    flow2, fg = prepare_flows(f[:2], f[2], cellprob_threshold=0.0, flow3D_smooth=0.0)
    starts2 = np.argwhere(fg)
    flow3 = np.concatenate([np.zeros((1, 1, *flow2.shape[1:]), np.float32), flow2[:, None]], axis=0)
    starts3 = np.concatenate([np.zeros((len(starts2), 1), np.int64), starts2], axis=1)
    shape2, shape3 = flow2.shape[1:], flow3.shape[1:]

    def run2():
        return follow_flows(flow2, starts2, niter=a.niter, origin=(0, 0), volume_shape=shape2)

    def run3():
        return follow_flows(flow3, starts3, niter=a.niter, origin=(0, 0, 0), volume_shape=shape3)

    times = {}
    out = {}
    for name, fn in (("2D kernel", run2), ("3D kernel, one plane", run3)):
        fn()  # compile / warm up
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out[name] = fn()
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    d2, d3 = out["2D kernel"][0], out["3D kernel, one plane"][0][:, 1:]
    same_ends = bool(np.array_equal(np.floor(d2), np.floor(d3)))
    same_bits = bool(np.array_equal(d2, d3))
    print(f"plane {a.size}x{a.size}, diameter {a.diameter:g}, {len(starts2)} foreground pixels, niter {a.niter}, "
          f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}; best of {a.repeats}\n")
    print("| kernel | seconds | vs 2D kernel |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.3f} | {t / times['2D kernel']:.2f}x |")
    print(f"\nend pixels identical: {same_ends}; displacements bitwise identical: {same_bits}")


if __name__ == "__main__":
    main()
