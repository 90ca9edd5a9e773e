"""Make tests/fixtures/cp3: a small Cellpose 3 network and Cellpose 3.1.1.3's outputs for it.

Run it in a separate environment that has Cellpose 3 (zseg does not depend on Cellpose)::

    python3 -m venv /tmp/cp3 && /tmp/cp3/bin/pip install torch==2.13.0 cellpose==3.1.1.3
    /tmp/cp3/bin/python scripts/make_cp3_fixture.py tests/fixtures/cp3

It writes
  net.pt          -- a CPnet of nbase [2, 4, 8, 16] with random weights (batch-norm statistics
                     included), diam_mean 30, diam_labels 27.5, saved by Cellpose's own
                     ``CPnet.save_model``: its flows are arbitrary, which is all a flow-equality
                     test needs;
  gradient_net.pt -- a CPnet of the same sizes with weights set by hand (make_gradient_net)
                     whose flows make real cells of blobs, so comparing masks measures something;
  cp3.npz         -- a 2D image and a 3D volume of bright blobs (float32, already in 0..1, run
                     with ``lowhigh [0, 1]`` so normalisation is the identity) and what
                     ``CellposeModel.eval`` of Cellpose 3.1.1.3 returns for them: flows ``dP``,
                     ``cellprob`` of both networks in 2D (prefix ``g`` for gradient_net), the
                     3D flows of net.pt, and the masks of gradient_net (2D; 3D on ``vol8``, a
                     larger volume stored as uint8, input ``vol8 / 255`` in float32) (2D:
                     diameter 30; 3D: diameter 24, anisotropy 1.5, so the rescale and the Z
                     resize run);
                     ``odP3``/``ocellprob3``: the 3D flows of net.pt with gradient_net.pt as
                     Cellpose 3's ortho network (``net_ortho``: ZY and ZX views);
                     ``adP3``/``acellprob3``: net.pt with ``augment=True`` on ``img3[:8, :20, :20]``;
  cp3.json        -- versions, parameters and cell counts;
  cp3_bsize.npz   -- ``dP3``/``cellprob3``: the 3D flows of net.pt on ``vol8[:16, :56, :72] / 255`` with
                     ``bsize=64`` (several tiles per axis), for zseg's --bsize (see
                     :func:`bsize_fixture`: eval's 3D run with ``run_3D`` given the bsize). Written last, from
                     the net.pt already there: ``--bsize-only`` adds it to an existing fixture.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import cellpose
import numpy as np
import torch
from cellpose import models, resnet_torch
from scipy import ndimage as ndi

NBASE = [2, 4, 8, 16]
K = 10.0  # offset that keeps signals positive through the ReLUs of the hand-set network


class SmallCPnet(resnet_torch.CPnet):
    """Cellpose's CPnet, its style vector zero-padded to the 256 values ``core.run_net``
    allocates for it (that size is fixed there); the flows are Cellpose's own."""

    def forward(self, data):
        y, style, t0 = super().forward(data)
        return y, torch.nn.functional.pad(style, (0, 256 - style.shape[1])), t0


def blobs(shape, spacing, sigma, seed):
    rng = np.random.default_rng(seed)
    img = np.zeros(shape, np.float32)
    n = int(np.prod([s / spacing for s in shape])) + 1
    for _ in range(n):
        img[tuple(int(rng.integers(0, s)) for s in shape)] = 1.0
    img = ndi.gaussian_filter(img, sigma)
    img /= img.max()
    return (img + 0.02 * rng.random(shape)).astype(np.float32).clip(0, 1)


def make_net(seed=0):
    torch.manual_seed(seed)
    net = SmallCPnet(NBASE, 3, sz=3, mkldnn=False, max_pool=True, diam_mean=30.0)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn_like(t))
            elif name.endswith("running_var"):
                t.copy_(0.5 + torch.rand_like(t))
            elif name.endswith(".weight") and t.ndim == 1:  # batch-norm scale
                t.copy_(1.0 + 0.2 * torch.randn_like(t))
            elif name.endswith(".bias") and t.ndim == 1 and "full" not in name:
                t.copy_(0.1 * torch.randn_like(t))
        net.output[2].bias[2] += 1.0  # some foreground
    net.diam_labels.data[:] = 27.5
    return net.eval()


def make_gradient_net(flow_gain=20.0, prob_gain=20.0, prob_offset=5.0):
    """A CPnet whose weights are set by hand so that its output is cell-like for smooth bright
    blobs: flows = ``flow_gain`` x the central-difference gradient of the image (pointing
    to each blob's peak), cellprob = ``prob_gain * image - prob_offset``. Only a few weights
    carry this: level 0's projection copies the image (which is >= 0, so the ReLUs pass it);
    the first decoder level's styled convolution takes the gradient from the skip connection
    (plus K, to stay positive); the output convolution removes K. Everything else is zero,
    batch norms are identities, and the deepest level gets a constant so the style vector is
    defined (its weights are zero)."""
    net = SmallCPnet(NBASE, 3, sz=3, mkldnn=False, max_pool=True, diam_mean=30.0)
    sd = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] += 1.0 - 1e-5  # with eps 1e-5: divide by 1
        elif k.endswith(".weight") and sd[k].ndim == 1:
            sd[k] += 1.0
    sd["diam_mean"] += 30.0
    sd["diam_labels"] += 30.0
    sd["downsample.down.res_down_0.proj.1.weight"][0, 0, 0, 0] = 1.0
    last = len(NBASE) - 2
    sd[f"downsample.down.res_down_{last}.proj.1.bias"][0] = 1.0
    w = sd["upsample.up.res_up_0.conv.conv_1.conv.2.weight"]  # (out, in, 3, 3), correlation
    b = sd["upsample.up.res_up_0.conv.conv_1.conv.2.bias"]
    w[0, 0, 2, 1], w[0, 0, 0, 1] = flow_gain / 2, -flow_gain / 2
    w[1, 0, 1, 2], w[1, 0, 1, 0] = flow_gain / 2, -flow_gain / 2
    w[2, 0, 1, 1] = prob_gain
    b[:3] = K
    ow, ob = sd["output.2.weight"], sd["output.2.bias"]
    for c in range(3):
        ow[c, c, 0, 0] = 1.0
    ob[:] = -K
    ob[2] -= prob_offset
    net.load_state_dict(sd)
    return net.eval()


def cellpose_model(path: Path):
    """Cellpose 3.1.1.3's CellposeModel running the CPnet saved at ``path``."""
    model = models.CellposeModel(gpu=False, pretrained_model=False, model_type=None, nchan=2,
                                 mkldnn=False, diam_mean=30.0)
    net = SmallCPnet(NBASE, 3, sz=3, mkldnn=False, max_pool=True, diam_mean=30.0)
    net.load_model(str(path), device=torch.device("cpu"))
    model.net = net.eval()
    model.net_ortho = None
    model.diam_mean = float(net.diam_mean.item())
    model.diam_labels = float(net.diam_labels.item())
    return model


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    make_net().save_model(str(out / "net.pt"))
    make_gradient_net().save_model(str(out / "gradient_net.pt"))
    img2 = blobs((48, 64), 10, 2.5, 1)
    img3 = blobs((12, 32, 32), 8, 2.0, 2)
    norm = {"lowhigh": [0.0, 1.0], "normalize": True}
    params2 = dict(channels=[0, 0], diameter=30.0, normalize=norm, flow_threshold=0.0, niter=200,
                   cellprob_threshold=0.0, min_size=-1)
    params3 = dict(channels=[0, 0], diameter=24.0, anisotropy=1.5, do_3D=True, normalize=dict(norm),
                   niter=200, cellprob_threshold=0.0, min_size=-1, z_axis=0)
    # a larger volume for the masks (enough cells that AP measures something), stored as uint8
    vol8 = np.round(blobs((24, 80, 80), 7, 2.0, 3) * 255).astype(np.uint8)
    vol = vol8.astype(np.float32) / np.float32(255)
    arrays, cells = {}, {}
    for name, path in (("", "net.pt"), ("g", "gradient_net.pt")):
        model = cellpose_model(out / path)
        m2, f2, _ = model.eval(img2, **params2)
        m3, f3, _ = model.eval(vol if name else img3, **params3)
        arrays.update({f"{name}dP2": f2[1].astype(np.float32), f"{name}cellprob2": f2[2].astype(np.float32)})
        if not name:
            arrays.update({"dP3": f3[1].astype(np.float32), "cellprob3": f3[2].astype(np.float32)})
        if name:  # masks only of the network that makes cells
            arrays.update({f"{name}masks2": m2.astype(np.uint16), f"{name}masks3": m3.astype(np.uint16)})
            cells = {"cells2": int(m2.max()), "cells3": int(m3.max())}
    # Cellpose 3's pretrained_model_ortho: net.pt on the YX planes, gradient_net.pt on ZY and ZX
    model = cellpose_model(out / "net.pt")
    model.net_ortho = cellpose_model(out / "gradient_net.pt").net
    _, f3, _ = model.eval(img3, **params3)
    arrays.update({"odP3": f3[1].astype(np.float32), "ocellprob3": f3[2].astype(np.float32)})
    # test-time augmentation (flipped half-overlapping tiles; short planes extended to a tile)
    model = cellpose_model(out / "net.pt")
    _, f3, _ = model.eval(img3[:8, :20, :20], augment=True, **params3)
    arrays.update({"adP3": f3[1].astype(np.float32), "acellprob3": f3[2].astype(np.float32)})
    np.savez_compressed(out / "cp3.npz", img2=img2, img3=img3, vol8=vol8, **arrays)
    meta = {"cellpose": cellpose.version, "torch": torch.__version__, "nbase": NBASE,
            "params2": {k: v for k, v in params2.items()}, "params3": {k: v for k, v in params3.items()},
            **cells}
    (out / "cp3.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    print(json.dumps(meta, default=str))
    bsize_fixture(out, params3)


def bsize_fixture(out: Path, params3: dict) -> None:
    """net.pt's 3D flows with 64-pixel tiles.

    Cellpose 3.1.1.3's ``eval`` honours ``bsize`` in 2D only: its 3D path calls ``core.run_3D``
    without it, so every view runs 224-pixel tiles whatever ``bsize`` says. ``run_3D`` itself
    takes ``bsize`` (and hands it to ``run_net`` for each view); the reference is eval's 3D run
    with that argument passed on.
    """
    vol = np.asarray(np.load(out / "cp3.npz")["vol8"])[:16, :56, :72].astype(np.float32) / np.float32(255)
    run_3d = models.run_3D
    models.run_3D = functools.partial(run_3d, bsize=64)
    try:
        _, f3, _ = cellpose_model(out / "net.pt").eval(vol, bsize=64,
                                                       **{**params3, "normalize": dict(params3["normalize"])})
    finally:
        models.run_3D = run_3d
    np.savez_compressed(out / "cp3_bsize.npz", dP3=f3[1].astype(np.float32), cellprob3=f3[2].astype(np.float32),
                        bsize=np.array(64))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--bsize-only"]
    target = Path(args[0] if args else "tests/fixtures/cp3")
    if "--bsize-only" in sys.argv:
        bsize_fixture(target, json.loads((target / "cp3.json").read_text())["params3"])
    else:
        main(target)
