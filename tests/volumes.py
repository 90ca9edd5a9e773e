"""Test volumes written as users give them: an OME-Zarr image with its flow store beside it, and
the same data in every input format zseg reads, locally or on S3."""

from __future__ import annotations

import numpy as np
import tifffile

from zseg.storage.arrays import create_array
from zseg.storage.omezarr import write_ome_zarr
from zseg.storage.uri import filesystem


def write_volume(base: str, image: np.ndarray, flows: np.ndarray | None = None, *, chunks=(8, 16, 16),
                 axes: str = "zyx", voxel_size=(1.0, 1.0, 1.0), **ome) -> dict:
    """``base``/image.ome.zarr (spatial chunks ``chunks``, one channel per chunk) and, with
    ``flows``, ``base``/flows.zarr as float16 with all flow channels in a chunk. ``base`` is a
    local path or an ``s3://`` URI; ``ome`` goes to :func:`write_ome_zarr` (labels, channel names)."""
    chunks = tuple(chunks)
    out = {"image": f"{base}/image.ome.zarr"}
    write_ome_zarr(out["image"], image, axes=axes, voxel_size=voxel_size,
                   chunks=(1, *chunks) if axes.startswith("c") else chunks, **ome)
    if flows is not None:
        out["flows"] = f"{base}/flows.zarr"
        arr = create_array(out["flows"], shape=flows.shape, chunks=(flows.shape[0], *chunks), dtype="float16")
        arr[...] = flows.astype(np.float16)
    return out


#: Two channels of random intensities, (C, Z, Y, X), and their names and voxel size (z, y, x µm).
SOURCE = np.random.default_rng(0).integers(0, 4000, size=(2, 12, 16, 20), dtype=np.uint16)
NAMES = ["DAPI", "GFP"]
VOXEL = (2.0, 0.5, 0.25)  # z, y, x micrometres


def put_file(local_path: str, uri: str) -> str:
    """Upload a local file to ``uri`` (an s3:// URI); return ``uri``."""
    fs, path = filesystem(uri)
    fs.put(local_path, path)
    return uri


def write_format(fmt: str, base: str, tmp, data=SOURCE) -> str:
    """Write ``data`` (C, Z, Y, X) as ``fmt`` under ``base``; return its URI."""
    if fmt in ("ome-zarr-0.4", "ome-zarr-0.5"):
        uri = f"{base}/{fmt}.ome.zarr"
        write_ome_zarr(uri, data, axes="czyx", voxel_size=VOXEL, chunks=(1, 5, 8, 8),
                       zarr_format=2 if fmt.endswith("0.4") else 3, levels=2,
                       channel_names=NAMES)
    elif fmt in ("zarr-v2", "zarr-v3"):
        uri = f"{base}/{fmt}.zarr"
        arr = create_array(uri, shape=data.shape, chunks=(1, 5, 8, 8), dtype=data.dtype,
                           zarr_format=int(fmt[-1]))
        arr[...] = data
    else:  # ImageJ hyperstack, stored Z, C, Y, X
        local = str(tmp / "stack.tif")
        tifffile.imwrite(local, np.ascontiguousarray(data.transpose(1, 0, 2, 3)), imagej=True,
                         resolution=(1 / VOXEL[2], 1 / VOXEL[1]),
                         metadata={"axes": "ZCYX", "spacing": VOXEL[0], "unit": "um"})
        uri = f"{base}/stack.tif"
        if base.startswith("s3://"):
            put_file(local, uri)
        else:
            uri = local
    return uri
