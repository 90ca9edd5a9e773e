"""``zseg train``: fine-tune a network of either family on a folder of labelled 2D images.

The folder has Cellpose's layout: ``NAME.tif`` and its labels ``NAME<mask_filter>.tif`` (default
``_masks``), as ``zseg crops`` and Cellpose's GUI produce them. The GUI's ``NAME_seg.npy`` files
are Python pickles (loading one runs whatever code it holds), so they are read only with
``trust_seg_npy``. Each image is normalised by its own 1st and 99th percentiles (Cellpose's
``normalize_img``, as Cellpose's training normalises), given the channels the network takes
(zeros added; more channels than the network takes are refused), and trained with Cellpose's
objective (:mod:`zseg.engine.training`). The weights are written as the state dict Cellpose
writes (its tensor names), so they load with ``--model`` and in Cellpose of the same family;
``OUTPUT.json`` beside them records the settings and the losses.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import tifffile

from zseg.errors import UserError
from zseg.params import BSIZE_RULE, bsize_ok
from zseg.storage import uri as U

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".tif", ".tiff")
#: How many channels each family's network takes.
CHANNELS = {"cp3": 2, "cpsam": 3}


def find_pairs(folder: str, mask_filter: str, trust_seg_npy: bool) -> list[tuple[Path, Path]]:
    """``(image, labels)`` files of ``folder``: each image with its ``<mask_filter>`` TIFF, or (with
    ``trust_seg_npy``) its ``_seg.npy``."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{folder!r} is not a folder; give a folder of NAME.tif images and NAME{mask_filter}.tif labels.")
    pairs, pickles = [], []
    for p in sorted(root.iterdir()):
        stem, suffix = p.stem, p.suffix.lower()
        if suffix not in IMAGE_SUFFIXES or stem.endswith(mask_filter) or stem.endswith("_flows"):
            continue
        masks = [root / f"{stem}{mask_filter}{s}" for s in IMAGE_SUFFIXES]
        found = next((m for m in masks if m.exists()), None)
        seg = root / f"{stem}_seg.npy"
        if found is not None:
            pairs.append((p, found))
        elif seg.exists():
            if trust_seg_npy:
                pairs.append((p, seg))
            else:
                pickles.append(seg.name)
    if pickles and not pairs:
        raise UserError(f"{folder!r} has labels only in Cellpose GUI files ({pickles[0]}, ...), which are pickles "
                        "that can run code when loaded; pass --trust-seg-npy if you made them, or save "
                        f"NAME{mask_filter}.tif label images.")
    if not pairs:
        raise UserError(f"{folder!r} has no image with labels: give NAME.tif images beside NAME{mask_filter}.tif "
                        "label images (--mask-filter names the suffix).")
    return pairs


def _read_labels(path: Path) -> np.ndarray:
    if path.name.endswith("_seg.npy"):
        d = np.load(path, allow_pickle=True).item()  # only with --trust-seg-npy
        return np.asarray(d["masks"])
    return tifffile.imread(path)


def _as_channels(img: np.ndarray, path: Path) -> np.ndarray:
    """``(C, H, W)`` from ``(H, W)``, ``(H, W, C)`` (what ``zseg crops`` and Cellpose write) or ``(C, H, W)``."""
    if img.ndim == 2:
        return img[None]
    if img.ndim == 3 and img.shape[-1] <= 8:
        return np.moveaxis(img, -1, 0)
    if img.ndim == 3 and img.shape[0] <= 8:
        return img
    raise UserError(f"{str(path)!r} has shape {img.shape}: give 2D images (Y, X), or (Y, X, C) with up to 8 channels.")


def load_folder(folder: str, mask_filter: str, trust_seg_npy: bool, nchannels: int, min_train_masks: int):
    """Normalised ``(C, H, W)`` float32 images, their label images and names, from ``folder``;
    images with fewer than ``min_train_masks`` masks are left out (as Cellpose leaves them out)."""
    from cellpose.transforms import normalize_img

    images, labels, names, dropped = [], [], [], []
    for ipath, lpath in find_pairs(folder, mask_filter, trust_seg_npy):
        img = _as_channels(np.asarray(tifffile.imread(ipath)), ipath)
        lab = np.asarray(_read_labels(lpath))
        if lab.shape != img.shape[1:]:
            raise UserError(f"{lpath.name!r} has shape {lab.shape} but {ipath.name!r} is {img.shape[1:]}: labels "
                            "must match their image pixel for pixel.")
        if not np.issubdtype(lab.dtype, np.integer):
            raise UserError(f"{lpath.name!r} has data type {lab.dtype}: labels must be integers (0 background).")
        if img.shape[0] > nchannels:
            raise UserError(f"{ipath.name!r} has {img.shape[0]} channels but the network takes {nchannels}; "
                            "save the channels to train on.")
        if len(np.unique(lab[lab > 0])) < min_train_masks:
            dropped.append(ipath.name)
            continue
        x = normalize_img(np.moveaxis(img.astype(np.float32), 0, -1), axis=-1)
        x = np.moveaxis(x, -1, 0)
        if x.shape[0] < nchannels:
            x = np.concatenate([x, np.zeros((nchannels - x.shape[0], *x.shape[1:]), np.float32)])
        images.append(np.ascontiguousarray(x, np.float32))
        labels.append(lab.astype(np.int32))
        names.append(ipath.name)
    if dropped:
        log.warning("%d images have fewer than --min-train-masks %d masks and are left out: %s", len(dropped),
                    min_train_masks, ", ".join(dropped[:5]))
    return images, labels, names, dropped


def train(folder: str, *, model: str, output: str, mask_filter: str = "_masks", trust_seg_npy: bool = False,
          n_epochs: int = 100, learning_rate: float | None = None, weight_decay: float | None = None,
          batch_size: int | None = None, bsize: int | None = None, rescale: bool | None = None,
          min_train_masks: int = 5, test_dir: str | None = None, device: str = "auto", overwrite: bool = False,
          progress=None) -> dict:
    """Fine-tune ``model`` on ``folder``; write ``output`` (weights) and ``output.json``. Unset
    settings take the family's Cellpose defaults (:data:`zseg.engine.training.DEFAULTS`)."""
    import torch

    from zseg.engine import training as TR
    from zseg.storage import models

    if n_epochs < 1:
        raise UserError(f"--n-epochs {n_epochs}: train for at least 1 epoch (Cellpose's default is 100).")
    if learning_rate is not None and not (learning_rate > 0 and np.isfinite(learning_rate)):
        raise UserError(f"--learning-rate {learning_rate}: give a positive number (Cellpose 3: 0.005, CPSAM: 1e-5).")
    if weight_decay is not None and not (weight_decay >= 0 and np.isfinite(weight_decay)):
        raise UserError(f"--weight-decay {weight_decay}: give 0 or a positive number (Cellpose 3: 1e-5, CPSAM: 0.1).")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give at least 1 image per step.")
    if min_train_masks < 0:
        raise UserError(f"--min-train-masks {min_train_masks}: give 0 or more masks.")
    if os.path.exists(output) and not overwrite:
        raise UserError(f"{output!r} exists; choose another --output or pass --overwrite.")
    info = models.inspect_model(model)
    family = info["family"]
    d = TR.DEFAULTS[family]
    if bsize is not None and family == "cpsam" and bsize != info["bsize"]:
        raise UserError(f"--bsize {bsize}: {model!r} is a CPSAM network, which trains on tiles of its own size only "
                        f"({info['bsize']}), as Cellpose refuses others; leave --bsize out.")
    if bsize is not None and not bsize_ok(bsize):
        raise UserError(f"--bsize {bsize}: {BSIZE_RULE}.")
    settings = {
        "learning_rate": d["learning_rate"] if learning_rate is None else float(learning_rate),
        "weight_decay": d["weight_decay"] if weight_decay is None else float(weight_decay),
        "batch_size": d["batch_size"] if batch_size is None else int(batch_size),
        "bsize": (info["bsize"] if family == "cpsam" else d["bsize"]) if bsize is None else int(bsize),
        "rescale": (d["rescale"] if rescale is None else bool(rescale)) and family == "cp3",
    }
    nch = CHANNELS[family]
    dev = models.select_device(device)
    images, labels, names, dropped = load_folder(folder, mask_filter, trust_seg_npy, nch, min_train_masks)
    if not images:
        raise UserError(f"no image in {folder!r} has --min-train-masks {min_train_masks} masks; label more cells "
                        "or lower --min-train-masks.")
    test = None
    if test_dir is not None:  # every labelled image counts (find_pairs refuses a folder without one)
        timgs, tlabs, _, _ = load_folder(test_dir, mask_filter, trust_seg_npy, nch, 0)
        test = (timgs, TR.targets(tlabs, device=dev), TR.diameters(tlabs))
    net = models.trainable_network(info["path"], dev)
    lbls = TR.targets(labels, device=dev)
    diams = TR.diameters(labels)
    t0 = time.perf_counter()
    before = TR.evaluate(net, *test, batch_size=settings["batch_size"], bsize=settings["bsize"],
                         rescale=settings["rescale"], device=dev) if test is not None else None
    losses = TR.fine_tune(net, images, lbls, diams, n_epochs=n_epochs, device=dev, test=test, progress=progress,
                          **settings)
    with U.atomic_local_file(output) as f:  # never a half-written weights file at --output
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, f)
    record = {"model": model, "family": family, "output": output, "images": names, "left_out": dropped,
              "n_epochs": n_epochs, **settings, "diam_labels": float(np.mean(diams)),
              "seconds": round(time.perf_counter() - t0, 2), "test_loss_before": before, **losses}
    U.write_json(f"{output}.json", record)
    return record
