"""`--no-resample` against resampling, zseg against Cellpose, same run, same flows.

    python benchmarks/no_resample.py [--shape 64,256,256] [--diameter 60] [--chunk-shape 64,128,128]

Draws synthetic cells at the network's scale (Cellpose's ``int(L * 30 / diameter)`` per axis,
isotropic voxels) and their exact flows, resizes those flows to the volume as Cellpose's
``resample=True`` does (``transforms.resize_image_3d``), and times, from the flows on:

- Cellpose's ``resize_and_compute_masks`` at the volume's scale (``resample=True``: niter
  ``200 / rescale``) and at the network's scale, resized back (``resample=False``: niter 200);
- ``zseg run --flows`` of each (one worker; the volume-scale flows, or the network-scale ones
  with ``--no-resample``).

Prints a Markdown table: seconds (zseg's include its start-up and the zarr writes), peak memory of
zseg's tasks, cells, zseg's AP against Cellpose's masks and whether every voxel agrees (the same
partition) for each setting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cellpose import dynamics, transforms

from zseg.engine.synth import flows_from_labels, synth_cells
from zseg.storage.arrays import create_array, open_array
from zseg.storage.omezarr import write_ome_zarr


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))


def ap(ref: np.ndarray, labels: np.ndarray) -> str:
    from cellpose.metrics import average_precision

    return " / ".join(f"{v:.3f}" for v in average_precision([ref], [labels], threshold=[0.5, 0.9])[0][0])


def write_flows(path: Path, flows: np.ndarray, chunks) -> str:
    arr = create_array(str(path), shape=flows.shape, chunks=(4, *chunks), dtype="float32")
    arr[...] = flows
    return str(path)


def zseg_run(image: str, flows: str, out: Path, diameter: float, chunk: str, *extra: str) -> tuple[float, dict, np.ndarray]:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zseg", "run", image, str(out), "--flows", flows, "--diameter", str(diameter),
                    "--chunk-shape", chunk, "--workers", "1", "--flows-dtype", "float32", *extra],
                   check=True, capture_output=True)
    wall = time.perf_counter() - t
    result = json.loads((out / "run.json").read_text())["result"]
    return wall, result, np.asarray(open_array(str(out / "labels.zarr" / "0"))[...])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="64,256,256")
    parser.add_argument("--diameter", type=float, default=60.0)
    parser.add_argument("--chunk-shape", default="64,128,128")
    a = parser.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    rescale = 30.0 / a.diameter
    net = tuple(int(s * rescale) for s in shape)
    _, cells = synth_cells(net, diameter=30, seed=1)
    fnet = flows_from_labels(cells).astype(np.float32)
    yf = np.moveaxis(fnet, 0, -1)  # as Cellpose's _run_net holds them: (Z, Y, X, 4)
    forig = np.moveaxis(transforms.resize_image_3d(yf, shape, no_channels=False), -1, 0).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        image = str(root / "image.ome.zarr")
        write_ome_zarr(image, np.zeros(shape, np.uint16), axes="zyx", voxel_size=(1.0, 1.0, 1.0),
                       chunks=tuple(min(64, s) for s in shape))
        for name, flows, niter, resize, extra in (
                ("resample (Cellpose's default)", forig, int(200 / rescale), None, ()),
                ("--no-resample", fnet, 200, shape, ("--no-resample",))):
            t = time.perf_counter()
            ref = dynamics.resize_and_compute_masks(flows[:3], flows[3], niter=niter, do_3D=True, min_size=15,
                                                    resize=resize)
            cp = time.perf_counter() - t
            store = write_flows(root / f"flows{len(rows)}.zarr", flows, tuple(min(64, s) for s in flows.shape[1:]))
            wall, result, labels = zseg_run(image, store, root / f"out{len(rows)}", a.diameter, a.chunk_shape, *extra)
            peak = max(v.get("peak_rss_mib") or 0 for v in result["usage"].values())
            rows.append((name, "x".join(map(str, flows.shape[1:])), niter, cp, wall, peak, int(ref.max()),
                         result["cells"], ap(ref, labels), same_partition(ref, labels)))
    print(f"{'x'.join(map(str, shape))} voxels, diameter {a.diameter:g}, zseg chunks {a.chunk_shape}, one worker\n")
    print("| setting | dynamics at | niter | Cellpose s | zseg run s | zseg peak MiB | Cellpose cells | zseg cells "
          "| AP@0.5 / AP@0.9 | every voxel |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.0f} | {r[6]} | {r[7]} | {r[8]} | {r[9]} |")


if __name__ == "__main__":
    main()
