"""The outputs of a 2D slide run: ``labels.zarr`` as an NGFF labels group, ``cells.parquet`` with
the multiplex columns, and on request ``cells.h5ad`` (AnnData) and ``cells.geojson`` (QuPath).

``labels.zarr`` holds one multiscale image-label per layer (``cells``, ``nuclei``, ``cytoplasm``;
one or two layers for a single compartment; ``cells_unmatched``/``nuclei_unmatched`` with
``--keep-unmatched-layers``), listed in the group's ``labels`` attribute. Level 0 is written
core by core by the layers stage; the coarser levels (each the most frequent label of 2 x 2
pixels of the level below, :func:`zseg.engine.pyramid.downsample_mode`) are built tile by tile
by the report, so memory stays one tile.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from zseg import __version__
from zseg.engine import outlines as OL
from zseg.engine import pyramid as P
from zseg.storage import uri as U
from zseg.storage.arrays import create_array, open_array
from zseg.storage.omezarr import set_ome_attributes

#: The smallest side of the coarsest pyramid level.
MIN_LEVEL_SIDE = 64
#: Side of the tiles the report builds coarser levels in (pixels of the level below).
LEVEL_TILE = 4096


def labels_uri(run) -> str:
    return U.join(run.root, "labels.zarr")


def layer_names(run) -> list[str]:
    names = {"whole-cell": ["cells"], "nuclear": ["nuclei"], "both": ["cells", "nuclei", "cytoplasm"]}[run.compartment]
    if run.params.keep_unmatched_layers and run.compartment == "both":
        names += ["cells_unmatched", "nuclei_unmatched"]
    return names


def level_shapes(shape) -> list[tuple[int, int]]:
    """Level 0 and each 2x coarser level down to :data:`MIN_LEVEL_SIDE` pixels on the shorter side."""
    out = [tuple(int(s) for s in shape)]
    while min(out[-1]) // 2 >= MIN_LEVEL_SIDE:
        out.append(tuple(-(-s // 2) for s in out[-1]))
    return out


def _multiscale(run, name: str, nlevels: int) -> dict:
    py, px = run.pixel_size_um
    unit = {"unit": "micrometer"}
    datasets = []
    for k in range(nlevels):
        f = 2 ** k
        t = [{"type": "scale", "scale": [py * f, px * f]}]
        if k:
            t.append({"type": "translation", "translation": [(f - 1) / 2 * py, (f - 1) / 2 * px]})
        datasets.append({"path": str(k), "coordinateTransformations": t})
    ms = {"name": name, "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
          "datasets": datasets, "type": "mode",
          "metadata": {"method": "zseg.engine.pyramid.downsample_mode", "version": __version__}}
    if run.params.zarr_format == 2:
        ms["version"] = "0.4"
    return ms


def create_layers(run) -> None:
    """Create ``labels.zarr``: the labels group and every (empty) level of every layer."""
    uri, fmt = labels_uri(run), run.params.zarr_format
    group = zarr.open_group(uri, mode="w", zarr_format=fmt, storage_options=U.storage_options(uri) or None)
    names = layer_names(run)
    set_ome_attributes(group, {"labels": names}, fmt)
    shapes = level_shapes(run.grid.shape)
    for name in names:
        sub = zarr.open_group(U.join(uri, name), mode="w", zarr_format=fmt,
                              storage_options=U.storage_options(uri) or None)
        label = {"source": {"image": "../../"}}  # the slide, when labels.zarr sits in its image
        if fmt == 2:
            label["version"] = "0.4"
        set_ome_attributes(sub, {"multiscales": [_multiscale(run, name, len(shapes))], "image-label": label}, fmt)
        for k, shape in enumerate(shapes):
            chunks = tuple(min(c, s) for c, s in zip(run.grid.chunk_shape, shape))
            create_array(U.join(uri, name, str(k)), shape=shape, chunks=chunks, dtype="uint32", zarr_format=fmt,
                         overwrite=True, dimension_names=["y", "x"] if fmt == 3 else None)


def open_layer(run, name: str, level: int = 0, mode: str = "r"):
    return open_array(U.join(labels_uri(run), name, str(level)), mode=mode)


def build_levels(run, name: str) -> int:
    """Levels 1.. of layer ``name``, each from the level below in tiles; returns the tiles written."""
    shapes = level_shapes(run.grid.shape)
    tiles = 0
    for k in range(1, len(shapes)):
        below, here = open_layer(run, name, k - 1), open_layer(run, name, k, mode="r+")
        for y in range(0, shapes[k - 1][0], LEVEL_TILE):
            for x in range(0, shapes[k - 1][1], LEVEL_TILE):
                tile = np.asarray(below[y:y + LEVEL_TILE, x:x + LEVEL_TILE])
                down = P.downsample_mode(tile, (2, 2))
                here[y // 2:y // 2 + down.shape[0], x // 2:x // 2 + down.shape[1]] = down
                tiles += 1
    return tiles


def write_parquet(uri: str, columns: dict, metadata: dict | None = None) -> None:
    table = pa.table({k: np.asarray(v) for k, v in columns.items()})
    if metadata:
        table = table.replace_schema_metadata({"zseg": json.dumps(metadata)})
    with U.atomic_file(uri) as f:
        pq.write_table(table, f)


def write_anndata(run, table: dict, uri: str) -> None:
    """``cells.h5ad``: X = each cell's mean per channel; layers ``nucleus`` and ``cytoplasm``; obs
    the label, areas and centroids; ``obsm["spatial"]`` the centroids (x, y) in micrometres."""
    import anndata as ad  # heavy; only runs that ask for it import it
    import pandas as pd

    names = run.channels["names"]
    comps = [c for c in ("cell", "nucleus", "cytoplasm") if f"area_{c}" in table]
    first = comps[0]
    X = np.stack([table[f"{n}_{first}_mean"] for n in names], axis=1) if len(names) else np.zeros((len(table["label"]), 0))
    obs = pd.DataFrame({k: table[k] for k in ("label", "centroid_y", "centroid_x", *[f"area_{c}" for c in comps])})
    obs.index = [str(int(v)) for v in table["label"]]
    layers = {c: np.stack([table[f"{n}_{c}_mean"] for n in names], axis=1) for c in comps[1:]}
    a = ad.AnnData(X=X.astype(np.float64), obs=obs, var=pd.DataFrame(index=list(names)), layers=layers)
    a.obsm["spatial"] = np.stack([table["centroid_x_um"], table["centroid_y_um"]], axis=1)
    a.uns["zseg"] = {"compartment": run.compartment, "X": f"{first} mean intensity per channel (raw)",
                     "version": __version__}
    with tempfile.TemporaryDirectory() as tmp:  # h5py writes to a path: write here, then put it in place whole
        path = os.path.join(tmp, "cells.h5ad")
        a.write_h5ad(path)
        with open(path, "rb") as src, U.atomic_file(uri) as dst:
            shutil.copyfileobj(src, dst)


def write_geojson(run, table: dict, uri: str) -> int:
    """``cells.geojson``, streamed feature by feature: each cell's outline (and its nucleus'),
    ``objectType: "cell"`` and its measurements, for QuPath. Reads each cell's box only."""
    layers = layer_names(run)
    cell_layer = "cells" if "cells" in layers else "nuclei"
    cells = open_layer(run, cell_layer)
    nuclei = open_layer(run, "nuclei") if "nuclei" in layers and cell_layer == "cells" else None
    names = [k for k in table if k.endswith("_mean") or k.startswith("area_")]
    n = 0
    with U.atomic_file(uri) as f:
        f.write(b'{"type": "FeatureCollection", "features": [\n')
        for row in range(len(table["label"])):
            lab = int(table["label"][row])
            box = tuple(slice(int(a), int(b)) for a, b in zip(table["_bbox_start"][row], table["_bbox_stop"][row]))
            grown = tuple(slice(max(0, s.start - 1), min(n_, s.stop + 1)) for s, n_ in zip(box, run.grid.shape))
            origin = [s.start for s in grown]
            c = np.asarray(cells[grown]) == lab
            nuc = None if nuclei is None else (np.asarray(nuclei[grown]) == lab)
            measurements = {k: float(table[k][row]) for k in names if np.isfinite(table[k][row])}
            feature = OL.cell_feature(lab, c, nuc, origin=origin, measurements=measurements)
            f.write((("," if n else "") + json.dumps(feature) + "\n").encode())
            n += 1
        f.write(b"]}\n")
    return n


def finish_outputs(run, table: dict, bboxes: dict[str, np.ndarray]) -> dict:
    """Pyramids of every layer, ``cells.parquet`` and the optional outputs; returns their paths."""
    tiles = sum(build_levels(run, name) for name in layer_names(run))
    uri = U.join(run.root, "cells.parquet")
    meta = {"compartment": run.compartment, "channels": run.channels["names"], "pixel_size_um": list(run.pixel_size_um),
            "intensity": "raw slide values (before normalisation); {channel}_{compartment}_mean",
            "labels": labels_uri(run)}
    write_parquet(uri, table, meta)
    out = {"labels": labels_uri(run), "layers": layer_names(run), "cells": uri,
           "patches": run.manifest["patches"]["uri"], "pyramid_tiles": tiles,
           "levels": [list(s) for s in level_shapes(run.grid.shape)]}
    if run.params.anndata:
        out["anndata"] = U.join(run.root, "cells.h5ad")
        write_anndata(run, table, out["anndata"])
    if run.params.geojson:
        out["geojson"] = U.join(run.root, "cells.geojson")
        write_geojson(run, {**table, "_bbox_start": bboxes["start"], "_bbox_stop": bboxes["stop"]}, out["geojson"])
    return out
