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

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import zarr

from zseg import __version__
from zseg.engine import outlines as OL
from zseg.engine import pyramid as P
from zseg.outputs import report as R
from zseg.storage import uri as U
from zseg.storage.arrays import create_array, is_array, open_array
from zseg.storage.omezarr import set_ome_attributes

#: Cells per pass of the table: the report merges the partial statistics of this many labels at a
#: time, so its memory is this many rows of every channel, whatever the number of cells.
TABLE_ROWS = 100_000
#: The smallest side of the coarsest pyramid level.
MIN_LEVEL_SIDE = 64
#: Side of the tiles the report builds coarser levels in (pixels of the level below).
LEVEL_TILE = 4096


def labels_uri(run) -> str:
    return U.join(run.root, "labels.zarr")


#: The layers of each ``--compartment``; the first holds every cell (IDs 1..N, the table's rows).
LAYERS = {"whole-cell": ("cells",), "nuclear": ("nuclei",), "both": ("cells", "nuclei", "cytoplasm")}


def layer_names(run) -> list[str]:
    """Every layer of ``labels.zarr``: the compartment's, and the unmatched ones on request."""
    names = list(LAYERS[run.compartment])
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
        label = {}  # no "source": labels.zarr sits beside the slide, not inside it
        if fmt == 2:
            label["version"] = "0.4"
        set_ome_attributes(sub, {"multiscales": [_multiscale(run, name, len(shapes))], "image-label": label}, fmt)
        for k, shape in enumerate(shapes):
            chunks = tuple(min(c, s) for c, s in zip(run.grid.chunk_shape, shape))
            create_array(U.join(uri, name, str(k)), shape=shape, chunks=chunks, dtype="uint32", zarr_format=fmt,
                         overwrite=True, dimension_names=["y", "x"] if fmt == 3 else None)


def layers_created(run) -> bool:
    """Whether :func:`create_layers` finished: every level of every layer is an array."""
    uri = labels_uri(run)
    return all(is_array(U.join(uri, name, str(k)))
               for name in layer_names(run) for k in range(len(level_shapes(run.grid.shape))))


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


# -- partial statistics of the layers, per chunk, and the table streamed from them ------------------
def stats_uri(run, layer: str, index: int) -> str:
    return run.path("layer_stats", layer, f"c{index:07d}.parquet")


def write_stats(uri: str, st: dict) -> None:
    """One chunk's partial statistics of a layer (``zseg.engine.stats.block_stats``) as a parquet
    file sorted by label, so that a reader asking for a range of labels skips what it does not need."""
    order = np.argsort(st["label"], kind="stable")
    cols = {"label": st["label"][order].astype(np.uint64), "count": st["count"][order]}
    for key in ("coord_sum", "bbox_start", "bbox_stop", "intensity_sum", "intensity_max"):
        for j in range(st[key].shape[1]):
            cols[f"{key}_{j}"] = st[key][order, j]
    with U.atomic_file(uri) as f:
        pq.write_table(pa.table(cols), f)


def read_stats(uris: list[str], lo: int, hi: int, nchannels: int, ndim: int = 2) -> list[dict]:
    """The partial statistics rows of labels ``lo <= label < hi`` in the files ``uris``."""
    if not uris:
        return []
    t = ds.dataset(uris, format="parquet")
    f = (ds.field("label") >= pa.scalar(lo, pa.uint64())) & (ds.field("label") < pa.scalar(hi, pa.uint64()))
    tab = t.to_table(filter=f)
    if tab.num_rows == 0:
        return []
    out = {"label": tab["label"].to_numpy(), "count": tab["count"].to_numpy()}
    for key, n in (("coord_sum", ndim), ("bbox_start", ndim), ("bbox_stop", ndim), ("intensity_sum", nchannels),
                   ("intensity_max", nchannels)):
        out[key] = np.stack([tab[f"{key}_{j}"].to_numpy() for j in range(n)], axis=1) if n else np.zeros((tab.num_rows, 0))
    return [out]


def write_parquet(uri: str, columns: dict) -> None:
    """A small table (the patches) written whole, atomically."""
    with U.atomic_file(uri) as f:
        pq.write_table(pa.table({k: np.asarray(v) for k, v in columns.items()}), f)


def write_anndata(run, table_uri: str, uri: str) -> None:
    """``cells.h5ad`` from ``cells.parquet``: X = each cell's mean per channel; layers ``nucleus``
    and ``cytoplasm``; obs the label, areas and centroids; ``obsm["spatial"]`` the centroids (x, y)
    in micrometres. AnnData holds the whole matrix: memory grows with cells x channels."""
    import anndata as ad  # heavy; only runs that ask for it import it
    import pandas as pd

    table = pq.read_table(table_uri).to_pydict()
    names = run.channels["names"]
    comps = [c for c in ("cell", "nucleus", "cytoplasm") if f"area_{c}" in table]
    first = comps[0]
    n = len(table["label"])
    X = np.stack([table[f"{c}_{first}_mean"] for c in names], axis=1) if names else np.zeros((n, 0))
    obs = pd.DataFrame({k: table[k] for k in ("label", "centroid_y", "centroid_x", *[f"area_{c}" for c in comps])})
    obs.index = [str(int(v)) for v in table["label"]]
    layers = {c: np.stack([table[f"{ch}_{c}_mean"] for ch in names], axis=1).astype(np.float64) for c in comps[1:]}
    a = ad.AnnData(X=np.asarray(X, np.float64), obs=obs, var=pd.DataFrame(index=list(names)), layers=layers)
    a.obsm["spatial"] = np.stack([table["centroid_x_um"], table["centroid_y_um"]], axis=1)
    a.uns["zseg"] = {"compartment": run.compartment, "X": f"{first} mean intensity per channel (raw)",
                     "version": __version__}
    with tempfile.TemporaryDirectory() as tmp:  # h5py writes to a path: write here, then put it in place whole
        path = os.path.join(tmp, "cells.h5ad")
        a.write_h5ad(path)
        with open(path, "rb") as src, U.atomic_file(uri) as dst:
            shutil.copyfileobj(src, dst)


class GeoJSONWriter:
    """``cells.geojson``, written feature by feature: each cell's outline (and its nucleus'),
    ``objectType: "cell"`` and its measurements, for QuPath. Reads each cell's box only."""

    def __init__(self, run, f):
        self.run, self.f, self.n = run, f, 0
        layers = layer_names(run)
        self.cells = open_layer(run, "cells" if "cells" in layers else "nuclei")
        self.nuclei = open_layer(run, "nuclei") if {"cells", "nuclei"} <= set(layers) else None
        f.write(b'{"type": "FeatureCollection", "features": [\n')

    def add(self, table: dict, start: np.ndarray, stop: np.ndarray) -> None:
        names = [k for k in table if k.endswith("_mean") or k.startswith("area_")]
        shape = self.run.grid.shape
        for row in range(len(table["label"])):
            lab = int(table["label"][row])
            box = tuple(slice(max(0, int(a) - 1), min(n, int(b) + 1)) for a, b, n in zip(start[row], stop[row], shape))
            cell = np.asarray(self.cells[box]) == lab
            nucleus = None if self.nuclei is None else np.asarray(self.nuclei[box]) == lab
            measurements = {k: float(table[k][row]) for k in names if np.isfinite(table[k][row])}
            feature = OL.cell_feature(lab, cell, nucleus, origin=[b.start for b in box], measurements=measurements)
            self.f.write((("," if self.n else "") + json.dumps(feature) + "\n").encode())
            self.n += 1

    def close(self) -> None:
        self.f.write(b"]}\n")


def _thumbnail_level(run) -> int:
    """The finest pyramid level whose longer side is at most :data:`zseg.outputs.report.DISPLAY` x 2."""
    shapes = level_shapes(run.grid.shape)
    return next((k for k, s in enumerate(shapes) if max(s) <= 2 * R.DISPLAY), len(shapes) - 1)


def _patch_map(run) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = pq.read_table(run.manifest["patches"]["uri"]).to_pydict()
    ps = int(run.manifest["patches"]["patch_size"])
    y, x = np.asarray(t["y_start"]) // ps, np.asarray(t["x_start"]) // ps
    grid = np.zeros((int(y.max()) + 1, int(x.max()) + 1))
    mean = np.zeros_like(grid)
    grid[y, x] = np.asarray(t["is_informative"], float)
    mean[y, x] = np.asarray(t["nuclear_mean"], float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    axes[0].imshow(grid, cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title(f"informative patches ({int(grid.sum())} of {grid.size}, {ps} px)", fontsize=10)
    im = axes[1].imshow(mean, cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    axes[1].set_title("nuclear channel mean per patch (raw)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("patch x")
        ax.set_ylabel("patch y")
    fig.tight_layout()
    return R.figure_png(fig)


def write_report(run, result: dict, areas: dict[str, np.ndarray]) -> str:
    """``qc/report.html``: outlines of cells and nuclei on a thumbnail of the nuclear channel (a
    pyramid level, read whole: a few MB), the patch map, the matching and the size distributions."""
    qc = U.join(run.root, "qc")
    k = _thumbnail_level(run)
    f = 2 ** k
    planes = run.manifest["channels"]
    inputs = open_array(U.join(run.path("inputs.zarr")))
    plane = inputs.shape[0] - 1  # the nuclear plane is last (the composite alone for a whole-cell run)
    base = np.asarray(inputs[plane, 0, ::f, ::f], np.float64)
    low, high = (float(np.percentile(base, 1)), float(np.percentile(base, 99.5))) if base.size else (0.0, 1.0)
    pixel = tuple(v * f for v in run.pixel_size_um)
    figures = []
    for name in layer_names(run):
        if name == "cytoplasm" or name.endswith("_unmatched"):
            continue
        lab = np.asarray(open_layer(run, name, k))
        U.write_bytes(U.join(qc, f"{name}.png"), R.png(R.render(base[:lab.shape[0], :lab.shape[1]], lab, pixel, low, high)))
        figures.append(R.html_figure(f"{name}.png", f"{name}: outlines at 1/{f} scale", name))
    hist = []
    for comp in ("cell", "nucleus"):
        counts = np.asarray(areas.get(f"area_{comp}", np.zeros(0, np.int64))).copy()
        if len(counts):
            counts[0] = 0  # cells without this compartment
        if counts.any():
            png = R.size_histogram(counts, float(np.prod(run.pixel_size_um)),
                                   xlabel=f"{comp} area (µm²)", what="cells" if comp == "cell" else "nuclei")
            if png:
                U.write_bytes(U.join(qc, f"{comp}_areas.png"), png)
                hist.append(R.html_figure(f"{comp}_areas.png", f"{comp} areas", f"{comp} areas"))
    U.write_bytes(U.join(qc, "patches.png"), _patch_map(run))
    summary = [("compartment", run.compartment), ("cells (rows of cells.parquet)", result["cells"]),
               ("chunk exact", result["chunk_exact"]),
               ("patches informative", f"{result['patches']['informative']} of {result['patches']['total']}")]
    for name, c in result["compartments"].items():
        summary.append((f"{name}: kept", c.get("cells")))
        if c.get("flow_check"):
            summary.append((f"{name}: removed by the flow check", c["flow_check"]["removed"]))
        summary.append((f"{name}: skipped (seed in an uninformative patch)", c.get("skipped_cells", 0)))
    m = result.get("matching")
    if m:
        summary += [("matched fraction M / (C + N - M)", round(m["matched_fraction"], 4)),
                    ("cells matched / total", f"{m['cells']['matched']} / {m['cells']['total']}"),
                    ("nuclei matched / total", f"{m['nuclei']['matched']} / {m['nuclei']['total']}")]
    verdict = ('<p class="ok">Chunk-exact: every decision was taken with whole cells.</p>' if result["chunk_exact"]
               else '<p class="warn">Some decisions reached beyond their chunk: see run.json; re-run with a larger '
                    "--halo.</p>")
    page = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>zseg QC: {R.escape(run.root)}</title>", f"<style>{R.CSS}</style></head>",
        '<body data-images-loaded="pending">', "<h1>zseg slide segmentation report</h1>",
        f'<p class="sub">{R.escape(run.root)} · {R.escape(run.manifest.get("created", ""))} · '
        f"channels: {R.escape(', '.join(planes['names']))}</p>", verdict,
        "<h2>Summary</h2>", R.html_table(summary),
        "<h2>Outlines</h2>", '<div class="row">' + "".join(figures) + "</div>",
        "<h2>Patches</h2>", '<div class="row">' + R.html_figure("patches.png", "patch QC", "patch map") + "</div>",
        "<h2>Sizes</h2>", '<div class="row">' + ("".join(hist) or "<p>No cells.</p>") + "</div>",
        f"<script>{R.SCRIPT}</script>", "</body></html>",
    ]
    uri = U.join(qc, "report.html")
    U.write_bytes(uri, "\n".join(page).encode())
    return uri


def finish_outputs(run, passes) -> dict:
    """Pyramids of every layer, ``cells.parquet`` streamed from ``passes`` (an iterator of ``(table
    columns of a range of labels, their boxes' start and stop)``, ascending), the optional outputs;
    returns their paths, the row count and each compartment's exact area counts (for the report)."""
    tiles = sum(build_levels(run, name) for name in layer_names(run))
    uri = U.join(run.root, "cells.parquet")
    meta = {"compartment": run.compartment, "channels": run.channels["names"], "pixel_size_um": list(run.pixel_size_um),
            "intensity": "raw slide values (before normalisation); {channel}_{compartment}_mean",
            "labels": labels_uri(run)}
    out = {"labels": labels_uri(run), "layers": layer_names(run), "cells": uri,
           "patches": run.manifest["patches"]["uri"], "pyramid_tiles": tiles,
           "levels": [list(s) for s in level_shapes(run.grid.shape)]}
    rows, areas = 0, {}
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(U.atomic_file(uri))
        geo = None
        if run.params.geojson:
            out["geojson"] = U.join(run.root, "cells.geojson")
            geo = GeoJSONWriter(run, stack.enter_context(U.atomic_file(out["geojson"])))
        writer = None
        for table, start, stop in passes:
            t = pa.table({k: np.asarray(v) for k, v in table.items()})
            if writer is None:
                writer = stack.enter_context(pq.ParquetWriter(f, t.schema.with_metadata({"zseg": json.dumps(meta)})))
            writer.write_table(t)
            rows += t.num_rows
            for k in table:
                if k.startswith("area_"):
                    counts = np.bincount(np.asarray(table[k], np.int64))
                    have = areas.get(k, np.zeros(0, np.int64))
                    n = max(len(have), len(counts))
                    areas[k] = np.pad(have, (0, n - len(have))) + np.pad(counts, (0, n - len(counts)))
            if geo is not None:
                geo.add(table, start, stop)
        if geo is not None:
            geo.close()
    if run.params.anndata:
        out["anndata"] = U.join(run.root, "cells.h5ad")
        write_anndata(run, uri, out["anndata"])
    return {"outputs": out, "rows": rows, "areas": areas}
