"""Fine-tuning pays: AP of a held-out synthetic volume before and after ``zseg train``.

    python benchmarks/train.py [--noise 0.35] [--epochs 20] [--planes 12] [--bsize 112] [--no-rescale]
                               [--learning-rate LR]

The demo network (``zseg-demo``, trained on ``zseg synth`` cells with 2-20 % noise) segments a
held-out volume of noisier cells (``--noise``), then is fine-tuned with ``zseg train`` on YX
planes of two other volumes of the same kind, and segments the held-out volume again. Both runs
are ``zseg run`` with the same settings; AP is Cellpose's ``metrics.average_precision`` against
the volume's ground truth. Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from cellpose.metrics import average_precision

from zseg.cli import main as zseg
from zseg.engine.synth import synth_cells
from zseg.storage.arrays import open_array
from zseg.storage.omezarr import write_ome_zarr

DIAMETER = 16


def segment(vol_uri: str, out: Path, model: str) -> np.ndarray:
    assert zseg(["run", vol_uri, str(out), "--model", model, "--diameter", str(DIAMETER), "--device", "cpu",
                 "--chunk-shape", "32,128,128"]) == 0
    return np.asarray(open_array(str(out / "labels.zarr" / "0"))[...])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=float, default=0.35)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--planes", type=int, default=12, help="training planes (from two volumes)")
    ap.add_argument("--bsize", type=int, default=112)
    ap.add_argument("--shape", default="32,128,128")
    ap.add_argument("--learning-rate", type=float, default=None, help="default: zseg train's (Cellpose's)")
    ap.add_argument("--no-rescale", action="store_true", help="train without Cellpose 3's rescaling")
    args = ap.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    root = Path(tempfile.mkdtemp(prefix="zseg-train-bench-"))
    data = root / "planes"
    data.mkdir()
    for v, seed in enumerate((11, 12)):
        vol, lab = synth_cells(shape, diameter=DIAMETER, seed=seed, noise=args.noise)
        for k, z in enumerate(np.linspace(2, shape[0] - 3, args.planes // 2).astype(int)):
            tifffile.imwrite(data / f"v{v}_{k}.tif", vol[z].astype(np.float32))
            tifffile.imwrite(data / f"v{v}_{k}_masks.tif", lab[z].astype(np.uint16))
    vol, truth = synth_cells(shape, diameter=DIAMETER, seed=99, noise=args.noise)
    uri = str(root / "heldout.ome.zarr")
    write_ome_zarr(uri, vol, axes="zyx", voxel_size=(1.0, 1.0, 1.0), chunks=shape)
    thresholds = [0.5, 0.75]
    before = average_precision([truth], [segment(uri, root / "before", "zseg-demo")], threshold=thresholds)[0][0]
    t0 = time.perf_counter()
    tuned = root / "tuned.pt"
    extra = (["--learning-rate", str(args.learning_rate)] if args.learning_rate else []) + (
        ["--no-rescale"] if args.no_rescale else [])
    assert zseg(["train", str(data), "--model", "zseg-demo", "--output", str(tuned), "--n-epochs", str(args.epochs),
                 "--bsize", str(args.bsize), "--device", "cpu", *extra]) == 0
    seconds = time.perf_counter() - t0
    after = average_precision([truth], [segment(uri, root / "after", str(tuned))], threshold=thresholds)[0][0]
    rec = json.loads(Path(f"{tuned}.json").read_text())
    print(f"\n| network | AP@0.5 | AP@0.75 |\n|---|---|---|\n| zseg-demo | {before[0]:.3f} | {before[1]:.3f} |\n"
          f"| zseg-demo fine-tuned ({args.epochs} epochs, {args.planes} planes, {seconds:.0f} s) | {after[0]:.3f} | "
          f"{after[1]:.3f} |")
    out = {"noise": args.noise, "epochs": args.epochs, "planes": args.planes, "bsize": args.bsize,
           "learning_rate": rec["learning_rate"], "rescale": rec["rescale"],
           "shape": list(shape), "ap_before": [round(float(x), 4) for x in before],
           "ap_after": [round(float(x), 4) for x in after], "train_seconds": round(seconds, 1),
           "train_loss_first_last": [rec["train_loss"][0], rec["train_loss"][-1]]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
