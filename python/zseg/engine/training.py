"""Fine-tuning a network with Cellpose's training objective (torch; data as arrays).

What Cellpose's ``train.train_seg`` does, around zseg's own networks (either family):

* **targets**: Cellpose's ``dynamics.labels_to_flows`` of each label image — the foreground
  and the unit flow field of every mask (its ``masks_to_flows``);
* **augmentation**: Cellpose's ``transforms.random_rotate_and_resize`` (random rotation, flips,
  scale in ``[1 - scale_range / 2, 1 + scale_range / 2]``, and with ``rescale`` each image resized
  so its cells have the network's ``diam_mean``), cropping ``bsize`` tiles, flow vectors turned
  with the image; numpy's global generator seeded per epoch, as Cellpose seeds it;
* **loss** (:func:`seg_loss`): ``MSE(flows, 5 x target flows) / 2 + BCE-with-logits(cell
  probability, foreground)``, Cellpose's ``_loss_fn_seg``;
* **optimiser**: AdamW; learning rate warmed up linearly over 10 epochs, then constant, then
  halved ten times over the last epochs of long runs (:func:`lr_schedule`, Cellpose's).

The per-family defaults (:data:`DEFAULTS`) are Cellpose's: Cellpose 3 trains with learning
rate 0.005, weight decay 1e-5, batches of 8 and rescaling on 224-pixel tiles; CPSAM with 1e-5,
0.1, batches of 1, no rescaling, on its own 256-pixel tiles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from cellpose import dynamics as cp_dynamics
from cellpose import utils as cp_utils
from cellpose.transforms import random_rotate_and_resize
from torch.nn import functional as F

__all__ = ["DEFAULTS", "SCALE_RANGE", "lr_schedule", "seg_loss", "targets", "diameters", "fine_tune"]

#: Cellpose's training defaults per network family.
DEFAULTS = {
    "cp3": {"learning_rate": 0.005, "weight_decay": 1e-5, "batch_size": 8, "rescale": True, "bsize": 224},
    "cpsam": {"learning_rate": 1e-5, "weight_decay": 0.1, "batch_size": 1, "rescale": False, "bsize": 256},
}
#: Cellpose's random scale range of the augmentation.
SCALE_RANGE = 0.5


def lr_schedule(learning_rate: float, n_epochs: int) -> np.ndarray:
    """Cellpose's learning rate per epoch: 10 epochs of linear warm-up, then constant; runs of
    more than 99 (300) epochs halve it ten times over their last 50 (100) epochs."""
    lr = np.linspace(0, learning_rate, 10)
    lr = np.append(lr, learning_rate * np.ones(max(0, n_epochs - 10)))
    if n_epochs > 300:
        lr = lr[:-100]
        for _ in range(10):
            lr = np.append(lr, lr[-1] / 2 * np.ones(10))
    elif n_epochs > 99:
        lr = lr[:-50]
        for _ in range(10):
            lr = np.append(lr, lr[-1] / 2 * np.ones(5))
    return lr[:n_epochs]


def seg_loss(y: torch.Tensor, lbl: torch.Tensor) -> torch.Tensor:
    """Cellpose's segmentation loss: ``y`` (B, 3, H, W) = flow Y, flow X, cell probability logit;
    ``lbl`` (B, >=3, H, W) whose last three channels are the foreground and the unit flows Y, X."""
    flows = 5.0 * lbl[:, -2:]
    return F.mse_loss(y[:, -3:-1], flows) / 2.0 + F.binary_cross_entropy_with_logits(
        y[:, -1], (lbl[:, -3] > 0.5).to(y.dtype))


def targets(labels: Sequence[np.ndarray], device: torch.device | None = None) -> list[np.ndarray]:
    """Cellpose's training targets of 2D label images: ``(3, H, W)`` float32 each = foreground,
    unit flow Y, unit flow X (``labels_to_flows`` without its label channel, which the
    augmentation does not carry)."""
    flows = cp_dynamics.labels_to_flows([np.array(lab, np.int32)[None] for lab in labels], device=device)
    return [np.ascontiguousarray(f[1:]) for f in flows]


def diameters(labels: Sequence[np.ndarray]) -> np.ndarray:
    """Each label image's cell diameter as Cellpose measures it (``utils.diameters``)."""
    return np.array([cp_utils.diameters(np.asarray(lab))[0] for lab in labels], np.float32)


def _forward(net, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def _batch_loss(net, images, lbls, idx, diams, *, bsize: int, rescale: bool, diam_mean: float, device):
    rsc = diams[idx] / diam_mean if rescale else np.ones(len(idx), np.float32)
    x, lbl = random_rotate_and_resize([images[i] for i in idx], lbls=[lbls[i] for i in idx], rescale=rsc,
                                      bsize=bsize, scale_range=SCALE_RANGE, device=device)[:2]
    return seg_loss(_forward(net, x), lbl)


def fine_tune(net: torch.nn.Module, images: Sequence[np.ndarray], lbls: Sequence[np.ndarray], diams: np.ndarray, *,
              n_epochs: int, learning_rate: float, weight_decay: float, batch_size: int, bsize: int,
              rescale: bool, device: torch.device, test: tuple | None = None,
              progress: Callable[[int, float, float | None], None] | None = None) -> dict:
    """Train ``net`` in place on normalised ``images`` ``(C, H, W)`` with :func:`targets` ``lbls``.

    ``diams``: each image's cell diameter (:func:`diameters`), for ``rescale``. ``test``: held-out
    ``(images, lbls, diams)`` whose loss is measured after every epoch (augmented the same way
    each time, numpy seeded with 42 as Cellpose does). ``progress(epoch, train_loss, test_loss)``
    is called after each epoch. Returns the per-epoch ``train_loss`` and ``test_loss`` lists.
    """
    diam_mean = float(net.diam_mean.item())
    net.diam_labels.data = torch.tensor([float(np.mean(diams))], device=device, dtype=net.diam_labels.dtype)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = lr_schedule(learning_rate, n_epochs)
    out = {"train_loss": [], "test_loss": []}
    for epoch in range(n_epochs):
        np.random.seed(epoch)  # Cellpose's augmentation draws from numpy's global generator
        order = np.random.permutation(len(images))
        for group in optimizer.param_groups:
            group["lr"] = float(schedule[epoch])
        net.train()
        total = 0.0
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            loss = _batch_loss(net, images, lbls, idx, diams, bsize=bsize, rescale=rescale, diam_mean=diam_mean,
                               device=device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        out["train_loss"].append(total / len(order))
        test_loss = None
        if test is not None:
            test_loss = evaluate(net, *test, batch_size=batch_size, bsize=bsize, rescale=rescale, device=device)
            out["test_loss"].append(test_loss)
        if progress is not None:
            progress(epoch, out["train_loss"][-1], test_loss)
    net.eval()
    return out


def evaluate(net, images, lbls, diams, *, batch_size: int, bsize: int, rescale: bool, device) -> float:
    """The mean loss of ``net`` over held-out images (one fixed augmentation, numpy seed 42)."""
    np.random.seed(42)
    net.eval()
    total = 0.0
    with torch.no_grad():
        for k in range(0, len(images), batch_size):
            idx = np.arange(k, min(k + batch_size, len(images)))
            total += _batch_loss(net, images, lbls, idx, diams, bsize=bsize, rescale=rescale,
                                 diam_mean=float(net.diam_mean.item()), device=device).item() * len(idx)
    return total / len(images)
