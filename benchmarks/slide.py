"""A whole multiplex slide run from given flows: zseg's chunked run against the in-memory chain.

    python benchmarks/slide.py [--tile 2048] [--sizes 4096x4096,4096x8192] [--markers 8]
                               [--chunk 2048] [--workers 2] [--baseline 4096x4096] [--root DIR]

A synthetic tile (``zseg.engine.synth.synth_multiplex``: DAPI, Membrane and ``--markers`` marker
channels; exact flows of both compartments) is repeated to fill each slide of ``--sizes`` (cells
cut at the tile seams are still cells for the flows), written chunk by chunk as an OME-Zarr slide
and two flow stores. For each size it runs ``zseg run --compartment both`` (a subprocess, the
whole pipeline from the given flows: patches, both compartments with the flow check, matching,
layers, table) and reports megapixels per second and the largest peak memory of any task
(every task's marker or reduce record): flat when the slide grows means memory is bounded by
the chunk. The baseline, in the same run, is the in-memory chain
(``zseg.engine.multiplex.segment_reference``: what a tool that loads the slide does) on the
``--baseline`` size, in a child process for its own peak memory; zseg's layers and table on that
size must equal it bit for bit.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

from zseg.engine import multiplex as MX
from zseg.engine.synth import flows_from_labels, synth_multiplex
from zseg.storage.arrays import create_array, open_array
from zseg.storage.omezarr import write_ome_zarr


def _shape(text: str) -> tuple[int, int]:
    y, x = text.lower().split("x")
    return int(y), int(x)


def make_tile(tile: int, markers: int, seed: int = 0) -> dict:
    s = synth_multiplex((tile, tile), diameter=24.0, markers=markers, seed=seed)
    return {"image": s["image"], "names": s["channel_names"],
            "flows": flows_from_labels(s["cells"]).astype(np.float32),
            "nuclear_flows": flows_from_labels(s["nuclei"]).astype(np.float32)}


def _tiled(a: np.ndarray, box) -> np.ndarray:
    """``np.tile`` of ``a`` (C, t, t) over the whole plane, read at ``box`` only."""
    t = a.shape[-1]
    ys = np.arange(box[0].start, box[0].stop) % t
    xs = np.arange(box[1].start, box[1].stop) % t
    return a[:, ys][:, :, xs]


def write_slide(root: str, tile: dict, shape: tuple[int, int], chunk: int = 1024) -> dict:
    os.makedirs(root, exist_ok=True)
    small = tile["image"][:, :1, :1]
    uri = os.path.join(root, "slide.ome.zarr")
    write_ome_zarr(uri, small, axes="cyx", voxel_size=(0.5, 0.5), unit="micrometer", chunks=(1, 1, 1),
                   channel_names=tile["names"])  # the metadata; the array is replaced below
    shutil.rmtree(os.path.join(uri, "0"))
    image = create_array(os.path.join(uri, "0"), shape=(small.shape[0], *shape), chunks=(1, 512, 512),
                         dtype=small.dtype, dimension_names=["c", "y", "x"])
    flows = {k: create_array(os.path.join(root, f"{k}.zarr"), shape=(3, *shape), chunks=(3, 512, 512),
                             dtype="float32") for k in ("flows", "nuclear_flows")}
    for y in range(0, shape[0], chunk):
        for x in range(0, shape[1], chunk):
            box = (slice(y, min(y + chunk, shape[0])), slice(x, min(x + chunk, shape[1])))
            image[(slice(None), *box)] = _tiled(tile["image"], box)
            for k, arr in flows.items():
                arr[(slice(None), *box)] = _tiled(tile[k], box)
    return {"slide": uri, **{k: os.path.join(root, f"{k}.zarr") for k in flows}}


def run_zseg(paths: dict, out: str, chunk: int, workers: int) -> dict:
    argv = [sys.executable, "-m", "zseg", "run", paths["slide"], out, "--compartment", "both",
            "--nuclear-channel", "DAPI", "--membrane-channels", "Membrane", "--flows", paths["flows"],
            "--nuclear-flows", paths["nuclear_flows"], "--diameter", "24", "--chunk-shape", f"{chunk},{chunk}",
            "--workers", str(workers), "--overwrite"]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return {"wall": wall, "peak_task_mib": peak_task_mib(out), "result": json.load(open(os.path.join(out, "run.json")))}


def peak_task_mib(out: str) -> float:
    """The largest peak resident memory of any task of the slide run and its compartments."""
    peak = 0.0
    for dirpath, _, files in os.walk(os.path.join(out, "work")):
        for f in files:
            if f.endswith(".json") and (f.startswith("c") or "usage" in dirpath):
                try:
                    m = json.load(open(os.path.join(dirpath, f)))
                except ValueError:
                    continue
                if isinstance(m, dict):
                    peak = max(peak, float(m.get("peak_rss_mib") or 0))
    return peak


def _baseline(paths: dict, q) -> None:
    from zseg.storage.slide import open_slide

    s = open_slide(paths["slide"])
    t0 = time.perf_counter()
    image = s.read((slice(None), slice(None)))
    f = np.asarray(open_array(paths["flows"])[...])
    nf = np.asarray(open_array(paths["nuclear_flows"])[...])
    stats = MX.patch_stats({"nuclear": image[0], "membrane": image[1]}, origin=(0, 0), slide_shape=s.shape,
                           patch_size=512)
    allowed = MX.seed_allowed(s.shape, 512, MX.patch_flags(stats)["is_informative"])
    ref = MX.segment_reference(image, s.channel_names, compartment="both", flows=f, nuclear_flows=nf,
                               niter=int(200 / (30 / 24)), flow_threshold=0.4, min_size=15, seed_allowed=allowed,
                               pixel_size_um=(0.5, 0.5))
    wall = time.perf_counter() - t0
    np.savez(paths["root"] + "/reference.npz", **ref["layers"], **{f"t_{k}": v for k, v in ref["table"].items()})
    q.put({"wall": wall, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def baseline(paths: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_baseline, args=(paths, q))
    p.start()
    out = q.get()
    p.join()
    return out


def same_as_reference(paths: dict, out: str) -> bool:
    ref = np.load(paths["root"] + "/reference.npz")
    for name in ("cells", "nuclei", "cytoplasm"):
        if not np.array_equal(np.asarray(open_array(os.path.join(out, "labels.zarr", name, "0"))[...]), ref[name]):
            return False
    t = pq.read_table(os.path.join(out, "cells.parquet")).to_pydict()
    return all(np.array_equal(np.asarray(t[k[2:]], np.float64), ref[k].astype(np.float64), equal_nan=True)
               for k in ref.files if k.startswith("t_"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--sizes", default="4096x4096,4096x8192")
    ap.add_argument("--baseline", default="4096x4096")
    ap.add_argument("--markers", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--root", default="/tmp/zseg-bench-slide")
    a = ap.parse_args()
    t0 = time.perf_counter()
    tile = make_tile(a.tile, a.markers)
    print(f"tile {a.tile}² with {len(tile['names'])} channels made in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for text in a.sizes.split(","):
        shape = _shape(text)
        root = os.path.join(a.root, text)
        paths = {**write_slide(root, tile, shape), "root": root}
        r = run_zseg(paths, os.path.join(root, "out"), a.chunk, a.workers)
        mpx = shape[0] * shape[1] / 1e6
        row = {"size": text, "mpx": mpx, "cells": r["result"]["result"]["cells"], "zseg_s": r["wall"],
               "zseg_mpx_s": mpx / r["wall"], "zseg_peak_task_mib": r["peak_task_mib"],
               "chunk_exact": r["result"]["result"]["chunk_exact"]}
        if text == a.baseline:
            b = baseline(paths)
            row.update(base_s=b["wall"], base_mpx_s=mpx / b["wall"], base_peak_mib=b["peak_mib"],
                       equal=same_as_reference(paths, os.path.join(root, "out")))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{len(tile['names'])} channels, chunk {a.chunk}², {a.workers} workers, "
          f"{os.cpu_count()} CPUs\n")
    print("| slide | megapixels | cells | run | seconds | Mpx/s | peak memory (MiB) | equal to in-memory |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['mpx']:.1f} | {r['cells']:,} | zseg run (largest task) | {r['zseg_s']:.0f} | "
              f"{r['zseg_mpx_s']:.3f} | {r['zseg_peak_task_mib']:.0f} | {r.get('equal', '')} |")
        if "base_s" in r:
            print(f"| {r['size']} | {r['mpx']:.1f} | {r['cells']:,} | in-memory chain (one process) | "
                  f"{r['base_s']:.0f} | {r['base_mpx_s']:.3f} | {r['base_peak_mib']:.0f} | |")


if __name__ == "__main__":
    main()
