"""Writing an in-memory image (and label images) as OME-Zarr: 0.5 on zarr v3, 0.4 on zarr v2.

Used by the synthetic-data generator and the tests; the pipeline's own outputs are written
chunk by chunk through :mod:`zseg.storage.arrays`.
"""

from __future__ import annotations

import numpy as np
import zarr

from zseg.errors import UserError
from zseg.storage.arrays import _exists, zarr_store

_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_COLORS = ("FFFFFF", "00FF00", "FF00FF", "00FFFF", "FFFF00", "FF0000", "0000FF")


def write_ome_zarr(
    uri: str,
    image,
    *,
    axes: str | None = None,
    voxel_size=None,
    unit: str | None = "micrometer",
    chunks=None,
    zarr_format: int = 3,
    levels: int = 1,
    channel_names=None,
    labels: dict | None = None,
    overwrite: bool = False,
    name: str | None = None,
) -> zarr.Group:
    """Write ``image`` as an OME-Zarr multiscale image at ``uri``.

    Parameters
    ----------
    uri : str
        Root of the image group (local path or ``s3://...``).
    image : (C, Z, Y, X) or (Z, Y, X) array_like
        Pixels; any axis order from ``t, c, z, y, x`` in that order (see ``axes``).
    axes : str, optional
        One letter per axis of ``image``, a subsequence of ``"tczyx"`` containing ``y`` and
        ``x``. Default: ``"zyx"`` for 3D, ``"czyx"`` for 4D, ``"yx"``/``"tczyx"`` for 2D/5D.
    voxel_size : sequence of float, optional
        Size of a level-0 voxel along each spatial axis of ``axes`` (``(z, y, x)`` for a
        volume), in ``unit``. Default: 1 along each.
    unit : str, optional
        NGFF unit name of the spatial axes (``"micrometer"``); None writes no unit.
    chunks : sequence of int, optional
        Chunk shape, one value per axis (clipped to each level's shape). Default: 1 along
        t and c, up to 64 along z and 256 along y and x.
    zarr_format : {3, 2}
        3 writes OME-Zarr 0.5 metadata, 2 writes OME-Zarr 0.4.
    levels : int
        Number of resolution levels. Level ``l`` halves y and x ``l`` times (floor; the mean
        of each 2x2 block, rounded for integer images); its scale transform is multiplied by
        ``2**l`` along y and x, with the matching half-voxel translation.
    channel_names : sequence of str, optional
        One name per channel, stored as ``omero.channels[].label``.
    labels : dict of str to array_like, optional
        Label images of integer dtype with the image's shape without the c axis, written
        into the NGFF ``labels/`` group as ``image-label`` images with the image's levels
        (level ``l`` keeps every ``2**l``-th voxel along y and x: no new label values).
    overwrite : bool
        Replace whatever is at ``uri``; without it an existing ``uri`` is refused.
    name : str, optional
        Name of the multiscale image.

    Returns
    -------
    zarr.Group
        The image group.
    """
    uri = str(uri)
    image = np.asarray(image)
    axes = _check_axes(axes, image.ndim)
    spatial = [a for a in axes if a in "zyx"]
    voxel_size = [1.0] * len(spatial) if voxel_size is None else [float(v) for v in voxel_size]
    if len(voxel_size) != len(spatial):
        raise ValueError(f"voxel_size {voxel_size} needs one value per axis of {''.join(spatial)}")
    if zarr_format not in (2, 3):
        raise ValueError(f"zarr_format must be 2 or 3, not {zarr_format!r}")
    if levels < 1 or min(image.shape[axes.index(a)] for a in "yx") >> (levels - 1) < 1:
        raise ValueError(f"{levels} levels do not fit an image of shape {image.shape}")
    if chunks is None:
        chunks = [{"t": 1, "c": 1, "z": 64}.get(a, 256) for a in axes]
    if len(chunks) != image.ndim:
        raise ValueError(f"chunks {chunks} needs one value per axis of {axes!r}")
    nchan = image.shape[axes.index("c")] if "c" in axes else 1
    if channel_names is not None and len(channel_names) != nchan:
        raise ValueError(f"channel_names {channel_names} needs {nchan} names, one per channel")
    if not overwrite and _exists(uri):
        raise UserError(
            f"output {uri} already exists; remove it, choose another output, "
            "or pass --overwrite to replace it."
        )

    root = zarr.open_group(zarr_store(uri, read_only=False), mode="w", zarr_format=zarr_format)
    scales, data = [], image
    for level in range(levels):
        if level:
            data = _halve(data, axes)
        _write_array(root, str(level), data, axes, chunks, zarr_format)
        scales.append([v * (2**level if a in "yx" else 1) for a, v in zip(spatial, voxel_size)])
    multiscale = _multiscale(axes, unit, scales, name, zarr_format, downscaled=levels > 1)
    attrs: dict = {"multiscales": [multiscale]}
    if channel_names is not None or "c" in axes:
        attrs["omero"] = _omero(image, axes, channel_names)
    set_ome_attributes(root, attrs, zarr_format)

    if labels:
        label_axes = axes.replace("c", "")
        label_chunks = [c for a, c in zip(axes, chunks) if a != "c"]
        label_shape = tuple(n for a, n in zip(axes, image.shape) if a != "c")
        group = root.create_group("labels")
        set_ome_attributes(group, {"labels": list(labels)}, zarr_format)
        for label_name, label in labels.items():
            label = np.asarray(label)
            if label.shape != label_shape or label.dtype.kind not in "iu":
                raise ValueError(
                    f"label image {label_name!r} must be integer with shape {label_shape}, "
                    f"not {label.dtype} {label.shape}"
                )
            sub = group.create_group(label_name)
            for level in range(levels):
                if level:
                    label = _halve(label, label_axes, nearest=True)
                _write_array(sub, str(level), label, label_axes, label_chunks, zarr_format)
            ms = _multiscale(label_axes, unit, scales, label_name, zarr_format, False)
            image_label = {"source": {"image": "../../"}}
            if zarr_format == 2:
                image_label["version"] = "0.4"
            set_ome_attributes(sub, {"multiscales": [ms], "image-label": image_label}, zarr_format)
    return root


def _check_axes(axes, ndim: int) -> str:
    if axes is None:
        axes = {2: "yx", 3: "zyx", 4: "czyx", 5: "tczyx"}.get(ndim, "")
    it = iter("tczyx")
    ordered = all(a in it for a in axes)  # a subsequence of "tczyx"
    if len(axes) != ndim or not ordered or "y" not in axes or "x" not in axes:
        raise ValueError(
            f"axes {axes!r} must name each of the image's {ndim} axes in the order t, c, z, y, x"
        )
    return axes


def _halve(data: np.ndarray, axes: str, nearest: bool = False) -> np.ndarray:
    """Halve y and x: the mean of each 2x2 block, or its first voxel when ``nearest``.

    Odd trailing rows/columns are dropped; the dtype is kept (means of integers rounded).
    """
    iy, ix = axes.index("y"), axes.index("x")
    ny, nx = data.shape[iy] // 2, data.shape[ix] // 2
    if nearest:
        return data[tuple(slice(0, 2 * ny, 2) if i == iy else slice(0, 2 * nx, 2) if i == ix
                          else slice(None) for i in range(data.ndim))]
    trimmed = data[tuple(slice(0, 2 * ny) if i == iy else slice(0, 2 * nx) if i == ix
                         else slice(None) for i in range(data.ndim))]
    shape = []
    for i, n in enumerate(trimmed.shape):
        shape += [n // 2, 2] if i in (iy, ix) else [n]
    split_y = iy + (1 if ix < iy else 0)
    split_x = ix + (1 if iy < ix else 0)
    mean = trimmed.reshape(shape).mean(axis=(split_y + 1, split_x + 1), dtype=np.float64)
    if data.dtype.kind in "iub":
        mean = np.round(mean)
    return mean.astype(data.dtype)


def _write_array(group: zarr.Group, path: str, data, axes: str, chunks, zarr_format: int):
    extra = (
        {"dimension_names": list(axes)}
        if zarr_format == 3
        else {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
    )
    array = group.create_array(
        path,
        shape=data.shape,
        dtype=data.dtype,
        chunks=tuple(max(1, min(int(c), n)) for c, n in zip(chunks, data.shape)),
        fill_value=0,
        **extra,
    )
    array[...] = data


def _multiscale(axes, unit, scales, name, zarr_format, downscaled) -> dict:
    spatial = [a for a in axes if a in "zyx"]
    ms_axes = []
    for a in axes:
        axis = {"name": a, "type": _AXIS_TYPES[a]}
        if a in "zyx" and unit:
            axis["unit"] = unit
        ms_axes.append(axis)
    datasets = []
    for level, scale in enumerate(scales):
        by_axis = dict(zip(spatial, scale))
        transforms = [{"type": "scale", "scale": [by_axis.get(a, 1.0) for a in axes]}]
        if level:  # the centre of a 2**level block of level-0 voxels
            shift = {a: (2**level - 1) / 2 * by_axis[a] / 2**level for a in "yx"}
            transforms.append(
                {"type": "translation", "translation": [shift.get(a, 0.0) for a in axes]}
            )
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    multiscale = {"axes": ms_axes, "datasets": datasets}
    if name:
        multiscale["name"] = name
    if downscaled:
        multiscale["type"] = "mean"
    if zarr_format == 2:
        multiscale["version"] = "0.4"
    return multiscale


def _omero(image: np.ndarray, axes: str, channel_names) -> dict:
    ic = axes.index("c") if "c" in axes else None
    nchan = image.shape[ic] if ic is not None else 1
    channels = []
    for i in range(nchan):
        plane = np.take(image, i, axis=ic) if ic is not None else image
        lo, hi = (float(plane.min()), float(plane.max())) if plane.size else (0.0, 0.0)
        channel = {
            "color": _COLORS[i % len(_COLORS)],
            "window": {"min": lo, "max": hi, "start": lo, "end": hi},
            "active": True,
        }
        if channel_names is not None:
            channel["label"] = str(channel_names[i])
        channels.append(channel)
    return {"channels": channels}


def ome_attributes(group: zarr.Group, zarr_format: int | None = None) -> dict:
    """The OME-NGFF attributes of a zarr group: under ``"ome"`` (NGFF 0.5, zarr v3) or at the top
    (0.4). With ``zarr_format=2`` only the top level is read (0.4 has no ``"ome"`` key). The one
    reader of NGFF metadata: inputs, the input's transforms for the labels, and ``zseg verify``."""
    attrs = group.attrs.asdict()
    return attrs if zarr_format == 2 else attrs.get("ome", attrs)


def axis_names(multiscale: dict) -> list:
    """The axis names of a multiscale (NGFF 0.4+ dicts, or 0.3's plain strings)."""
    return [a.get("name") if isinstance(a, dict) else a for a in multiscale.get("axes") or []]


def set_ome_attributes(group: zarr.Group, attrs: dict, zarr_format: int) -> None:
    """Write NGFF attributes: wrapped in ``{"ome": {"version": "0.5", ...}}`` on zarr v3, as they
    are (0.4) on v2. The one writer: ``zseg synth`` images and ``labels.zarr``."""
    if zarr_format == 3:
        group.attrs.update({"ome": {"version": "0.5", **attrs}})
    else:
        group.attrs.update(attrs)
