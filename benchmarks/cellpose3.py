"""zseg against Cellpose 3.1.1.3 itself, end to end, with a trained Cellpose 3 network.

Cellpose 3 cannot be installed beside Cellpose 4 (zseg's dependency), so it runs in its own
environment, given with ``--cellpose3-python``::

    python3 -m venv /tmp/cp3 && /tmp/cp3/bin/pip install torch==2.13.0 cellpose==3.1.1.3
    python benchmarks/cellpose3.py --cellpose3-python /tmp/cp3/bin/python \\
        [--model zseg-demo] [--shape 48,128,128] [--diameter 16] [--seeds 0,1,2]

It makes a ``zseg synth`` volume, runs ``CellposeModel.eval(do_3D=True)`` of Cellpose 3 on the
whole volume (that process: ``--worker``) and ``zseg run`` in chunks on the same volume, network
and parameters (diameter, percentiles 1/99, niter ``200 / rescale``, cellprob 0, min_size 15),
each on the CPU, for each seed and stain (bright interiors, bright membranes), and prints a
table: the agreement of the two label images (AP at IoU 0.5/0.75/0.9 of zseg against Cellpose 3),
each one's AP against the synthetic ground truth, and both wall times (zseg's includes every
phase and output: percentiles, table, pyramid, QC page).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(image_npy: str, model_path: str, diameter: float, out_npy: str) -> None:
    """Runs in the Cellpose 3 environment: Cellpose 3's own eval of the network at ``model_path``."""
    import numpy as np
    import torch
    from cellpose import models, resnet_torch

    sd = torch.load(model_path, map_location="cpu", weights_only=True)
    levels = sorted({int(k.split(".")[2].rsplit("_", 1)[1]) for k in sd if k.startswith("downsample.down.res_down_")})
    nbase = [int(sd["downsample.down.res_down_0.conv.conv_0.2.weight"].shape[1])]
    nbase += [int(sd[f"downsample.down.res_down_{i}.conv.conv_0.2.weight"].shape[0]) for i in levels]

    class Net(resnet_torch.CPnet):
        """CPnet with its style vector zero-padded to the 256 values Cellpose 3's run_net
        allocates for it (a fixed size there); the flows are Cellpose 3's own."""

        def forward(self, data):
            y, style, t0 = super().forward(data)
            return y, torch.nn.functional.pad(style, (0, 256 - style.shape[1])), t0

    diam_mean = float(sd["diam_mean"].reshape(()))
    model = models.CellposeModel(gpu=False, pretrained_model=False, model_type=None, nchan=nbase[0],
                                 mkldnn=False, diam_mean=diam_mean)
    net = Net(nbase, 3, sz=3, mkldnn=False, max_pool=True, diam_mean=diam_mean)
    net.load_model(model_path, device=torch.device("cpu"))
    model.net, model.net_ortho = net.eval(), None
    model.diam_mean, model.diam_labels = diam_mean, float(sd["diam_labels"].reshape(()))
    image = np.load(image_npy)
    t0 = time.perf_counter()
    masks, _, _ = model.eval(image, channels=[0, 0], diameter=diameter, do_3D=True, z_axis=0, anisotropy=1.0,
                             cellprob_threshold=0.0, min_size=15)
    seconds = time.perf_counter() - t0
    np.save(out_npy, masks.astype(np.uint32))
    print(json.dumps({"seconds": seconds, "cells": int(masks.max()), "nbase": nbase,
                      "cellpose": __import__("cellpose").version}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cellpose3-python", required=True, help="python of an environment with cellpose==3.1.1.3")
    p.add_argument("--model", default="zseg-demo")
    p.add_argument("--shape", default="48,128,128")
    p.add_argument("--diameter", type=float, default=16.0)
    p.add_argument("--stains", default="interior,membrane", help="interior, membrane or both")
    p.add_argument("--seeds", default="0", help="zseg synth seeds, e.g. 0,1,2")
    p.add_argument("--chunk-shape", default="32,64,64")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--flows-dtype", default="float16", help="zseg's flow store: float16 (default) or float32")
    args = p.parse_args()

    import contextlib
    import io

    import numpy as np
    import zarr
    from cellpose.metrics import average_precision

    from zseg.cli import main as zseg
    from zseg.engine.synth import synth_cells
    from zseg.storage import models
    from zseg.storage.omezarr import write_ome_zarr

    shape = tuple(int(v) for v in args.shape.split(","))
    model_path = models.resolve_model(args.model, download=False)

    def ap(ref, ours):
        return average_precision([ref.astype(np.int64)], [ours.astype(np.int64)], threshold=[0.5, 0.75, 0.9])[0][0]

    print(f"volume {shape}, diameter {args.diameter:g}; network {args.model}; CPU; zseg run in chunks "
          f"{args.chunk_shape} with {args.workers} workers (all outputs, {args.flows_dtype} flows), "
          "Cellpose 3 on the whole volume")
    print("| stain | seed | cells (truth / Cellpose 3 / zseg) | zseg vs Cellpose 3, AP@0.5 / 0.75 / 0.9 | "
          "AP@0.5 vs truth (Cellpose 3 / zseg) | seconds (Cellpose 3 / zseg) |")
    print("|---|---|---|---|---|---|")
    for stain in args.stains.split(","):
        for seed in (int(v) for v in args.seeds.split(",")):
            image, truth = synth_cells(shape, diameter=args.diameter, seed=seed, membrane=stain == "membrane")
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                np.save(tmp / "image.npy", image)
                proc = subprocess.run([args.cellpose3_python, __file__, "--worker", str(tmp / "image.npy"),
                                       str(model_path), str(args.diameter), str(tmp / "cp3.npy")],
                                      capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"Cellpose 3 failed:\n{proc.stderr[-3000:]}")
                cp3 = json.loads(proc.stdout.strip().splitlines()[-1])
                cp3_masks = np.load(tmp / "cp3.npy")
                uri = str(tmp / "image.ome.zarr")
                write_ome_zarr(uri, image, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=(32, 64, 64))
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    rc = zseg(["run", uri, str(tmp / "out"), "--model", str(model_path), "--diameter",
                               str(args.diameter), "--chunk-shape", args.chunk_shape, "--workers",
                               str(args.workers), "--device", "cpu", "--flows-dtype", args.flows_dtype])
                seconds = time.perf_counter() - t0
                if rc:
                    sys.exit(f"zseg run failed ({rc})")
                labels = np.asarray(zarr.open_array(str(tmp / "out" / "labels.zarr" / "0"), mode="r")[...])
            agree = " / ".join(f"{v:.3f}" for v in ap(cp3_masks, labels))
            print(f"| {stain} | {seed} | {int(truth.max())} / {cp3['cells']} / {int(labels.max())} | {agree} | "
                  f"{ap(truth, cp3_masks)[0]:.3f} / {ap(truth, labels)[0]:.3f} | {cp3['seconds']:.1f} / {seconds:.1f} |",
                  flush=True)
    print(f"Cellpose {cp3['cellpose']}, network nbase {cp3['nbase']}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
    else:
        main()
