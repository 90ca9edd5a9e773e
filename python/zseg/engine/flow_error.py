"""Cellpose's 2D flow error, per cell, so that ``flow_threshold`` can be decided chunk by chunk.

Cellpose's 2D ``eval`` removes every mask whose *flow error* exceeds ``flow_threshold`` (0.4):
the mean, over the mask's pixels, of the squared difference between the network's flows / 5 and
the flows of the mask itself (``cellpose.dynamics.flow_error``). The mask's flows come from heat
diffusion inside each mask from its centre (``masks_to_flows_gpu``), written here from that
description with the same arithmetic:

- the centre of a mask is its mean pixel, rounded (half to even) in coordinates relative to the
  mask's bounding box, or when that pixel is not in the mask the mask pixel nearest to it (the
  first in C order among equals);
- ``niter`` Jacobi steps: add 1 at every centre, then each mask pixel takes the sum of the
  values of its 3x3 neighbourhood that lie in the same mask (in Cellpose's neighbour order)
  divided by 9. Cellpose takes ``niter`` = 2 x the largest (height + width + 2) of any mask's
  bounding box in the image, and float32 when the padded image has more than 4e7 pixels, float64
  otherwise: both are properties of the whole image, which a chunked run gets from its cells'
  bounding boxes and from the slide's shape (:func:`diffusion_settings`);
- the flow at a pixel is (T below - T above, T right - T left) - the neighbours' values whatever
  mask they belong to - normalised to unit length in float64.

Diffusion never crosses masks, but the gradient at a mask's edge reads its neighbours' values:
a cell's error depends on its own pixels and on the cells that touch it, nothing else. So a chunk
decides the error of every cell that, with the cells touching it, is whole in its block
(``docs/architecture.md``, "Multiplex slides").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from zseg.engine import blocks as B

__all__ = ["diffusion_settings", "mask_extents", "mask_flows", "flow_errors", "block_flow_errors"]

#: Cellpose switches its diffusion to float32 above this many pixels (of the padded image).
FLOAT32_ABOVE = 4e7


def diffusion_settings(slide_shape: Sequence[int], max_extent: int) -> tuple[int, bool]:
    """Cellpose's ``(niter, float32)`` for an image of ``slide_shape`` whose largest mask extent
    (bounding-box height + width + 2, :func:`mask_extents`) is ``max_extent``."""
    padded = float(np.prod([int(s) + 2 for s in slide_shape]))
    return 2 * int(max_extent), padded > FLOAT32_ABOVE


def mask_extents(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, extents)``: each label's bounding-box height + width + 2 (Cellpose's ``ext``).
    A chunked run takes the same from its per-cell boxes: ``boxes.extents() + 2``."""
    boxes = B.label_boxes(masks)
    return boxes.ids, boxes.extents() + 2


def _centres(masks: np.ndarray, boxes: B.Boxes) -> np.ndarray:
    """Cellpose's centre of each mask ``(K, 2)`` in block coordinates."""
    out = np.empty((len(boxes.ids), 2), np.int64)
    for k, (lab, (y0, x0), (y1, x1)) in enumerate(zip(boxes.ids.tolist(), boxes.start.tolist(), boxes.stop.tolist())):
        yi, xi = np.nonzero(masks[y0:y1, x0:x1] == lab)
        ym = int(np.round(yi.sum() / len(yi)))
        xm = int(np.round(xi.sum() / len(xi)))
        if not ((yi == ym) & (xi == xm)).any():
            i = int(((xi - xm) ** 2 + (yi - ym) ** 2).argmin())
            ym, xm = int(yi[i]), int(xi[i])
        out[k] = (ym + y0, xm + x0)
    return out


@njit(cache=True)
def _diffuse(lab, pix, meds, niter, T, new):  # pragma: no cover - numba
    W = lab.shape[1]
    flat = lab.ravel()
    offs = np.array([0, -W, W, -1, 1, -W - 1, -W + 1, W - 1, W + 1])
    for _ in range(niter):
        for m in meds:
            T[m] += 1
        for k in range(len(pix)):
            p = pix[k]
            own = flat[p]
            s = T[p] * 0  # Cellpose multiplies by the neighbour mask and sums the nine terms in order
            for i in range(9):
                q = p + offs[i]
                if flat[q] == own:
                    s += T[q]
            new[k] = s / 9
        for k in range(len(pix)):
            T[pix[k]] = new[k]


def mask_flows(masks: np.ndarray, *, niter: int, float32: bool = False, boxes: B.Boxes | None = None) -> np.ndarray:
    """The unit flows ``(2, Y, X)`` float64 (dY, dX) of the masks, as ``masks_to_flows_gpu``.

    Parameters
    ----------
    masks : (Y, X) integer ndarray, any positive IDs
    niter : int
        Diffusion steps (the whole image's: :func:`diffusion_settings`).
    float32 : bool
        Diffuse in float32 (Cellpose does above 4e7 pixels) instead of float64.
    boxes : the masks' boxes in this array (:func:`zseg.engine.blocks.label_boxes`), when the
        caller has them already
    """
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype.kind not in "iu":
        raise ValueError(f"masks must be a 2D integer array, got {masks.ndim}D {masks.dtype}")
    if int(niter) < 0:
        raise ValueError(f"niter {niter} must be >= 0")
    out = np.zeros((2, *masks.shape))
    boxes = B.label_boxes(masks) if boxes is None else boxes
    if len(boxes.ids) == 0:
        return out
    lab = np.pad(masks.astype(np.int64), 1)
    W = lab.shape[1]
    cen = _centres(masks, boxes) + 1
    pix = np.flatnonzero(lab)
    dtype = np.float32 if float32 else np.float64
    T = np.zeros(lab.size, dtype)
    _diffuse(lab, pix, (cen[:, 0] * W + cen[:, 1]).astype(np.int64), int(niter), T, np.zeros(len(pix), dtype))
    dy = (T[pix + W] - T[pix - W]).astype(np.float64)
    dx = (T[pix + 1] - T[pix - 1]).astype(np.float64)
    mu = np.stack([dy, dx])
    mu /= 1e-60 + (mu**2).sum(axis=0) ** 0.5
    y, x = np.divmod(pix, W)
    out[:, y - 1, x - 1] = mu
    return out


def flow_errors(masks: np.ndarray, flows: np.ndarray, *, niter: int, float32: bool = False,
                labels: np.ndarray | None = None, boxes: B.Boxes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cellpose's flow error of each mask: mean over its pixels of |flows / 5 - mask flows|².

    Parameters
    ----------
    masks : (Y, X) integer ndarray
    flows : (2, Y, X) ndarray
        The network's dY, dX (network scale, as Cellpose's ``dP``).
    niter, float32 : the whole image's diffusion settings (:func:`diffusion_settings`)
    labels : optional, the labels to report (default: every label of ``masks``)
    boxes : the masks' boxes in this array (:func:`zseg.engine.blocks.label_boxes`), when the
        caller has them already

    Returns
    -------
    labels : (K,) uint64, ascending
    errors : (K,) float64
    """
    masks = np.asarray(masks)
    flows = np.asarray(flows)
    if flows.shape != (2, *masks.shape):
        raise ValueError(f"flows {flows.shape} must be (2, *masks.shape) with masks {masks.shape}")
    boxes = B.label_boxes(masks) if boxes is None else boxes
    mu = mask_flows(masks, niter=niter, float32=float32, boxes=boxes)
    net = flows.astype(np.float32, copy=False) / np.float32(5.0)
    err = ((mu - net) ** 2).sum(axis=0)
    ids = boxes.ids
    want = ids if labels is None else np.intersect1d(ids, np.asarray(labels).astype(ids.dtype))
    rows = np.searchsorted(ids, want)
    out = np.empty(len(want))
    for k, r in enumerate(rows.tolist()):
        (y0, x0), (y1, x1) = boxes.start[r].tolist(), boxes.stop[r].tolist()
        out[k] = err[y0:y1, x0:x1][masks[y0:y1, x0:x1] == ids[r]].mean()
    return want.astype(np.uint64), out


def block_flow_errors(masks: np.ndarray, flows: np.ndarray, *, origin, core, slide_shape, niter: int,
                      float32: bool, boxes: B.Boxes, owned: np.ndarray | None = None) -> dict:
    """The flow errors of the cells a chunk owns and can decide, from its block.

    ``boxes``: the bounding boxes in the slide of every label present in the block and of every
    cell whose box starts in the core (:mod:`zseg.engine.blocks`). A cell is decided by the chunk
    whose core holds its box's first corner, when neither it nor a cell touching it
    (4-neighbours) reaches beyond the block or onto an open face: then its diffusion and the
    values its edge reads are the whole image's.

    ``owned``: the cells this chunk decides, when the run assigns cells to chunks another way
    (a run's cells belong to the chunk holding their seed); default: by box corner as above.
    Every owned cell needs a box.

    Returns ``{"labels": (K,) uint64, "errors": (K,) float64, "undecided": int}`` with
    ``undecided`` the owned cells that could not be decided here.
    """
    masks = np.asarray(masks)
    B.check_block(origin, masks.shape, slide_shape)
    open_ = B.open_labels(masks, boxes, origin=origin, slide_shape=slide_shape)
    a, b = B.touching(masks)
    unsure = np.union1d(open_, np.union1d(a[np.isin(b, open_)], b[np.isin(a, open_)]))
    if owned is None:
        mine = B.owned(boxes.ids, boxes, origin=origin, core=core)
    else:
        mine = np.unique(np.asarray(owned, np.uint64))
        boxes.rows(mine)  # every owned cell has a box
    decide = np.setdiff1d(np.intersect1d(mine, B.present_labels(masks)), unsure)
    labels, errors = flow_errors(masks, flows, niter=niter, float32=float32, labels=decide)
    return {"labels": labels, "errors": errors, "undecided": int(len(mine) - len(decide))}
