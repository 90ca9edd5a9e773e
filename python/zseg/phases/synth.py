"""``zseg synth``: a synthetic volume of touching cells, its ground truth and its exact flows.

Writes ``OUTPUT/image.ome.zarr`` (OME-Zarr with ``labels/cells``) and, with ``flows``,
``OUTPUT/flows.zarr``: the Cellpose flows of the ground truth (the flow-store layout of docs/architecture.md, "Contracts"), so the
whole pipeline after the network can run without model weights.

``zseg synth --multiplex`` writes a 2D multiplex slide instead (:func:`synth_slide`):
``OUTPUT/slide.ome.zarr`` (``cyx``: DAPI, Membrane and marker channels, with ``labels/cells`` and
``labels/nuclei``, one ID per cell), ``OUTPUT/truth.parquet`` (each cell's known marker means per
compartment) and, with ``flows``, the oracle flows of both compartments, ``flows.zarr`` (whole
cells) and ``nuclear_flows.zarr`` (nuclei), each ``(3, Y, X)`` = dY, dX, cellprob.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from zseg.engine.synth import flows_from_labels, synth_cells, synth_multiplex
from zseg.errors import UserError
from zseg.storage import uri as U
from zseg.storage.arrays import create_array
from zseg.storage.omezarr import write_ome_zarr


def _ints(text) -> tuple[int, ...]:
    """``"64,128,128"`` or ``"64 128 128"`` as integers; () when it is not that."""
    try:
        return tuple(int(v) for v in str(text).replace(",", " ").split())
    except ValueError:
        return ()


def _shape(shape) -> tuple[int, int, int]:
    vals = _ints(shape)
    if len(vals) != 3 or min(vals) < 8:
        raise UserError(f"--shape {shape!r}: give three sides Z,Y,X of at least 8 voxels, e.g. 64,128,128.")
    return vals


def _yx(shape) -> tuple[int, int]:
    vals = _ints(shape)
    if len(vals) != 2 or min(vals) < 16:
        raise UserError(f"--shape {shape!r}: a multiplex slide takes two sides Y,X of at least 16 pixels, "
                        "e.g. 1024,1024.")
    return vals


def _check_outputs(uris, zarr_format, overwrite) -> None:
    """Refuse before anything is made: a zarr format zseg does not write, or outputs that exist."""
    if zarr_format not in (2, 3):
        raise UserError(f"--zarr-format {zarr_format}: use 2 or 3.")
    for uri in uris:
        if U.exists(uri) and not overwrite:
            raise UserError(f"{uri!r} exists; pass --overwrite to replace it or choose another folder.")


def _write_flows(uri, labels, chunks, zarr_format, overwrite) -> None:
    """The exact Cellpose flows of ``labels`` as a float16 flow store chunked ``chunks`` in space."""
    f = flows_from_labels(labels)
    arr = create_array(uri, shape=f.shape, chunks=(f.shape[0], *chunks), dtype="float16",
                       zarr_format=zarr_format, overwrite=overwrite)
    arr[...] = f.astype(np.float16)


def synth_slide(output: str, *, shape="512,512", diameter=24.0, markers=4, seed=0, flows=True, zarr_format=3,
                overwrite=False) -> dict:
    """Write a synthetic multiplex slide, its truth and (with ``flows``) both compartments' flows."""
    yx = _yx(shape)
    if not diameter > 4:
        raise UserError(f"--diameter {diameter}: a cell with a nucleus needs a diameter above 4 pixels.")
    if not 0 <= markers <= 60:
        raise UserError(f"--markers {markers}: give 0 to 60 marker channels.")
    names = {"slide": "slide.ome.zarr", "truth": "truth.parquet"}
    if flows:
        names.update(flows="flows.zarr", nuclear_flows="nuclear_flows.zarr")
    uris = {k: U.join(output, v) for k, v in names.items()}
    _check_outputs(uris.values(), zarr_format, overwrite)
    s = synth_multiplex(yx, diameter=diameter, markers=markers, seed=seed)
    for uri in uris.values():
        if overwrite:
            U.remove(uri)
    chunks = (1, *(min(n, 256) for n in yx))
    write_ome_zarr(uris["slide"], s["image"], axes="cyx", voxel_size=(0.5, 0.5), unit="micrometer", chunks=chunks,
                   zarr_format=zarr_format, channel_names=s["channel_names"],
                   labels={"cells": s["cells"], "nuclei": s["nuclei"]})
    n = int(s["cells"].max())
    cols = {"label": pa.array(np.arange(1, n + 1, dtype=np.uint32))}
    for m, name in enumerate(s["channel_names"][2:]):
        cols[f"{name}_nucleus_mean"] = pa.array(s["levels"][m, 1:, 0].astype(np.float64))
        cols[f"{name}_cytoplasm_mean"] = pa.array(s["levels"][m, 1:, 1].astype(np.float64))
    with U.atomic_file(uris["truth"]) as f:
        pq.write_table(pa.table(cols), f)
    out = {"slide": uris["slide"], "shape": list(yx), "cells": n, "channels": s["channel_names"],
           "truth": uris["truth"]}
    if flows:
        for key, lab in (("flows", s["cells"]), ("nuclear_flows", s["nuclei"])):
            _write_flows(uris[key], lab, chunks[1:], zarr_format, overwrite)
            out[key] = uris[key]
    return out


def synth(output: str, *, shape="64,128,128", diameter=16.0, anisotropy=1.0, seed=0, flows=True,
          membrane=False, zarr_format=3, overwrite=False) -> dict:
    zyx = _shape(shape)
    if not diameter > 2:
        raise UserError(f"--diameter {diameter}: cells need a diameter above 2 voxels.")
    if not anisotropy >= 1:
        raise UserError(f"--anisotropy {anisotropy}: give 1 or more (Z spacing over YX spacing).")
    image_uri, flows_uri = U.join(output, "image.ome.zarr"), U.join(output, "flows.zarr")
    _check_outputs((image_uri, flows_uri) if flows else (image_uri,), zarr_format, overwrite)
    image, labels = synth_cells(zyx, diameter=diameter, anisotropy=anisotropy, seed=seed, membrane=membrane)
    chunks = tuple(min(s, 64) for s in image.shape)
    for uri in (image_uri, flows_uri):
        if overwrite:
            U.remove(uri)
    write_ome_zarr(image_uri, image, axes="zyx", voxel_size=(float(anisotropy), 1.0, 1.0), unit="micrometer",
                   chunks=chunks, zarr_format=zarr_format, labels={"cells": labels})
    out = {"image": image_uri, "shape": list(image.shape), "cells": int(labels.max())}
    if flows:
        _write_flows(flows_uri, labels, chunks, zarr_format, overwrite)
        out["flows"] = flows_uri
    return out
