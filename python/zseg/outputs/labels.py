"""The final outputs of a run: ``labels.zarr``, ``cells.parquet``, ``qc/``, and the hooks of
the finalize stages that write them.

``labels.zarr`` is an OME-Zarr multiscale label image (NGFF 0.5 on zarr v3, 0.4 on v2) with
``image-label`` metadata, the input's physical scale and unit, and a pyramid down to about
256 voxels per side made by :func:`zseg.engine.pyramid.downsample_mode`. Its datasets, in
order (paths ``"0"``, ``"1"`` ...):

- ``full`` (only when the run segmented level L > 0 of the input): the labels at the input's
  full resolution, each segmented voxel repeated by the per-axis factors of the input's NGFF
  scales (level L over level 0);
- ``segmented``: the labels on the run's chunk grid, written core by core by
  ``finalize:labels``;
- ``fused`` pyramid levels: downsampled in the same task, from the core in memory, as long
  as the core's size is a multiple of the level's factor (so windows never straddle cores)
  and the level keeps at least :data:`MIN_FUSED` voxels per core side;
- ``reduced`` pyramid levels: built by ``finalize:report`` tile by tile from the level below.

Every array is chunked for viewers (about 64 voxels a side); on zarr v3 the levels written by
a chunk's task are sharded with one shard per core, so no two tasks write the same object.
The layout is decided once, by ``finalize:number``, and kept in ``work/labels_layout.json``.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import zarr

from zseg import __version__
from zseg.engine import pyramid as P
from zseg.storage import uri as U
from zseg.storage.arrays import create_array, open_array
from zseg.storage.omezarr import axis_names, ome_attributes, set_ome_attributes
from zseg.workspace.context import RunContext

log = logging.getLogger(__name__)

AXES = ("z", "y", "x")
LAYOUT = "labels_layout.json"
#: Side of a viewer chunk, in voxels (about 1 MiB of uint32 for a 64^3 chunk).
VIEWER_CHUNK = 64
#: A level computed inside a chunk's task keeps at least this many voxels per core side.
MIN_FUSED = 16
#: Longest side of the coarsest pyramid level.
PYRAMID_TARGET = 256
#: Metres per unit, to express the table's physical columns in micrometres.
_METERS = {"angstrom": 1e-10, "picometer": 1e-12, "nanometer": 1e-9, "micrometer": 1e-6,
           "millimeter": 1e-3, "centimeter": 1e-2, "decimeter": 1e-1, "meter": 1.0}


def labels_uri(run: RunContext) -> str:
    return U.join(run.params.output, "labels.zarr")


# -- the layout of labels.zarr --------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    """One dataset of ``labels.zarr``.

    ``factor`` relates it to the segmented grid: a pyramid level's voxel covers ``factor``
    segmented voxels; the full-resolution level has ``factor`` full voxels per segmented
    voxel (``role == "full"``). ``region`` is the level's box per core for the levels a
    chunk's task writes (``segmented``, ``fused``, ``full``).
    """

    path: str
    role: str  # "full", "segmented", "fused" or "reduced"
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    factor: tuple[int, ...]
    step: tuple[int, ...]  # factor relative to the level before (pyramid levels)
    scale: tuple[float, ...]
    translation: tuple[float, ...] | None


@dataclass(frozen=True)
class Layout:
    levels: tuple[Level, ...]
    dtype: str
    unit: str | None
    zarr_format: int

    def level(self, role: str) -> list[Level]:
        return [lv for lv in self.levels if lv.role == role]

    @property
    def segmented(self) -> Level:
        return self.level("segmented")[0]

    def to_json(self) -> dict:
        return {"levels": [asdict(lv) for lv in self.levels], "dtype": self.dtype, "unit": self.unit,
                "zarr_format": self.zarr_format}

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        def level(x):
            return Level(**{k: tuple(v) if isinstance(v, list) else v for k, v in x.items()})

        return cls(tuple(level(x) for x in d["levels"]), d["dtype"], d["unit"], d["zarr_format"])


def viewer_chunks(region) -> tuple[int, ...]:
    """Chunk shape for viewers that tiles ``region`` exactly: per axis the largest divisor of
    the region's side that is at most :data:`VIEWER_CHUNK` (the whole side when that divisor
    would be below 16, e.g. for a prime side)."""
    out = []
    for r in region:
        r = int(r)
        if r <= VIEWER_CHUNK:
            out.append(r)
            continue
        d = max(k for k in range(1, VIEWER_CHUNK + 1) if r % k == 0)
        out.append(d if d >= 16 else r)
    return tuple(out)


def _input_geometry(run: RunContext) -> dict:
    """Scale and translation (spatial axes) of level 0 and the segmented level of an OME-Zarr
    input, plus level 0's shape; empty for other inputs or when the metadata is unusable."""
    info = run.manifest.get("input") or {}
    if not str(info.get("format", "")).startswith("ome-zarr"):
        return {}
    try:
        group = zarr.open_group(run.params.input, mode="r", storage_options=U.storage_options(run.params.input) or None)
        ms = ome_attributes(group)["multiscales"][0]
        axes = axis_names(ms)
        zyx = [axes.index(a) for a in AXES]

        def transforms(ts):
            s, t = np.ones(len(axes)), np.zeros(len(axes))
            for tr in ts or []:
                if tr.get("type") == "scale":
                    s = s * np.asarray(tr["scale"], float)
                elif tr.get("type") == "translation":
                    t = t + np.asarray(tr["translation"], float)
            return s, t

        s_all, t_all = transforms(ms.get("coordinateTransformations"))
        out = {}
        for key, lv in (("full", 0), ("segmented", int(run.params.level))):
            s, t = transforms(ms["datasets"][lv].get("coordinateTransformations"))
            out[key] = {"scale": [float((s * s_all)[i]) for i in zyx],
                        "translation": [float((t * s_all + t_all)[i]) for i in zyx]}
        full = group[ms["datasets"][0]["path"]]
        out["full_shape"] = [int(full.shape[i]) for i in zyx]
        return out
    except Exception as e:  # metadata we cannot follow: labels only at the segmented level
        log.warning("could not read the input's NGFF transforms (%s: %s); labels.zarr gets the voxel size only",
                    type(e).__name__, e)
        return {}


def _unit(run: RunContext) -> str | None:
    if run.params.voxel_size is not None:
        return "micrometer"
    return (run.manifest.get("input") or {}).get("unit") or None


def voxel_size_um(run: RunContext) -> tuple[float, ...]:
    """Voxel size of the segmented grid in micrometres (1 per axis when unknown)."""
    vs = run.manifest.get("voxel_size") or [1.0] * run.grid.ndim
    unit = _unit(run)
    k = _METERS[unit] / 1e-6 if unit in _METERS else 1.0
    return tuple(float(v) * k for v in vs)


def plan_layout(run: RunContext, dtype: str) -> Layout:
    """Decide every dataset of ``labels.zarr`` for this run (pure geometry, no writes)."""
    g = run.grid
    nd = g.ndim
    fmt = int(run.params.zarr_format)
    geo = _input_geometry(run)
    own = run.params.voxel_size is None  # else the user's voxel size replaces the input's transforms
    s_seg = tuple(float(v) for v in (run.manifest.get("voxel_size") or [1.0] * nd))
    t_seg = tuple(geo["segmented"]["translation"]) if geo and own else (0.0,) * nd
    levels: list[Level] = []

    def shards_for(chunks, region):
        return tuple(region) if fmt == 3 and tuple(chunks) != tuple(region) else None

    # the input's full resolution, when a downsampled level was segmented
    if run.params.level > 0 and geo:
        ratio = [b / a for a, b in zip(geo["full"]["scale"], geo["segmented"]["scale"])]
        f = tuple(max(1, int(round(r))) for r in ratio)
        if any(abs(r - k) > 1e-6 * k for r, k in zip(ratio, f)):  # not integers: trust the shapes
            f = tuple(max(1, int(round(a / b))) for a, b in zip(geo["full_shape"], g.shape))
        full_shape = tuple(geo["full_shape"])
        log.debug("input level %d has scale %s, level 0 %s: full-resolution factors %s",
                  run.params.level, geo["segmented"]["scale"], geo["full"]["scale"], f)
        if any(k > 1 for k in f) and all(n <= s * k + k - 1 for n, s, k in zip(full_shape, g.shape, f)):
            region = tuple(min(c * k, n) for c, k, n in zip(g.chunk_shape, f, full_shape))
            chunks = viewer_chunks(region)
            scale = tuple(geo["full"]["scale"]) if own else tuple(s / k for s, k in zip(s_seg, f))
            shift = tuple(geo["full"]["translation"]) if own else (0.0,) * nd
            levels.append(Level("", "full", full_shape, chunks, shards_for(chunks, region), f, (1,) * nd,
                                scale, shift if any(shift) else None))
        elif any(k > 1 for k in f):
            log.warning("input level 0 %s is not level %d %s times %s; labels.zarr has no full-resolution level",
                        full_shape, run.params.level, g.shape, f)

    region = tuple(min(c, n) for c, n in zip(g.chunk_shape, g.shape))
    chunks = viewer_chunks(region)
    levels.append(Level("", "segmented", g.shape, chunks, shards_for(chunks, region), (1,) * nd,
                        (1,) * nd, s_seg, t_seg if any(t_seg) else None))

    steps = P.level_factors(g.shape, s_seg, target=PYRAMID_TARGET)
    cumulative = P.cumulative_factors(steps, nd)
    fused = True
    for step, F in zip(steps, cumulative[1:]):
        shape = P.downsampled_shape(g.shape, F)
        if fused:
            fused = all(n == 1 or k == 1 or (c % k == 0 and c // k >= MIN_FUSED)
                        for n, c, k in zip(g.grid_shape, g.chunk_shape, F))
            if not fused:
                log.debug("pyramid levels from factor %s on are built by the report: the chunk shape %s is not "
                          "a multiple of %s with at least %d voxels a side per core", F, g.chunk_shape, F, MIN_FUSED)
        scale = tuple(s * k for s, k in zip(s_seg, F))
        translation = tuple(t + (k - 1) / 2 * s for t, k, s in zip(t_seg, F, s_seg))
        if fused:
            region = tuple(min(P.downsampled_shape([c], [k])[0], n) for c, k, n in zip(g.chunk_shape, F, shape))
            ch = viewer_chunks(region)
            levels.append(Level("", "fused", shape, ch, shards_for(ch, region), F, step, scale, translation))
        else:
            ch = tuple(min(VIEWER_CHUNK, n) for n in shape)
            levels.append(Level("", "reduced", shape, ch, None, F, step, scale, translation))
    levels = [Level(**{**asdict(lv), "path": str(i)}) for i, lv in enumerate(levels)]
    return Layout(tuple(levels), str(np.dtype(dtype)), _unit(run), fmt)


def layout(run: RunContext) -> Layout:
    return Layout.from_json(U.read_json(run.path(LAYOUT)))


def _source_image(run: RunContext) -> str | None:
    """The input as seen from ``labels.zarr`` (relative when both are local), for OME-Zarr inputs."""
    info = run.manifest.get("input") or {}
    if not str(info.get("format", "")).startswith("ome-zarr"):
        return None
    src, here = str(run.params.input), labels_uri(run)
    if not U.is_remote(src) and not U.is_remote(here):
        return os.path.relpath(os.path.abspath(src), os.path.abspath(here))
    return src


def ngff_attributes(run: RunContext, lay: Layout) -> dict:
    """The group attributes of ``labels.zarr`` (without the 0.5 ``ome`` wrapper)."""
    axes = [{"name": a, "type": "space", **({"unit": lay.unit} if lay.unit else {})} for a in AXES[-run.grid.ndim:]]
    datasets = []
    for lv in lay.levels:
        transforms = [{"type": "scale", "scale": list(lv.scale)}]
        if lv.translation is not None:
            transforms.append({"type": "translation", "translation": list(lv.translation)})
        datasets.append({"path": lv.path, "coordinateTransformations": transforms})
    multiscale = {
        "name": "cells",
        "axes": axes,
        "datasets": datasets,
        "type": "mode",
        "metadata": {
            "description": "zseg cell labels; each pyramid level takes the most frequent label of each "
                           "window of the level below (ties: a cell over background, then the smaller label)",
            "method": "zseg.engine.pyramid.downsample_mode",
            "version": __version__,
        },
    }
    image_label: dict = {}
    source = _source_image(run)
    if source:
        image_label["source"] = {"image": source}
    if lay.zarr_format == 2:
        multiscale["version"] = "0.4"
        image_label["version"] = "0.4"
    return {"multiscales": [multiscale], "image-label": image_label}


def create_labels(run: RunContext, dtype: str):
    """Create ``labels.zarr``: NGFF metadata and every (empty) dataset; remember the layout."""
    uri = labels_uri(run)
    lay = plan_layout(run, dtype)
    fmt = lay.zarr_format
    group = zarr.open_group(uri, mode="w", zarr_format=fmt, storage_options=U.storage_options(uri) or None)
    meta = ngff_attributes(run, lay)
    set_ome_attributes(group, meta, fmt)
    for lv in lay.levels:
        create_array(U.join(uri, lv.path), shape=lv.shape, chunks=lv.chunks, shards=lv.shards, dtype=lay.dtype,
                     zarr_format=fmt, overwrite=True, dimension_names=list(AXES[-run.grid.ndim:]) if fmt == 3 else None)
    U.write_json(run.path(LAYOUT), lay.to_json())
    log.info("labels.zarr: %d datasets (%s), %s, chunks %s",
             len(lay.levels), ", ".join(f"{lv.role} {lv.shape}" for lv in lay.levels), lay.dtype,
             lay.segmented.chunks)
    return open_array(U.join(uri, lay.segmented.path), mode="r+")


def open_labels(run: RunContext, mode: str = "r", level: Level | None = None):
    """A dataset of ``labels.zarr``; by default the segmented level (the run's grid)."""
    path = (level or layout(run).segmented).path
    return open_array(U.join(labels_uri(run), path), mode=mode)


def _region(core, factor, shape) -> tuple[slice, ...]:
    """The box of a pyramid level under ``core`` (core starts are multiples of ``factor``)."""
    return tuple(slice(s.start // k, min(-(-s.stop // k), n)) for s, k, n in zip(core, factor, shape))


# -- per chunk: the labels stage ------------------------------------------------------------------
def write_levels(run: RunContext, index: int, core_labels: np.ndarray, lay: Layout | None = None) -> None:
    """Write the core of chunk ``index`` into every level a chunk's task writes."""
    lay = lay or layout(run)
    g = run.grid
    core = g.core(index)
    open_labels(run, "r+", lay.segmented)[core] = core_labels
    data = core_labels
    for lv in lay.level("fused"):
        data = P.downsample_mode(data, lv.step)
        open_labels(run, "r+", lv)[_region(core, lv.factor, lv.shape)] = data
    for lv in lay.level("full"):
        _write_full(run, lv, core, core_labels)


def _write_full(run: RunContext, lv: Level, core, core_labels: np.ndarray) -> None:
    """The core at the input's full resolution, in z slabs of at most about one core of voxels."""
    g = run.grid
    f = lv.factor
    box = tuple(slice(s.start * k, n if s.stop == m else s.stop * k)
                for s, k, n, m in zip(core, f, lv.shape, g.shape))
    arr = open_labels(run, "r+", lv)
    nz = core_labels.shape[0]
    per_slab = max(1, nz // max(1, math.prod(f) // 8)) if math.prod(f) > 8 else nz
    for z0 in range(0, nz, per_slab):
        z1 = min(nz, z0 + per_slab)
        zs = slice(box[0].start + z0 * f[0], box[0].stop if z1 == nz else box[0].start + z1 * f[0])
        shape = (zs.stop - zs.start, *(b.stop - b.start for b in box[1:]))
        arr[(zs, *box[1:])] = P.upsample_nearest(core_labels[z0:z1], f, shape)


# -- once: the report stage -----------------------------------------------------------------------
def build_reduced_levels(run: RunContext, lay: Layout | None = None) -> int:
    """Build the pyramid levels that no chunk task could, tile by tile from the level below.

    Memory is one output chunk and its window in the level below. Returns the number of
    tiles written.
    """
    lay = lay or layout(run)
    tiles = 0
    for i, lv in enumerate(lay.levels):
        if lv.role != "reduced":
            continue
        below = open_labels(run, "r", lay.levels[i - 1])
        out = open_labels(run, "r+", lv)
        grid = [range(0, n, c) for n, c in zip(lv.shape, lv.chunks)]
        log.info("pyramid level %s %s: %d tiles from level %s", lv.path, lv.shape,
                 math.prod(len(r) for r in grid), lay.levels[i - 1].path)
        for start in np.ndindex(*[len(r) for r in grid]):
            box = tuple(slice(s * c, min((s + 1) * c, n)) for s, c, n in zip(start, lv.chunks, lv.shape))
            src = tuple(slice(b.start * k, min(b.stop * k, n)) for b, k, n in zip(box, lv.step, below.shape))
            out[box] = P.downsample_mode(np.asarray(below[src]), lv.step)
            tiles += 1
    return tiles
