"""The structural figures of a large run, from zseg's own code (nothing is run): predict units,
tiles, scratch, and the bytes each phase reads per voxel, for docs/scale.md.

    python benchmarks/scale.py [--shape 10000,10000,10000] [--diameter 30] [--chunk-shape 128,256,256]
                               [--predict-memory 4] [--channels 1] [--input-bytes 2] [--store-chunk 64,256,256]

Predict: the units of :mod:`zseg.engine.units` for CPSAM's 256-pixel tiles, their tiles against
Cellpose's whole-volume count, and the scratch their sums take. The other phases: per chunk task,
the block it reads (core plus halo, the default halo 2 x diameter) over the core it writes, which
is how much more than once each voxel is read; and the zarr objects (S3 GET requests) a task reads
and writes, for stores chunked like the run (``--store-chunk`` for the input).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from zseg.engine import units as UN  # noqa: E402
from zseg.engine.views import Geometry  # noqa: E402
from zseg.phases.plan import default_halo  # noqa: E402
from zseg.storage.grid import ChunkGrid  # noqa: E402


def _objects(box_shape, chunk) -> int:
    """Zarr chunks a box of ``box_shape`` meets at worst (not aligned with the chunk grid)."""
    return math.prod(math.ceil((b - 1) / c) + 1 for b, c in zip(box_shape, chunk))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="10000,10000,10000")
    ap.add_argument("--diameter", type=float, default=30.0)
    ap.add_argument("--anisotropy", type=float, default=1.0)
    ap.add_argument("--chunk-shape", default="128,256,256")
    ap.add_argument("--predict-memory", type=float, default=12.0)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--input-bytes", type=int, default=2)
    ap.add_argument("--store-chunk", default="64,256,256", help="the input's zarr chunks")
    a = ap.parse_args()
    shape = tuple(int(s) for s in a.shape.split(","))
    chunk = tuple(int(s) for s in a.chunk_shape.split(","))
    store = tuple(int(s) for s in a.store_chunk.split(","))
    voxels = math.prod(shape)
    geo = Geometry.of(shape, diameter=a.diameter, anisotropy=a.anisotropy, bsize=256)
    n = UN.tiles_per_unit(geo, int(a.predict_memory * 2**30), nchannels=a.channels)
    units = UN.Units.of(geo, tiles=n)
    cellpose = sum(t for _p, t in geo.view_counts().values())
    reach = [[hi - lo for lo, hi in spans] for spans in units.spans]
    scratch = math.prod(sum(r) for r in reach) * 8 * 4  # every unit's reach, 4 int64 channels
    scaled = math.prod(geo.scaled)
    own = [max(b[j + 1] - b[j] for j in range(len(b) - 1)) for b in units.bounds]
    biggest = [max(r) for r in reach]
    read_unit = [s.stop - s.start for s in units.read(len(units) // 2)]
    print(f"volume {shape} ({voxels:.3g} voxels), diameter {a.diameter:g}, anisotropy {a.anisotropy:g}, "
          f"network scale {geo.scaled}, CPSAM tiles of 256\n")
    print("| predict | value |")
    print("|---|---|")
    print(f"| --predict-memory | {a.predict_memory:g} GiB -> {n} tiles per unit axis, unit grid {units.grid_shape} |")
    print(f"| units (predict tasks) | {len(units)} |")
    print(f"| largest unit: own box / reach (network scale) | {own} / {biggest} |")
    print(f"| its estimated memory | {UN.unit_bytes(units, a.channels) / 2**30:.2f} GiB |")
    print(f"| tiles (all views) / Cellpose's whole-volume count | {units.total_tiles} / {cellpose} = "
          f"{units.total_tiles / cellpose:.2f} |")
    print(f"| input read per voxel (a unit reads its reach's input) | "
          f"{math.prod(sum(r) for r in reach) / scaled:.3f} x |")
    print(f"| scratch: units' sums | {scratch / 2**40:.2f} TiB = {scratch / voxels:.1f} bytes per voxel |")
    print(f"| input objects per unit (store chunks {store}) | {_objects(read_unit, store)} |")
    halo = default_halo(a.diameter, a.anisotropy)
    grid = ChunkGrid(shape, chunk, halo)
    block = [c + 2 * h for c, h in zip(chunk, halo)]
    ratio = math.prod(block) / math.prod(chunk)
    print(f"\n| chunk phases (chunk {chunk}, halo {halo}) | value |")
    print("|---|---|")
    print(f"| chunk tasks per map stage | {grid.nchunks} |")
    print(f"| block read / core written (voxels re-read through the halo) | {ratio:.2f} x |")
    print(f"| zarr objects read per task (block over the run's chunks) | {_objects(block, chunk)} |")
    print("| zarr objects written per task | 1 per store |")
    print(f"| flows store (float16, 4 channels) | {8 * voxels / 2**40:.2f} TiB |")
    print(f"| end points (int16, 3) + provisional labels (uint32) + labels (uint32) | "
          f"{(6 + 4 + 4) * voxels / 2**40:.2f} TiB |")


if __name__ == "__main__":
    main()
