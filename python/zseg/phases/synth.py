"""``zseg synth``: a synthetic volume of touching cells, its ground truth and its exact flows.

Writes ``OUTPUT/image.ome.zarr`` (OME-Zarr with ``labels/cells``) and, with ``flows``,
``OUTPUT/flows.zarr``: the Cellpose flows of the ground truth (the flow-store layout of docs/architecture.md, "Contracts"), so the
whole pipeline after the network can run without model weights.
"""

from __future__ import annotations

import numpy as np

from zseg.engine.synth import flows_from_labels, synth_cells
from zseg.errors import UserError
from zseg.storage import uri as U
from zseg.storage.arrays import create_array
from zseg.storage.omezarr import write_ome_zarr


def _shape(shape) -> tuple[int, int, int]:
    try:
        vals = tuple(int(v) for v in str(shape).replace(",", " ").split())
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 8:
        raise UserError(f"--shape {shape!r}: give three sides Z,Y,X of at least 8 voxels, e.g. 64,128,128.")
    return vals


def synth(output: str, *, shape="64,128,128", diameter=16.0, anisotropy=1.0, seed=0, flows=True,
          membrane=False, zarr_format=3, overwrite=False) -> dict:
    zyx = _shape(shape)
    if not diameter > 2:
        raise UserError(f"--diameter {diameter}: cells need a diameter above 2 voxels.")
    if not anisotropy >= 1:
        raise UserError(f"--anisotropy {anisotropy}: give 1 or more (Z spacing over YX spacing).")
    if zarr_format not in (2, 3):
        raise UserError(f"--zarr-format {zarr_format}: use 2 or 3.")
    image_uri, flows_uri = U.join(output, "image.ome.zarr"), U.join(output, "flows.zarr")
    for uri in (image_uri, flows_uri) if flows else (image_uri,):
        if U.exists(uri) and not overwrite:
            raise UserError(f"{uri!r} exists; pass --overwrite to replace it or choose another folder.")
    image, labels = synth_cells(zyx, diameter=diameter, anisotropy=anisotropy, seed=seed, membrane=membrane)
    chunks = tuple(min(s, 64) for s in image.shape)
    for uri in (image_uri, flows_uri):
        if overwrite:
            U.remove(uri)
    write_ome_zarr(image_uri, image, axes="zyx", voxel_size=(float(anisotropy), 1.0, 1.0), unit="micrometer",
                   chunks=chunks, zarr_format=zarr_format, labels={"cells": labels})
    out = {"image": image_uri, "shape": list(image.shape), "cells": int(labels.max())}
    if flows:
        f = flows_from_labels(labels)
        arr = create_array(flows_uri, shape=f.shape, chunks=(f.shape[0], *chunks), dtype="float16",
                           zarr_format=zarr_format, overwrite=overwrite)
        arr[...] = f.astype(np.float16)
        out["flows"] = flows_uri
    return out
