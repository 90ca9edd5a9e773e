"""The network phase: zseg against Cellpose's own 3D eval, same network, volume and device.

    python benchmarks/predict.py [--shape 16,128,128] [--diameter 30] [--width vit-l] [--blocks 1]
                                 [--batch-size 8] [--chunk-shape 16,128,128] [--device auto] [--fp32]
                                 [--repeat 3]

No Cellpose weights are reachable here, so the network is a CPSAM with random weights: Cellpose's
width (``--width vit-l``: 1024-dim tokens, 16 heads, its neck) and ``--blocks`` of its 24
transformer blocks (``--blocks 24`` is the full cpsam cost), or ``--width tiny`` (a narrow one,
where per-tile overheads dominate). The volume is random noise (the cost does not depend on it).
Each contender runs in its own process after one warm-up tile, on the same device, in bfloat16
as Cellpose 4 runs (``--fp32`` for float32):

- cellpose: ``CellposeModel.eval(do_3D=True, compute_masks=False)`` on the whole volume
  (normalise with fixed low/high, resize, run_3D over YX/ZY/ZX, resize back);
- zseg whole: :func:`zseg.engine.units.predict_block` on the whole volume (every predict unit in
  this process, combined: the same tiles as Cellpose);
- zseg predict: the predict phase of a planned run with chunks of ``--chunk-shape``: ``zseg predict``
  (the predict units, read from and written to zarr with the reader/writer threads, units sized by
  ``--predict-memory``), then ``zseg predict --stage combine`` (the chunks' flows). The tile ratio
  is its tiles over Cellpose's (1.00: each tile once, whatever the chunk shape); the peak memory is
  the largest predict task's growth (its peak resident memory less the process's size when it
  started: the network and the benchmark's own volume are not counted).

With ``--repeat N`` each contender runs N times and the fastest run is reported (a shared
machine is noisy). Tiles are the tiles of the volume that ran (from the markers for zseg predict); planes are the planes
whose tiles ran (for Cellpose: every plane of the three views); network inputs count the zero tiles
that fill each predict unit's last batch (every network call gets ``--batch-size`` tiles, so a
tile's output does not depend on its unit). Prints a Markdown table with
seconds, planes/s, tiles/s, the speed ratio against cellpose (tiles/s over cellpose's tiles/s,
and wall time), and on CUDA the mean GPU utilisation sampled with ``nvidia-smi``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

WIDTHS = {
    "vit-l": dict(dim=1024, heads=16, neck=256),
    "tiny": dict(dim=32, heads=2, neck=32),
}


class _Utilisation:
    """Mean GPU utilisation (%) over a block, sampled with nvidia-smi every 0.2 s (CUDA only)."""

    def __init__(self, device):
        self.samples: list[float] = []
        self.on = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.index = device.index or 0
        self._stop = threading.Event()

    def _loop(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", str(self.index)], capture_output=True, text=True, timeout=5)
                self.samples.append(float(out.stdout.strip().splitlines()[0]))
            except Exception:
                pass
            self._stop.wait(0.2)

    def __enter__(self):
        if self.on:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.on:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self):
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def _network(a, device):
    import torch

    from zseg.engine.cpsam import cpsam_from_state_dict, cpsam_state_dict

    sd = cpsam_state_dict(depth=a.blocks, **WIDTHS[a.width])
    net = cpsam_from_state_dict(sd).to(device=device, dtype=torch.float32 if a.fp32 else torch.bfloat16)
    return sd, net.eval()


class _Counting:
    """Counts the tiles a network is given (wraps its forward)."""

    def __init__(self, net):
        self.tiles = 0
        self._forward = net.forward

        def forward(x):
            self.tiles += int(x.shape[0])
            return self._forward(x)

        net.forward = forward


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one(name: str, a) -> dict:
    import torch

    from zseg.engine.units import predict_block
    from zseg.engine.views import Geometry
    from zseg.storage.models import select_device

    device = select_device(a.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    shape = tuple(int(s) for s in a.shape.split(","))
    img = np.random.default_rng(0).gamma(2.0, 300.0, size=(1, *shape)).astype(np.uint16)
    lowhigh = np.array([[np.percentile(img, 1), np.percentile(img, 99)]])
    sd, net = _network(a, device)
    with torch.inference_mode():  # warm-up: CUDA context, kernels
        net(torch.zeros(1, 1, net.bsize, net.bsize, device=device, dtype=net.dtype))
    _sync(device)
    counter = _Counting(net)
    geo = Geometry.of(shape, diameter=a.diameter, bsize=net.bsize)
    planes = sum(p for p, _ in geo.view_counts().values())
    times, utils = [], []
    peak = None
    for _ in range(a.repeat):
        counter.tiles = 0
        if name == "cellpose":
            from zseg.engine.cellpose_ref import cellpose_model

            model = cellpose_model(net)
            x = np.moveaxis(img, 0, -1).astype(np.float32)  # eval normalises it in place: a fresh copy each time
            with _Utilisation(device) as util:
                t0 = time.perf_counter()
                model.eval(x, channel_axis=3, z_axis=0, do_3D=True, diameter=a.diameter, batch_size=a.batch_size,
                           normalize={"lowhigh": lowhigh}, bsize=net.bsize, compute_masks=False)
                _sync(device)
                seconds = time.perf_counter() - t0
                tiles = counter.tiles
        elif name == "zseg whole":
            core = tuple(slice(0, s) for s in shape)
            with _Utilisation(device) as util:
                t0 = time.perf_counter()
                _f, _v, stats = predict_block(net, lambda box: img[(slice(None), *box)], core, geo, lowhigh,
                                              batch_size=a.batch_size, device=device, dtype=net.dtype)
                tiles = stats["tiles"]
                _sync(device)
                seconds = time.perf_counter() - t0
        else:
            planes, tiles, seconds, util, peak = _phase(a, img, sd, net, device)
        times.append(seconds)
        utils.append(util.mean)
    best = int(np.argmin(times))
    return {"seconds": times[best], "all_seconds": [round(t, 3) for t in times], "planes": planes,
            "tiles": tiles, "inputs": counter.tiles, "cellpose_tiles": sum(t for _p, t in geo.view_counts().values()),
            "peak_mib": peak, "gpu_util": utils[best], "device": str(device),
            "dtype": str(net.dtype).removeprefix("torch.")}


def _phase(a, img, sd, net, device):
    """The predict phase of a planned run; the network built above is the one the phase loads."""
    import torch

    from zseg.params import build_params
    from zseg.phases.plan import plan
    from zseg.run.entry import run_phase
    from zseg.storage import models
    from zseg.storage.omezarr import write_ome_zarr

    tmp = tempfile.mkdtemp(prefix="zseg-bench-")
    try:
        chunks = tuple(int(s) for s in a.chunk_shape.split(","))
        write_ome_zarr(os.path.join(tmp, "image.ome.zarr"), img[0], axes="zyx", voxel_size=(1.0, 1.0, 1.0),
                       chunks=chunks)
        torch.save(sd, os.path.join(tmp, "net.pt"))
        params = build_params(input=os.path.join(tmp, "image.ome.zarr"), output=os.path.join(tmp, "out"),
                              model=os.path.join(tmp, "net.pt"), diameter=a.diameter, chunk_shape=chunks,
                              batch_size=a.batch_size, use_bfloat16=not a.fp32, device=str(device),
                              skip_empty=False, predict_memory=a.predict_memory)
        run = plan(params)
        run_phase(run.root, "percentiles")
        run_phase(run.root, "percentiles", reduce=True)
        key = (str(os.path.realpath(os.path.join(tmp, "net.pt"))), str(device), not a.fp32)
        models._NETWORKS.clear()
        models._NETWORKS[key] = net  # the warmed-up, counted network: the phase finds it loaded
        with _Utilisation(device) as util:
            t0 = time.perf_counter()
            run_phase(run.root, "predict")
            run_phase(run.root, "predict", stage="combine")
            _sync(device)
            seconds = time.perf_counter() - t0
        markers = [json.load(open(os.path.join(run.work, "predict", f))) for f in os.listdir(os.path.join(run.work, "predict"))]
        # the predict tasks' own growth: peak over the task less the process's size when it started
        # (this process also holds the benchmark's volume, which is not the task's)
        peak = max(m["peak_rss_mib"] - m.get("start_rss_mib", 0) for m in markers)
        return sum(m["planes"] for m in markers), sum(m["tiles"] for m in markers), seconds, util, peak
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="16,128,128")
    ap.add_argument("--diameter", type=float, default=30.0)
    ap.add_argument("--width", choices=list(WIDTHS), default="vit-l")
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk-shape", default=None, help="chunks of the zseg predict contender (default: the volume)")
    ap.add_argument("--predict-memory", type=float, default=12.0, help="GiB per predict task (zseg predict)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per contender; the fastest is reported")
    ap.add_argument("--only", default="cellpose,zseg whole,zseg predict")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.chunk_shape = a.chunk_shape or a.shape
    if a.one:
        print(json.dumps(one(a.one, a)))
        return
    rows = {}
    argv = [a for a in sys.argv[1:]]
    for name in a.only.split(","):
        out = subprocess.run([sys.executable, __file__, *argv, "--one", name], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows.get("cellpose")
    first = next(iter(rows.values()))
    print(f"volume {a.shape}, diameter {a.diameter:g}, CPSAM width {a.width} with {a.blocks} block(s), "
          f"batch {a.batch_size}, {first['dtype']} on {first['device']} "
          f"({os.cpu_count()} cores, {platform.processor() or platform.machine()}); zseg predict chunks {a.chunk_shape}, "
          f"--predict-memory {a.predict_memory:g}\n")
    print("| contender | seconds | tiles | tiles vs cellpose's count | network inputs | tiles/s | tiles/s vs cellpose "
          "| wall vs cellpose | predict task peak MiB (own) | GPU util % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        tps = r["tiles"] / r["seconds"]
        ratio = f"{tps / (base['tiles'] / base['seconds']):.2f}" if base else ""
        wall = f"{base['seconds'] / r['seconds']:.2f}" if base else ""
        util = "" if r["gpu_util"] is None else r["gpu_util"]
        peak = "" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        print(f"| {name} | {r['seconds']:.2f} | {r['tiles']} | {r['tiles'] / r['cellpose_tiles']:.2f} | {r['inputs']} | {tps:.2f} "
              f"| {ratio} | {wall} | {peak} | {util} |")


if __name__ == "__main__":
    main()
