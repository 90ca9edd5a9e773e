"""Flows -> labels: zseg against Cellpose's own `compute_masks`, same flows, same machine, same run.

    python benchmarks/dynamics.py [--shape 48,128,128] [--diameter 16] [--workers 2] [--device cpu]

Makes a `zseg synth` volume and its exact flows once (cached under ~/.cache/zseg/bench), then
times each contender in its own subprocess and reads that subprocess's peak RSS:

- cellpose: `cellpose.dynamics.compute_masks(dP, cellprob, do_3D=True)` + its hole filling and
  small-mask removal, on the whole volume (CPU; torch uses every core);
- zseg whole: zseg's engine on the whole volume (one block);
- zseg run: the chunked pipeline (`zseg run --flows`) with the given chunk shape and workers.

``--device cuda`` runs Cellpose's dynamics and zseg's trajectories (the torch kernel) on the GPU;
zseg whole stays on the numba CPU kernel. Prints a Markdown table with seconds, peak RSS, AP@0.5 against the ground truth, and the
speed ratio cellpose seconds / zseg seconds (> 1 means zseg is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def _cache(shape, diameter) -> str:
    root = os.path.expanduser(f"~/.cache/zseg/bench/{'x'.join(map(str, shape))}-d{diameter:g}")
    if not os.path.exists(os.path.join(root, "flows.zarr")):
        subprocess.run([sys.executable, "-m", "zseg", "synth", root, "--shape", ",".join(map(str, shape)),
                        "--diameter", str(diameter), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
    return root


def _load(root):
    import zarr

    flows = np.asarray(zarr.open_array(os.path.join(root, "flows.zarr"), mode="r")[...])
    truth = np.asarray(zarr.open_array(os.path.join(root, "image.ome.zarr", "labels", "cells", "0"), mode="r")[...])
    return flows, truth


def _ap(truth, labels) -> float:
    from cellpose.metrics import average_precision

    return float(average_precision([truth.astype(np.int64)], [labels.astype(np.int64)], threshold=[0.5])[0][0, 0])


def one(name: str, root: str, niter: int, chunk: str, workers: int, device: str = "cpu") -> dict:
    """Run one contender in this process; return seconds and AP."""
    flows, truth = _load(root)
    dP, cellprob = flows[:3], flows[3]
    t0 = time.perf_counter()
    if name == "cellpose":
        import torch
        from cellpose import dynamics, utils

        masks = dynamics.compute_masks(dP.astype(np.float32), cellprob.astype(np.float32), niter=niter,
                                       do_3D=True, min_size=-1, max_size_fraction=1.0, device=torch.device(device))
        labels = utils.fill_holes_and_remove_small_masks(masks, min_size=15)
    elif name == "zseg-whole":
        from zseg.engine.dynamics import compute_masks

        labels = compute_masks(dP, cellprob, niter=niter, min_size=15)
    else:
        import zarr

        out = tempfile.mkdtemp()
        subprocess.run([sys.executable, "-m", "zseg", "run", os.path.join(root, "image.ome.zarr"), out,
                        "--flows", os.path.join(root, "flows.zarr"), "--niter", str(niter),
                        "--chunk-shape", chunk, "--workers", str(workers), "--overwrite", "--device", device],
                       check=True, stdout=subprocess.DEVNULL)
        labels = np.asarray(zarr.open_array(os.path.join(out, "labels.zarr", "0"), mode="r")[...])
    seconds = time.perf_counter() - t0
    # peak RSS (KiB on Linux): this process, or for zseg-run the largest zseg process it waited for
    who = resource.RUSAGE_CHILDREN if name == "zseg-run" else resource.RUSAGE_SELF
    peak = resource.getrusage(who).ru_maxrss
    return {"seconds": seconds, "ap50": _ap(truth, labels), "cells": int(labels.max()), "peak_mib": peak / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="48,128,128")
    ap.add_argument("--diameter", type=float, default=16.0)
    ap.add_argument("--chunk-shape", default="32,64,64")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: Cellpose's and zseg's dynamics on the GPU")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--niter", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.root, a.niter, a.chunk_shape, a.workers, a.device)))
        return
    shape = tuple(int(s) for s in a.shape.split(","))
    niter = int(200 * a.diameter / 30)
    root = _cache(shape, a.diameter)
    rows = {}
    for name in ("cellpose", "zseg-whole", "zseg-run"):
        out = subprocess.run([sys.executable, __file__, "--one", name, "--root", root, "--niter", str(niter),
                              "--chunk-shape", a.chunk_shape, "--workers", str(a.workers), "--device", a.device],
                             check=True, capture_output=True, text=True)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["cellpose"]["seconds"]
    print(f"volume {shape}, diameter {a.diameter:g}, niter {niter}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"zseg run: chunk shape {a.chunk_shape}, {a.workers} workers; dynamics on {a.device}\n")
    print("| contender | seconds | peak RSS (MiB) | cells | AP@0.5 vs truth | speed vs cellpose |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['cells']} | {r['ap50']:.3f} | {base / r['seconds']:.2f}x |")


if __name__ == "__main__":
    main()
