"""Train zseg's demo network: a small Cellpose 3 model for ``zseg synth`` volumes.

    python scripts/train_demo_model.py python/zseg/data/zseg_demo_cp3.pt

It makes synthetic volumes of touching cells (:func:`zseg.engine.synth.synth_cells`, diameters
13-20 voxels, bright interiors or bright membranes, noise 2-20 %), cuts them into 2D planes
along all three axes (the network sees YX, ZY and ZX planes in a 3D run), and trains
:class:`zseg.engine.cp3.CP3Net` from scratch on those planes the way Cellpose 3 trains:

* input: the volume normalised by its 1st and 99th percentiles (as zseg's global
  normalisation), as channel 0; channel 1 (the optional nucleus channel) is zeros;
* targets: 5 x Cellpose's unit flow field of each plane's labels
  (:func:`zseg.engine.synth.flows_from_labels`, Cellpose's own ``masks_to_flows``) and
  the foreground;
* loss: Cellpose 3's ``MSE(flows) / 2 + BCE-with-logits(cell probability)``;
* augmentation: the 8 flips/transposes of the square (flow vectors transformed with them);
* AdamW with a linear warm-up and a cosine decay of the learning rate.

``diam_mean`` (and ``diam_labels``) is 16: run it with ``--diameter`` equal to the diameter
given to ``zseg synth`` and the planes are seen at the scale the network was trained at.

The file is the network's ``state_dict`` with Cellpose 3's tensor names (what Cellpose 3's
``CPnet.save_model`` writes), so zseg loads it strictly like any other Cellpose 3 model.
The defaults made the shipped ``python/zseg/data/zseg_demo_cp3.pt`` (nbase [2, 12, 24, 48, 96],
932,123 parameters, 3.9 MB) in 25 minutes on 2 CPU threads; the ``.json`` written beside the
network records the settings and the loss curve. The result depends only on ``--seed`` up to the
run-to-run jitter of threaded float sums.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from zseg.engine.cp3 import CP3Net
from zseg.engine.synth import flows_from_labels, synth_cells
from zseg.engine.training import seg_loss

DIAM_MEAN = 16.0


def planes(volume: np.ndarray, labels: np.ndarray, rng: np.random.Generator, count: int):
    """``count`` random (image, target) planes along random axes of one volume.

    target: (3, H, W) float32 = 5 x flow along the plane's first axis, along its second axis,
    foreground (1 inside a cell, else 0)."""
    out = []
    for _ in range(count):
        axis = int(rng.integers(0, 3))
        i = int(rng.integers(0, volume.shape[axis]))
        img = np.take(volume, i, axis=axis)
        lab = np.take(labels, i, axis=axis)
        flows = flows_from_labels(lab)  # (3, H, W): 5 x dY, 5 x dX, cellprob logit
        target = np.stack([flows[0], flows[1], (lab > 0).astype(np.float32)])
        out.append((img.astype(np.float32), target))
    return out


def make_dataset(n_volumes: int, shape: int, planes_per_volume: int, seed: int):
    rng = np.random.default_rng(seed)
    data = []
    for v in range(n_volumes):
        diameter = float(rng.uniform(13.0, 20.0))
        membrane = bool(rng.random() < 1 / 3)
        noise = float(rng.uniform(0.02, 0.2))
        image, labels = synth_cells((shape,) * 3, diameter=diameter, seed=seed * 1000 + v,
                                    membrane=membrane, noise=noise)
        low, high = np.percentile(image, [1.0, 99.0])
        volume = (image.astype(np.float32) - np.float32(low)) / np.float32(high - low)
        data.extend(planes(volume, labels, rng, planes_per_volume))
    images = np.stack([d[0] for d in data])[:, None]
    targets = np.stack([d[1] for d in data])
    return torch.from_numpy(images), torch.from_numpy(targets)


def augment(x: torch.Tensor, t: torch.Tensor, rng: np.random.Generator):
    """One of the 8 symmetries of the square, applied to images and flow targets alike."""
    if rng.random() < 0.5:  # flip the first axis: its flow changes sign
        x, t = x.flip(-2), t.flip(-2)
        t = torch.cat([-t[:, :1], t[:, 1:]], 1)
    if rng.random() < 0.5:  # flip the second axis
        x, t = x.flip(-1), t.flip(-1)
        t = torch.cat([t[:, :1], -t[:, 1:2], t[:, 2:]], 1)
    if rng.random() < 0.5:  # transpose: the two flows swap
        x, t = x.transpose(-1, -2), t.transpose(-1, -2)
        t = torch.cat([t[:, 1:2], t[:, :1], t[:, 2:]], 1)
    return x, t


def loss_fn(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Cellpose's segmentation loss (:func:`zseg.engine.training.seg_loss`) of targets
    ``t`` = 5 x flow Y, 5 x flow X, foreground."""
    return seg_loss(y, torch.cat([t[:, 2:3], t[:, :2] / 5], 1))


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    images, targets = make_dataset(args.volumes, args.size, args.planes, args.seed)
    val_images, val_targets = make_dataset(2, args.size, 64, args.seed + 10_000)
    print(f"data: {len(images)} training planes, {len(val_images)} validation planes "
          f"({time.time() - t0:.0f} s)", flush=True)

    net = CP3Net([2, *args.nbase], diam_mean=DIAM_MEAN)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-5)
    warm = max(1, args.steps // 30)

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))

    def validate():
        net.eval()
        with torch.no_grad():
            losses = [loss_fn(net(val_images[i:i + 32])[0], val_targets[i:i + 32]).item()
                      for i in range(0, len(val_images), 32)]
        net.train()
        return float(np.mean(losses))

    net.train()
    history = []
    t1 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.from_numpy(rng.integers(0, len(images), args.batch))
        x, t = augment(images[idx], targets[idx], rng)
        y, _ = net(x)
        loss = loss_fn(y, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % args.report == 0 or step + 1 == args.steps:
            val = validate()
            history.append({"step": step + 1, "train_loss": round(loss.item(), 4), "val_loss": round(val, 4)})
            print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f}, validation {val:.4f} "
                  f"({time.time() - t1:.0f} s)", flush=True)
    net.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".partial")
    torch.save(net.state_dict(), tmp)
    tmp.replace(args.out)
    return {"nbase": net.nbase, "diam_mean": DIAM_MEAN, "steps": args.steps, "batch": args.batch,
            "volumes": args.volumes, "size": args.size, "planes_per_volume": args.planes,
            "lr": args.lr, "seed": args.seed, "seconds": round(time.time() - t0),
            "parameters": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "history": history}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the .pt file to write")
    p.add_argument("--nbase", type=lambda s: [int(v) for v in s.split(",")], default=[12, 24, 48, 96],
                   help="channels of the encoder levels (after the 2 input channels)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--volumes", type=int, default=16, help="synthetic training volumes")
    p.add_argument("--size", type=int, default=96, help="side of each (cubic) training volume")
    p.add_argument("--planes", type=int, default=96, help="random planes taken from each volume")
    p.add_argument("--report", type=int, default=500, help="steps between validation reports")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    info = train(args)
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
