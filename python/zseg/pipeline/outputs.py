"""The final outputs of a run: ``labels.zarr`` (an OME-Zarr label image, level ``0``)."""

from __future__ import annotations

import zarr

from zseg.pipeline.manifest import Run
from zseg.storage import uri as U
from zseg.storage.arrays import create_array, open_array

AXES = ("z", "y", "x")


def labels_uri(run: Run) -> str:
    return U.join(run.params.output, "labels.zarr")


def _ngff(run: Run) -> dict:
    nd = run.grid.ndim
    vs = run.manifest.get("voxel_size") or [1.0] * nd
    unit = (run.manifest.get("input") or {}).get("unit") or None
    axes = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in AXES[-nd:]]
    return {
        "multiscales": [{
            "name": "cells",
            "axes": axes,
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(vs)}]}],
        }],
        "image-label": {"source": {"image": run.params.input}},
    }


def create_labels(run: Run, dtype: str):
    """Create ``labels.zarr`` with its NGFF metadata and an empty level ``0`` chunked like the grid."""
    uri = labels_uri(run)
    fmt = run.params.zarr_format
    group = zarr.open_group(uri, mode="w", zarr_format=fmt, storage_options=U.storage_options(uri) or None)
    meta = _ngff(run)
    if fmt == 3:
        group.attrs.update({"ome": {"version": "0.5", **meta}})
    else:
        meta["multiscales"][0]["version"] = "0.4"
        meta["image-label"]["version"] = "0.4"
        group.attrs.update(meta)
    g = run.grid
    return create_array(U.join(uri, "0"), shape=g.shape, chunks=g.chunk_shape, dtype=dtype,
                        zarr_format=fmt, overwrite=True, dimension_names=list(AXES[-g.ndim:]))


def open_labels(run: Run, mode: str = "r"):
    return open_array(U.join(labels_uri(run), "0"), mode=mode)
