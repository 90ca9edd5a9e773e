"""Cellpose itself, driven with a zseg network: the reference every agreement test and benchmark
compares zseg with.

Cellpose's ``CellposeModel`` builds its own ViT-L and loads weights by name, which no test can
download here; :func:`cellpose_model` instead hands a network built by zseg (any CPSAM width) to
Cellpose's own ``eval``, so the comparison runs Cellpose's code on the same weights.
"""

from __future__ import annotations

import numpy as np
import torch
from cellpose.models import CellposeModel

from zseg.engine.cpsam import CPSAMNet


class CellposeNet(torch.nn.Module):
    """A zseg network as Cellpose's ``core.run_net`` calls one: ``(flows, style)`` out, and
    ``device``/``dtype`` attributes."""

    def __init__(self, net: CPSAMNet):
        super().__init__()
        self.net = net

    @property
    def device(self):
        return self.net.device

    @property
    def dtype(self):
        return self.net.dtype

    def forward(self, x):
        y = self.net(x)
        return y, torch.zeros((y.shape[0], 256), device=y.device)


def cellpose_model(net: CPSAMNet):
    """Cellpose's ``CellposeModel`` running ``net`` (its constructor would build the full ViT-L
    and load weights by name; everything ``eval`` uses is set here instead)."""
    m = CellposeModel.__new__(CellposeModel)
    m.device = net.device
    m.gpu = net.device.type != "cpu"
    m.backbone = "sam_vitl" if net.bsize == 256 else "zseg-test"  # cellpose refuses bsize != 256 for sam_vitl
    m.net = CellposeNet(net)
    m.pretrained_model = "zseg-test"
    return m


def _normalize(lowhigh, invert: bool):
    """eval's ``normalize``: the given ``lowhigh`` (and ``invert``), or none for pre-normalised input.

    Always a dict with ``normalize`` set: Cellpose 4's eval stores a bool ``normalize`` into its
    module-level defaults, so one ``normalize=False`` call would switch normalisation off for
    every later call that does not say otherwise."""
    if lowhigh is None:
        return {"normalize": False}
    return {"normalize": True, "lowhigh": np.asarray(lowhigh, np.float64), "invert": invert}


def cellpose_eval(net: CPSAMNet, image: np.ndarray, lowhigh, *, diameter: float, anisotropy: float = 1.0,
                  compute_masks: bool = False, invert: bool = False, **kw):
    """Cellpose's own 3D run: ``(masks, flows (4, Z, Y, X) float32)`` for a ``(C, Z, Y, X)`` image,
    normalised with ``lowhigh`` (None: the image is already normalised)."""
    m = cellpose_model(net)
    x = np.ascontiguousarray(np.moveaxis(np.asarray(image, np.float32), 0, -1))  # eval normalises in place
    masks, flows, _ = m.eval(
        x, channel_axis=3, z_axis=0, do_3D=True, diameter=diameter, anisotropy=anisotropy,
        normalize=_normalize(lowhigh, invert), bsize=net.bsize, compute_masks=compute_masks, **kw,
    )
    return masks, np.concatenate([flows[1], flows[2][None]]).astype(np.float32)


def cellpose_eval_2d(net: CPSAMNet, image: np.ndarray, lowhigh, *, diameter: float, compute_masks: bool = False,
                     invert: bool = False, **kw):
    """Cellpose's own 2D run: ``(masks, flows (3, Y, X) float32 = dY, dX, cellprob)`` for a
    ``(C, Y, X)`` image."""
    m = cellpose_model(net)
    x = np.ascontiguousarray(np.moveaxis(np.asarray(image, np.float32), 0, -1))  # eval normalises in place
    masks, flows, _ = m.eval(
        x, channel_axis=2, do_3D=False, diameter=diameter, normalize=_normalize(lowhigh, invert),
        bsize=net.bsize, compute_masks=compute_masks, **kw,
    )
    return masks, np.concatenate([flows[1], flows[2][None]]).astype(np.float32)


def cellpose_eval_stitch(net: CPSAMNet, image: np.ndarray, lowhigh, *, diameter: float, stitch_threshold: float,
                         invert: bool = False, **kw):
    """Cellpose's own stitch mode (``do_3D=False``, ``stitch_threshold``): ``(masks (Z, Y, X), flows
    (3, Z, Y, X) float32 = dY, dX, cellprob)`` for a ``(C, Z, Y, X)`` image."""
    m = cellpose_model(net)
    x = np.ascontiguousarray(np.moveaxis(np.asarray(image, np.float32), 0, -1))  # eval normalises in place
    masks, flows, _ = m.eval(
        x, channel_axis=3, z_axis=0, do_3D=False, stitch_threshold=stitch_threshold, diameter=diameter,
        normalize=_normalize(lowhigh, invert), bsize=net.bsize, **kw,
    )
    return masks, np.concatenate([flows[1], flows[2][None]]).astype(np.float32)
