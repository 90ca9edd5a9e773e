"""``zseg crops``: random 2D crops of a volume's YX, ZY and ZX planes for labelling and training,
as Cellpose's ``make_train.py`` makes them, reading only the crop windows.

For each view, up to ``nimg_per_tif`` planes are drawn without repeats (capped by the planes of
that axis) and in each a ``crop_size`` square window (the whole plane along a shorter side) at a
random place. The views are ``make_train.py``'s: ``YX`` (planes along Z), ``ZY`` (planes along X,
axes Z and Y) and ``ZX`` (planes along Y, axes Z and X). In ZY and ZX planes Z is stretched by the
anisotropy (``int(anisotropy * Z)`` rows, linear, as ``cv2.resize``); the window is placed in the
stretched plane and only the input rows it reads are read (:mod:`zseg.engine.interp` computes
the window's rows in the whole plane's coordinates, so a window equals the same window of the
whole resized plane).

Each crop is a float32 TIFF ``OUTDIR/{name}_{view}_{k}.tif`` (``(Y, X)``, or ``(Y, X, C)`` with
several channels, what ``make_train.py`` writes and the Cellpose GUI opens); ``OUTDIR/crops.json``
lists every crop's view, plane and window in the volume.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import tifffile

from zseg.engine import interp
from zseg.errors import UserError
from zseg.storage import uri as U
from zseg.storage.volume import open_volume

#: make_train.py's views: name -> (the axis planes are taken along, the plane's row axis, its column axis)
VIEWS = {"YX": (0, 1, 2), "ZY": (2, 0, 1), "ZX": (1, 0, 2)}
INDEX = "crops.json"


def _name(uri: str) -> str:
    base = os.path.basename(str(uri).rstrip("/"))
    for ext in (".zarr", ".tiff", ".tif", ".ome"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
    return base or "volume"


def make_crops(volume_uri: str, outdir: str, *, crop_size: int = 512, nimg_per_tif: int = 10,
               anisotropy: float | None = None, channels=None, axes=None, channel_axis=None, z_axis=None,
               seed: int = 0, overwrite: bool = False) -> dict:
    """Write the crops; return what was written (``crops.json``'s content)."""
    if crop_size < 16:
        raise UserError(f"--crop-size {crop_size}: give at least 16 pixels (Cellpose's default is 512).")
    if nimg_per_tif < 1:
        raise UserError(f"--nimg-per-tif {nimg_per_tif}: give at least 1 crop per view.")
    if anisotropy is not None and not (anisotropy > 0 and math.isfinite(anisotropy)):
        raise UserError(f"--anisotropy {anisotropy}: give a positive number (Z spacing over YX spacing).")
    vol = open_volume(volume_uri, axes=axes, channels=channels, channel_axis=channel_axis, z_axis=z_axis)
    if U.exists(outdir) and U.listdir(outdir) and not overwrite:
        raise UserError(f"{outdir!r} exists and is not empty; choose a new folder or pass --overwrite.")
    if anisotropy is None:
        vs = vol.voxel_size
        anisotropy = float(vs[0] / vs[1]) if vs else 1.0
    rng = np.random.default_rng(seed)
    name = _name(volume_uri)
    shape = tuple(vol.shape)
    written = []
    for view, (a, r, c) in VIEWS.items():
        stretch = view != "YX" and anisotropy != 1.0  # Z is the plane's row axis in ZY and ZX
        rows = int(anisotropy * shape[r]) if stretch else shape[r]
        if rows < 1:
            raise UserError(f"--anisotropy {anisotropy} shrinks the {shape[r]} planes of Z to nothing.")
        planes = rng.permutation(shape[a])[:nimg_per_tif]
        for k, plane in enumerate(int(p) for p in planes):
            h, w = min(crop_size, rows), min(crop_size, shape[c])
            r0 = int(rng.integers(0, rows - h + 1))
            c0 = int(rng.integers(0, shape[c] - w + 1))
            src = interp.source_range(shape[r], rows, r0, r0 + h) if stretch else (r0, r0 + h)
            box = [None, None, None]
            box[a], box[r], box[c] = slice(plane, plane + 1), slice(*src), slice(c0, c0 + w)
            data = vol.read(tuple(box)).astype(np.float32)  # (C, z, y, x)
            data = np.moveaxis(data, (r + 1, c + 1), (1, 2)).reshape(data.shape[0], src[1] - src[0], w)
            if stretch:
                data = interp.resize_rows(data, 1, shape[r], rows, r0, r0 + h, src[0])
            image = data[0] if data.shape[0] == 1 else np.moveaxis(data, 0, -1)
            fname = f"{name}_{view}_{k}.tif"
            buf = io.BytesIO()
            tifffile.imwrite(buf, np.ascontiguousarray(image, dtype=np.float32), photometric="minisblack")
            U.write_bytes(U.join(outdir, fname), buf.getvalue())
            written.append({"file": fname, "view": view, "plane": plane, "rows": [r0, r0 + h], "cols": [c0, c0 + w],
                            "shape": list(image.shape)})
    index = {"input": str(volume_uri), "shape": list(shape), "anisotropy": anisotropy, "crop_size": crop_size,
             "nimg_per_tif": nimg_per_tif, "seed": seed, "crops": written}
    U.write_json(U.join(outdir, INDEX), index)
    return index
