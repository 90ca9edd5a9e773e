"""What the outputs cost per chunk: cell statistics, pyramid levels, QC pieces, on one core.

    python benchmarks/outputs.py [--chunk 128,256,256] [--diameter 30] [--channels 2]

Builds a label image of roughly spherical cells (Voronoi cells of random seeds, about
``diameter`` voxels across, 15 % background) and random uint16 channels of one chunk, then
times (best of 3) each piece of work ``finalize:labels`` adds per chunk, and the merge a
``finalize:cells`` task does, and prints a Markdown table with seconds and voxels per second.
The peak resident memory of the whole script is printed last.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import scipy.ndimage as ndi

from zseg.engine import pyramid as P
from zseg.engine import stats as S


def cells(shape, diameter, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = max(1, int(np.prod(shape) / (diameter**3 * 0.52)))
    seeds = np.zeros(shape, np.uint32)
    pts = tuple(rng.integers(0, s, n) for s in shape)
    seeds[pts] = np.arange(1, n + 1, dtype=np.uint32)
    _, idx = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    lab = seeds[tuple(idx)]
    lab[rng.random(n + 1)[lab] < 0.15] = 0
    return lab


def best(fn, repeat=3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", default="128,256,256")
    ap.add_argument("--diameter", type=float, default=30.0)
    ap.add_argument("--channels", type=int, default=2)
    a = ap.parse_args()
    shape = tuple(int(v) for v in a.chunk.split(","))
    lab = cells(shape, a.diameter)
    img = np.random.default_rng(1).integers(0, 65535, size=(a.channels, *shape), dtype=np.uint16)
    nvox = int(np.prod(shape))
    ncells = len(np.unique(lab)) - 1
    rows = []
    rows.append(("block_stats (count, centroid, bbox, mean/max of each channel)",
                 best(lambda: S.block_stats(lab, img, offset=(0, 0, 0)))))
    rows.append(("downsample_mode 1x2x2", best(lambda: P.downsample_mode(lab, (1, 2, 2)))))
    rows.append(("downsample_mode 2x2x2", best(lambda: P.downsample_mode(lab, (2, 2, 2)))))
    halves = [S.block_stats(lab[:, :, : shape[2] // 2], img[..., : shape[2] // 2]),
              S.block_stats(lab[:, :, shape[2] // 2:], img[..., shape[2] // 2:], offset=(0, 0, shape[2] // 2))]
    rows.append(("merge_stats of two halves + cell_table",
                 best(lambda: S.cell_table(S.merge_stats(halves), (1.0, 1.0, 1.0)))))
    print(f"chunk {shape} ({nvox / 1e6:.1f} M voxels), {ncells} cells, {a.channels} uint16 channels\n")
    print("| work | seconds | M voxels/s |")
    print("|---|---|---|")
    for name, t in rows:
        rate = "" if name.startswith("merge") else f"{nvox / t / 1e6:.1f}"
        print(f"| {name} | {t:.3f} | {rate} |")
    print(f"\npeak RSS of this script: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
