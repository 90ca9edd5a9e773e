"""Opening an input volume: OME-Zarr 0.4/0.5, plain zarr v2/v3 arrays, TIFF; local or remote.

:func:`open_volume` reads only metadata; it checks everything a run needs (a z axis, the
channels, the resolution level, a dtype zseg can segment) and raises a
:class:`~zseg.errors.UserError` that says what to change. :meth:`Volume.read` then reads one
box of the selected channels. A :class:`Volume` pickles as its open arguments and metadata
and re-opens its array on first use in the worker process.

TIFF files are read through tifffile's zarr store (``TiffPageSeries.aszarr``), page by page
(or tile by tile); on S3 through an fsspec file handle with a small read-ahead block, so only
the header and the pages a box needs are fetched.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import numpy as np
import tifffile
import zarr
import zarr.errors

from zseg.errors import UserError
from zseg.storage.arrays import CheckedArray, zarr_store
from zseg.storage.omezarr import ome_attributes
from zseg.storage.uri import filesystem, is_remote, join

Box = tuple[slice, slice, slice]

SUPPORTED_DTYPES = (
    "uint8", "uint16", "uint32", "int8", "int16", "int32", "float16", "float32", "float64",
)
FORMATS = ("ome-zarr-0.4", "ome-zarr-0.5", "zarr-v2", "zarr-v3", "tiff")
MAX_CHANNELS = 3

_DEFAULT_AXES = {2: "yx", 3: "zyx", 4: "czyx", 5: "tczyx"}
# tifffile series axes -> ours; Q and I are unnamed page sequences, S is samples (RGB)
_TIFF_AXES = {"T": "t", "C": "c", "S": "c", "Z": "z", "Q": "z", "I": "z", "Y": "y", "X": "x"}
_OTHER = "_"  # an axis we do not use: allowed only with size 1, read at index 0
_TIFF_BLOCK_SIZE = 2**18  # read-ahead of a remote TIFF handle, bytes

_UNITS = {  # spellings in TIFF metadata -> NGFF (UDUNITS) names
    "um": "micrometer", "µm": "micrometer", "μm": "micrometer", "\\u00b5m": "micrometer",
    "micron": "micrometer", "microns": "micrometer", "micrometer": "micrometer",
    "nm": "nanometer", "nanometer": "nanometer", "mm": "millimeter", "millimeter": "millimeter",
    "cm": "centimeter", "centimeter": "centimeter", "m": "meter", "meter": "meter",
    "a": "angstrom", "å": "angstrom", "angstrom": "angstrom", "pm": "picometer",
}
_METERS = {
    "angstrom": 1e-10, "picometer": 1e-12, "nanometer": 1e-9, "micrometer": 1e-6,
    "millimeter": 1e-3, "centimeter": 1e-2, "decimeter": 1e-1, "meter": 1.0,
}


@dataclass(frozen=True)
class _Source:
    """Where the pixels are and how the stored array's axes map to ours."""

    kind: str  # "zarr" or "tiff"
    uri: str  # the array (zarr) or the file (tiff)
    level: int  # resolution level (for zarr the array uri already names it)
    axes: str  # one letter per stored axis from "tczyx_"
    shape: tuple[int, ...]  # stored shape
    timepoint: int
    channels: tuple[int, ...]  # indices along the c axis in the user's order; (0,) without c


class _Lazy:
    """Open file handles kept in ``self._open``: dropped when pickled (a worker re-opens them on
    first use), closed on :meth:`close` and when the object goes."""

    _open: dict

    def close(self) -> None:
        """Release open file handles (reading again re-opens them)."""
        _close(self._open)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


@dataclass
class Volume(_Lazy):
    """An opened input volume: metadata plus lazy access to a box of the selected channels.

    Attributes
    ----------
    uri : str
        The input as given.
    format : str
        One of ``FORMATS``.
    shape : tuple of int, (Z, Y, X)
        Spatial shape in voxels at the chosen level.
    dtype : numpy.dtype
        Native-byte-order dtype of the pixels; :meth:`read` returns it.
    channel_names : list of str or None
        Names of the selected channels, in the selected order (None where unnamed).
    voxel_size : tuple of float, (Z, Y, X), or None
        Physical size of a voxel at the chosen level, in ``unit``; None when unknown.
    unit : str or None
        Unit of ``voxel_size`` (an NGFF unit name such as ``"micrometer"``).
    chunks : tuple of int, (Z, Y, X), or None
        Chunk shape of the stored array (TIFF: page or tile) along z, y, x.
    """

    uri: str
    format: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    channel_names: list
    voxel_size: tuple[float, float, float] | None
    unit: str | None
    chunks: tuple[int, int, int] | None
    _source: _Source = field(repr=False)
    _open: dict = field(default_factory=dict, repr=False, compare=False)
    #: A :class:`zseg.storage.fingerprint.Reads` that checks every box read against the run's
    #: fingerprint of the store (set by the run that reads it; None: unchecked).
    reads: object = field(default=None, repr=False, compare=False)

    @property
    def nchannels(self) -> int:
        """Number of selected channels (the C of :meth:`read`)."""
        return len(self._source.channels)

    def read(self, box: Box) -> np.ndarray:
        """Read ``box`` of the selected channels.

        Parameters
        ----------
        box : tuple of 3 slice
            Half-open ``[start, stop)`` intervals along Z, Y, X (``None`` ends allowed),
            inside :attr:`shape`.

        Returns
        -------
        (C, z, y, x) ndarray of :attr:`dtype`
            Channels in the selected order; only the chunks/pages under ``box`` are read.
        """
        box = _check_box(box, self.shape)
        src = self._source
        if self.reads is not None:
            self.reads.check(self.array_ranges(box))
        data = read_selection(self._array(), src.axes, src.shape, src.channels, dict(zip("zyx", box)),
                              timepoint=src.timepoint)
        return np.ascontiguousarray(data, dtype=self.dtype)

    def array_ranges(self, box) -> list[tuple[int, int]]:
        """The ``[start, stop)`` range of each axis of the stored array that reading ``box``
        (Z, Y, X slices within :attr:`shape`) touches."""
        src = self._source
        return selection_ranges(src.axes, src.channels, dict(zip("zyx", box)), timepoint=src.timepoint)

    def describe(self) -> dict:
        """A JSON-serialisable summary of the input, for the run manifest."""
        src = self._source
        return {
            "uri": self.uri,
            "format": self.format,
            "shape": list(self.shape),
            "dtype": self.dtype.name,
            "channels": list(src.channels),
            "channel_names": list(self.channel_names),
            "voxel_size": None if self.voxel_size is None else list(self.voxel_size),
            "unit": self.unit,
            "chunks": None if self.chunks is None else list(self.chunks),
            "level": src.level,
            "timepoint": src.timepoint,
            "array": src.uri,
            "array_axes": src.axes,
            "array_shape": list(src.shape),
        }

    def _array(self) -> zarr.Array:
        if "array" not in self._open:
            src = self._source
            if src.kind == "tiff":
                self._open.update(_open_tiff(src.uri, src.level))
            else:
                array = zarr.open_array(store=zarr_store(src.uri), mode="r")
                self._open["array"] = CheckedArray(array, src.uri)  # names a damaged chunk
        return self._open["array"]


def selection_ranges(axes: str, channels, boxes: dict, *, timepoint: int = 0) -> list[tuple[int, int]]:
    """The ``[start, stop)`` range of each axis of a stored array with axes ``axes`` that
    :func:`read_selection` of ``channels`` and ``boxes`` touches (a t axis at ``timepoint``,
    any other axis at 0)."""
    out = []
    for ax in axes:
        if ax == "c":
            out.append((min(channels), max(channels) + 1))
        elif ax in boxes:
            out.append((boxes[ax].start, boxes[ax].stop))
        else:
            t = timepoint if ax == "t" else 0
            out.append((t, t + 1))
    return out


def read_selection(array, axes: str, shape, channels, boxes: dict, *, timepoint: int = 0) -> np.ndarray:
    """Read ``channels`` (indices along the c axis, in this order) and the ``boxes`` (axis
    letter -> slice, in the output's axis order) of a stored array with axes ``axes``: only the
    chunks or pages under the box are read. A t axis is read at ``timepoint``, any other axis at 0.
    Returns ``(C, *box)``."""
    wanted = sorted(set(channels))
    selection, kept = [], []
    for ax, n in zip(axes, shape):
        if ax == "c":
            selection.append(slice(None) if len(wanted) == n else wanted)
            kept.append("c")
        elif ax in boxes:
            selection.append(boxes[ax])
            kept.append(ax)
        else:
            selection.append(timepoint if ax == "t" else 0)
    data = array.oindex[tuple(selection)]
    if "c" not in kept:
        data, kept = data[np.newaxis], ["c", *kept]
    data = np.transpose(data, [kept.index(a) for a in "c" + "".join(boxes)])
    if list(channels) != wanted:
        position = {c: i for i, c in enumerate(wanted)}
        data = data[[position[c] for c in channels]]
    return data


def require_input(uri: str) -> str:
    """The path of input ``uri`` on its file system (fresh for a remote one); ``UserError`` when
    it does not exist or cannot be read."""
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.invalidate_cache(path)
    try:
        found = fs.exists(path)
    except PermissionError as e:
        raise UserError(f"input {uri} cannot be read ({e}); check the AWS credentials.") from e
    if not found:
        raise UserError(f"input {uri} does not exist; check the path.")
    return path


def open_volume(uri, *, axes=None, level=0, channels=None, timepoint=0, channel_axis=None, z_axis=None) -> Volume:
    """Open an input volume and check that zseg can segment it.

    Parameters
    ----------
    uri : str or path
        An OME-Zarr image group (0.4 or 0.5), a zarr v2/v3 array, or a ``.tif``/``.tiff``
        file; a local path or ``s3://bucket/key``. Nothing but metadata is read.
    axes : str, optional
        Axis letters of a plain array or TIFF, from ``t, c, z, y, x`` (e.g. ``"czyx"``).
        Default: ``"zyx"`` for 3D and ``"czyx"`` for 4D arrays; the series axes for TIFF.
        OME-Zarr takes its axes from the metadata; a differing value is refused.
    level : int
        Resolution level of a multiscale input (OME-Zarr, pyramidal TIFF); 0 is full
        resolution. Other inputs have only level 0.
    channels : sequence of int or str, optional
        Up to 3 channels by index or OME channel name, in the order the network gets them.
        May be omitted when the input has a single channel.
    timepoint : int
        Index along the t axis, if there is one.
    channel_axis, z_axis : int, optional
        Cellpose's ``channel_axis`` and ``z_axis`` (0-based positions of the stored axes): for a
        plain array or a TIFF without named axes they name the axes (the others are y and x,
        last, and t before them); with ``axes`` or named axes they must agree.

    Returns
    -------
    Volume

    Raises
    ------
    UserError
        Missing input, unknown format, no z axis, bad level, channel or dtype.
    """
    uri = str(uri)
    path = require_input(uri)
    axes = positional_axes(uri, axes, channel_axis, z_axis, level)
    if path.lower().rstrip("/").endswith((".tif", ".tiff")):
        meta = _inspect_tiff(uri, axes, level)
    else:
        meta = _inspect_zarr(uri, axes, level)
    try:
        agree_with_positions(uri, meta["axes"], channel_axis, z_axis)
        return _volume(uri, meta, level, channels, timepoint)
    except BaseException:
        _close(meta["open"])
        raise


def _volume(uri: str, meta: dict, level, channels, timepoint) -> Volume:
    """Check what inspection found against the request and build the :class:`Volume`."""
    shape = tuple(meta["shape"])
    ax = meta["axes"]
    _check_spatial(uri, ax, shape)
    dtype = _check_dtype(uri, meta["dtype"])
    sizes = dict(zip(ax, shape))
    if "t" in ax:
        if not 0 <= int(timepoint) < sizes["t"]:
            raise UserError(
                f"timepoint {timepoint} is out of range: input {uri} has {sizes['t']} "
                f"timepoints (0-{sizes['t'] - 1}); choose --timepoint in that range."
            )
    elif timepoint != 0:
        raise UserError(f"timepoint {timepoint}: input {uri} has no t axis; leave timepoint at 0.")
    nchan = sizes.get("c", 1)
    names = meta.get("channel_names") or [None] * nchan
    if len(names) != nchan:
        names = [None] * nchan
    selected = _select_channels(uri, channels, nchan, names)
    zyx = [ax.index(a) for a in "zyx"]
    chunks = meta.get("chunks")
    source = _Source(
        kind=meta["kind"],
        uri=meta["array_uri"],
        level=int(level),
        axes=ax,
        shape=shape,
        timepoint=int(timepoint),
        channels=selected,
    )
    volume = Volume(
        uri=uri,
        format=meta["format"],
        shape=tuple(shape[i] for i in zyx),
        dtype=dtype,
        channel_names=[names[c] for c in selected],
        voxel_size=meta.get("voxel_size"),
        unit=meta.get("unit"),
        chunks=None if chunks is None else tuple(int(chunks[i]) for i in zyx),
        _source=source,
    )
    volume._open.update(meta["open"])  # keep what inspection opened
    if meta["kind"] == "zarr":  # reads name a damaged chunk
        volume._open["array"] = CheckedArray(volume._open["array"], meta["array_uri"])
    return volume


# -- zarr ------------------------------------------------------------------------------------
def _inspect_zarr(uri: str, axes, level, defaults=_DEFAULT_AXES) -> dict:
    try:
        node = zarr.open(store=zarr_store(uri), mode="r")
    except (FileNotFoundError, zarr.errors.NodeNotFoundError) as e:
        raise UserError(
            f"input {uri} is neither a zarr array or group nor a .tif/.tiff file; "
            "give an OME-Zarr image, a zarr array or a TIFF stack."
        ) from e
    zarr_format = node.metadata.zarr_format
    if isinstance(node, zarr.Array):
        _check_level(uri, level, 1, "is a plain zarr array with a single resolution level")
        return {
            "kind": "zarr",
            "format": f"zarr-v{zarr_format}",
            "array_uri": uri,
            "axes": _user_axes(uri, axes, node.shape, defaults),
            "shape": node.shape,
            "dtype": node.dtype,
            "chunks": node.chunks,
            "open": {"array": node},
        }
    ome = ome_attributes(node, zarr_format if zarr_format == 2 else None)
    multiscales = ome.get("multiscales")
    if not multiscales:
        raise UserError(_not_an_image(uri, node))
    multiscale = multiscales[0]
    datasets = multiscale.get("datasets") or []
    _check_level(uri, level, len(datasets), f"has {len(datasets)} resolution levels")
    path = datasets[level]["path"]
    try:
        array = node[path]
    except KeyError:
        array = None
    if not isinstance(array, zarr.Array):
        raise UserError(
            f"input {uri}: its OME-Zarr metadata names level {level} at {path!r}, "
            "but there is no array there; the image is incomplete."
        )
    ome_axes, units = _ome_axes(multiscale, array.ndim)
    if axes is not None and axes.strip().lower() != ome_axes:
        raise UserError(
            f"--axes {axes!r} contradicts input {uri}, whose OME-Zarr metadata gives axes "
            f"{ome_axes!r}; leave --axes unset for OME-Zarr inputs."
        )
    voxel_size, unit = _ome_voxel_size(multiscale, level, ome_axes, units)
    omero = ome.get("omero") or {}
    names = [ch.get("label") for ch in omero.get("channels", [])]
    return {
        "kind": "zarr",
        "format": "ome-zarr-0.5" if zarr_format == 3 else "ome-zarr-0.4",
        "array_uri": join(uri, path),
        "axes": ome_axes,
        "shape": array.shape,
        "dtype": array.dtype,
        "chunks": array.chunks,
        "voxel_size": voxel_size,
        "unit": unit,
        "channel_names": names,
        "open": {"array": array},
    }


def _not_an_image(uri: str, group: zarr.Group) -> str:
    attrs = ome_attributes(group)
    if "plate" in attrs or "well" in attrs:
        kind = "plate" if "plate" in attrs else "well"
        wells = attrs.get("plate", {}).get("wells") or [{"path": "A/1"}]
        example = join(uri, wells[0]["path"], "0") if kind == "plate" else join(uri, "0")
        return (
            f"input {uri} is an OME-Zarr HCS {kind}, not one image; give one field image "
            f"inside it, e.g. {example}."
        )
    inside = []
    for name, member in group.members(max_depth=1):
        if isinstance(member, zarr.Array):
            inside.append(f"{join(uri, name)} (array {member.shape} {member.dtype})")
        else:
            if "multiscales" in ome_attributes(member) or "multiscales" in member.attrs.asdict():
                inside.append(f"{join(uri, name)} (OME-Zarr image)")
    if not inside:
        return (
            f"input {uri} is a zarr group without OME-Zarr multiscales metadata and holds no "
            "arrays; give an OME-Zarr image, a zarr array or a TIFF stack."
        )
    more = f" and {len(inside) - 10} more" if len(inside) > 10 else ""
    return (
        f"input {uri} is a zarr group, not an OME-Zarr image (no multiscales metadata); "
        f"give one of the arrays or images inside: {', '.join(inside[:10])}{more}."
    )


def _ome_axes(multiscale: dict, ndim: int) -> tuple[str, list]:
    """Axis letters and units from OME metadata (0.4/0.5 dicts; 0.3 strings; 0.1/0.2 none)."""
    raw = multiscale.get("axes")
    if raw is None:
        return "tczyx"[-ndim:], [None] * ndim
    letters, units = [], []
    for axis in raw:
        if isinstance(axis, str):
            axis = {"name": axis}
        name, kind = str(axis.get("name", "")).lower(), axis.get("type")
        if name in ("t", "c", "z", "y", "x"):
            letters.append(name)
        elif kind in ("time", "channel"):
            letters.append(kind[0])
        else:
            letters.append(_OTHER)
        units.append(axis.get("unit"))
    return "".join(letters), units


def _scale_of(transforms, ndim: int) -> np.ndarray | None:
    scale = np.ones(ndim)
    for t in transforms or []:
        if t.get("type") == "scale":
            if "scale" not in t or len(t["scale"]) != ndim:
                return None  # stored in a file, or malformed: unknown
            scale = scale * np.asarray(t["scale"], dtype=float)
    return scale


def _ome_voxel_size(multiscale: dict, level: int, axes: str, units: list):
    ndim = len(axes)
    local = _scale_of(multiscale["datasets"][level].get("coordinateTransformations"), ndim)
    overall = _scale_of(multiscale.get("coordinateTransformations"), ndim)
    if local is None or overall is None:
        return None, None
    scale = local * overall
    zyx = [axes.index(a) for a in _spatial(axes)]
    size = [float(scale[i]) for i in zyx]
    names = [units[i] for i in zyx]
    if len(set(names)) == 1:
        return tuple(size), names[0]
    if all(n in _METERS for n in names):  # mixed units: express all in the x axis's unit
        to = names[-1]
        return tuple(s * _METERS[n] / _METERS[to] for s, n in zip(size, names)), to
    return None, None


# -- tiff ------------------------------------------------------------------------------------
def _open_tiff(uri: str, level: int) -> dict:
    """Open ``uri`` with tifffile and its first series at ``level`` as a zarr array."""
    handle = None
    if is_remote(uri):
        fs, path = filesystem(uri)
        handle = fs.open(path, "rb", block_size=_TIFF_BLOCK_SIZE, cache_type="readahead")
    opened = {"tif": None, "handle": handle}
    try:
        try:
            tif = opened["tif"] = tifffile.TiffFile(handle or filesystem(uri)[1])
            series = tif.series[0]
        except (tifffile.TiffFileError, IndexError) as e:
            raise UserError(f"input {uri} is not a TIFF file tifffile can read ({e}).") from e
        # an OME series lists its planes from the OME-XML (None where the file holds none); other
        # series would read every page to answer, so they are not asked
        missing = sum(p is None for p in series.pages) if tif.is_ome else 0
        if missing:  # tifffile would fill them with zeros: planes of nothing segmented as if real
            raise UserError(f"input {uri}: its OME-XML describes {len(series.pages)} image planes (shape "
                            f"{tuple(series.shape)}) but the file holds {len(series.pages) - missing}; fix the "
                            "metadata (or write the TIFF again) before segmenting.")
        nlevels = len(series.levels)
        _check_level(uri, level, nlevels, f"has {nlevels} resolution levels")
        opened["array"] = zarr.open_array(store=series.aszarr(level=level), mode="r")
    except BaseException:
        _close(opened)
        raise
    return opened


def _close(opened: dict) -> None:
    for key in ("tif", "handle"):
        if opened.get(key) is not None:
            opened.pop(key).close()
    opened.clear()


def _inspect_tiff(uri: str, axes, level) -> dict:
    opened = _open_tiff(uri, level)
    try:
        tif, array = opened["tif"], opened["array"]
        series = tif.series[0]
        if axes is None:
            letters = "".join(_TIFF_AXES.get(a, _OTHER) for a in series.axes)
            named = letters.replace(_OTHER, "")
            if len(letters) != array.ndim or len(set(named)) != len(named):
                raise UserError(
                    f"input {uri} has TIFF axes {series.axes!r} (shape {array.shape}) that do "
                    "not map to t, c, z, y, x; give --axes with one letter per axis, e.g. czyx."
                )
        else:
            letters = _user_axes(uri, axes, array.shape)
        voxel_size, unit, names = _tiff_physical(tif, series, letters)
        if voxel_size is not None and level:
            full = dict(zip(letters, series.levels[0].shape))
            here = dict(zip(letters, array.shape))
            voxel_size = tuple(v * full[a] / here[a] for v, a in zip(voxel_size, _spatial(letters)))
    except BaseException:
        _close(opened)
        raise
    return {
        "kind": "tiff",
        "format": "tiff",
        "array_uri": uri,
        "axes": letters,
        "shape": array.shape,
        "dtype": array.dtype,
        "chunks": array.chunks,
        "voxel_size": voxel_size,
        "unit": unit,
        "channel_names": names,
        "open": opened,
    }


def _tiff_physical(tif: tifffile.TiffFile, series, axes: str):
    """Voxel size (z, y, x; a slide without z: y, x), unit and channel names from OME-XML or
    ImageJ metadata."""
    if "y" not in axes or "x" not in axes:
        return None, None, None
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
        except ET.ParseError:
            root = None
        pixels = None if root is None else root.find(".//{*}Image/{*}Pixels")
        if pixels is not None:
            names = [ch.get("Name") for ch in pixels.findall("{*}Channel")]
            sizes, units = [], []
            for a in _spatial(axes).upper():
                sizes.append(pixels.get(f"PhysicalSize{a}"))
                units.append(_unit(pixels.get(f"PhysicalSize{a}Unit", "µm")))
            if None in sizes or len(set(units)) != 1 or units[0] is None:
                return None, None, names
            return tuple(float(s) for s in sizes), units[0], names
    if tif.is_imagej and tif.imagej_metadata and "z" in axes:
        meta = tif.imagej_metadata
        page = series.keyframe
        xres, yres = page.tags.get("XResolution"), page.tags.get("YResolution")
        unit = _unit(meta.get("unit"))
        if "spacing" in meta and xres is not None and yres is not None and unit is not None:
            (xn, xd), (yn, yd) = xres.value, yres.value
            if xn and yn:
                return (float(meta["spacing"]), yd / yn, xd / xn), unit, None
    return None, None, None


def _spatial(axes: str) -> str:
    """The spatial axes of ``axes``: ``zyx`` for a volume, ``yx`` for a slide without z."""
    return "zyx" if "z" in axes else "yx"


def _unit(name) -> str | None:
    if name is None:
        return None
    return _UNITS.get(str(name).strip().lower())


# -- Cellpose's channel_axis and z_axis -----------------------------------------------------------
_POSITION_FLAGS = (("c", "--channel-axis"), ("z", "--z-axis"))


def _stored(uri: str, level: int) -> tuple[int, bool] | None:
    """The stored array's number of axes and whether its metadata names them (OME-Zarr, a TIFF
    with named axes); None for an OME-Zarr group (its metadata always names them)."""
    if str(uri).lower().rstrip("/").endswith((".tif", ".tiff")):
        opened = _open_tiff(uri, level)
        try:
            letters = "".join(_TIFF_AXES.get(a, _OTHER) for a in opened["tif"].series[0].axes)
            named = _OTHER not in letters and len(set(letters)) == len(letters)
            return opened["array"].ndim, named
        finally:
            _close(opened)
    node = zarr.open(store=zarr_store(uri), mode="r")
    return (node.ndim, False) if isinstance(node, zarr.Array) else None


def positional_axes(uri: str, axes, channel_axis=None, z_axis=None, level: int = 0):
    """``axes`` unless Cellpose's ``channel_axis``/``z_axis`` must name the axes of a plain array
    or a TIFF without named axes: then the axis letters they give (y and x last, t before them)."""
    given = {a: v for (a, _flag), v in zip(_POSITION_FLAGS, (channel_axis, z_axis)) if v is not None}
    if not given or axes is not None:
        return axes
    try:
        stored = _stored(uri, level)
    except (FileNotFoundError, zarr.errors.NodeNotFoundError):
        return axes  # inspection says what is wrong with the input
    if stored is None or stored[1]:
        return axes  # the metadata names the axes: checked against the positions after inspection
    ndim = stored[0]
    flags = dict(_POSITION_FLAGS)
    for a, v in given.items():
        if not 0 <= int(v) < ndim:
            raise UserError(f"{flags[a]} {v} is not an axis of input {uri}, which has {ndim} (0-{ndim - 1}).")
    if len(set(given.values())) != len(given):
        raise UserError(f"--channel-axis and --z-axis both name axis {z_axis} of input {uri}; give two different axes.")
    rest = ndim - len(given)
    if not 2 <= rest <= 3:
        raise UserError(f"input {uri} has {ndim} axes: --channel-axis/--z-axis name {len(given)} of them and the "
                        f"{rest} others cannot all be t, y, x; give every axis with --axes (e.g. tczyx).")
    others = iter("tyx"[3 - rest:])
    return "".join(next((a for a, v in given.items() if v == i), None) or next(others) for i in range(ndim))


def agree_with_positions(uri: str, axes: str, channel_axis=None, z_axis=None) -> None:
    """Refuse ``channel_axis``/``z_axis`` that contradict the axes in use (``--axes`` or metadata)."""
    for (a, flag), v in zip(_POSITION_FLAGS, (channel_axis, z_axis)):
        if v is None:
            continue
        at = axes.find(a)
        if at != int(v):
            where = f"its {'channel' if a == 'c' else 'z'} axis is {at}" if at >= 0 else f"it has no {a} axis"
            raise UserError(f"{flag} {v} disagrees with the axes {axes!r} of input {uri} ({where}); "
                            "give one of --axes and the axis positions, or make them agree.")


# -- checks shared by all formats -----------------------------------------------------------
def _user_axes(uri: str, axes, shape, defaults=_DEFAULT_AXES) -> str:
    """The axes of a plain array: ``axes`` checked against ``shape``, else ``defaults[ndim]``."""
    ndim = len(shape)
    if axes is None:
        if ndim not in defaults:
            raise UserError(
                f"input {uri} has {ndim} dimensions (shape {tuple(shape)}); "
                "say which is which with --axes, e.g. --axes tczyx."
            )
        return defaults[ndim]
    letters = str(axes).strip().lower()
    if len(letters) != ndim or set(letters) - set("tczyx") or len(set(letters)) != ndim:
        raise UserError(
            f"--axes {axes!r} does not fit input {uri} of shape {tuple(shape)}: give one "
            f"letter per axis ({ndim}) from t, c, z, y, x, each at most once, "
            f"e.g. {defaults.get(ndim, 'czyx')}."
        )
    return letters


def _check_spatial(uri: str, axes: str, shape) -> None:
    if "y" not in axes or "x" not in axes or "z" not in axes:
        raise UserError(
            f"input {uri} has shape {tuple(shape)} with axes {axes!r}: a 3D volume (Z, Y, X) "
            "is needed; if one of its axes is z, name it with --axes (e.g. --axes zyx or czyx)."
        )
    for a, n in zip(axes, shape):
        if a == _OTHER and n != 1:
            raise UserError(
                f"input {uri} has shape {tuple(shape)} with an axis of size {n} that is not "
                f"t, c, z, y or x (axes {axes!r}); convert it to a t/c/z/y/x image."
            )


def _check_level(uri: str, level, nlevels: int, what: str) -> None:
    if not isinstance(level, (int, np.integer)) or not 0 <= level < nlevels:
        if nlevels == 1:
            raise UserError(f"level {level} is out of range: input {uri} {what}; use level 0.")
        raise UserError(
            f"level {level} is out of range: input {uri} {what}; "
            f"choose --level 0 to {nlevels - 1}."
        )


def _check_dtype(uri: str, dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    native = dtype.newbyteorder("=") if dtype.byteorder not in ("|", "=") else dtype
    if native.fields is not None or native.name not in SUPPORTED_DTYPES:
        raise UserError(
            f"input {uri} has data type {dtype.name if dtype.fields is None else dtype}, which "
            f"zseg cannot segment; supported: {', '.join(SUPPORTED_DTYPES)}; "
            "convert the image (e.g. to uint16 or float32) first."
        )
    return native


#: Channels a message lists in full; beyond, the first and the last few (a 120-channel stack).
LISTED_CHANNELS = 12


def _select_channels(uri: str, channels, n: int, names: list) -> tuple[int, ...]:
    shown = [f"{i} ({nm})" if nm else str(i) for i, nm in enumerate(names)]
    listing = ", ".join(shown if n <= LISTED_CHANNELS else [*shown[:LISTED_CHANNELS - 2], "...", *shown[-2:]])
    if channels is None:
        if n == 1:
            return (0,)
        example = names[0] if names[0] else "0"
        raise UserError(
            f"input {uri} has {n} channels: {listing}; choose up to {MAX_CHANNELS} with "
            f"--channels, e.g. --channels {example}."
        )
    if isinstance(channels, (int, np.integer, str)):
        channels = [channels]
    channels = list(channels)
    if not 1 <= len(channels) <= MAX_CHANNELS:
        raise UserError(
            f"channels {channels}: give 1 to {MAX_CHANNELS} channels (by index or name) "
            f"from input {uri}: {listing}."
        )
    picked = []
    for ch in channels:
        index = None
        if isinstance(ch, str):
            if ch in names:
                index = names.index(ch)
            elif ch.strip().isdigit():
                index = int(ch)
        elif isinstance(ch, (int, np.integer)) and not isinstance(ch, bool):
            index = int(ch)
        if index is None or not 0 <= index < n:
            raise UserError(
                f"channel {ch!r} is not in input {uri}, which has {n} "
                f"channel{'s' if n > 1 else ''}: {listing}; give indices 0-{n - 1} or names."
            )
        picked.append(index)
    return tuple(picked)


def _check_box(box, shape) -> tuple[slice, ...]:
    if len(box) != 3:
        raise ValueError(f"box {box} must have 3 slices (Z, Y, X)")
    out = []
    for sl, n in zip(box, shape):
        start = 0 if sl.start is None else int(sl.start)
        stop = n if sl.stop is None else int(sl.stop)
        if sl.step not in (None, 1) or not 0 <= start <= stop <= n:
            raise ValueError(f"box {box} is not inside the volume of shape {shape}")
        out.append(slice(start, stop))
    return tuple(out)


__all__ = ["FORMATS", "SUPPORTED_DTYPES", "Volume", "open_volume"]
