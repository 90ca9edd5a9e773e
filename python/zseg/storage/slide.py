"""Opening a 2D multiplex slide: OME-TIFF (tiled, pyramidal), OME-Zarr ``cyx``, plain zarr/TIFF.

A slide is a (C, Y, X) image with many channels (CODEX/PhenoCycler, CyCIF, IMC: 10-60). Unlike a
3D input (:mod:`zseg.storage.volume`), every channel is kept: the network reads two or three of
them, the cell table measures them all. :func:`open_slide` reads only metadata and checks what a
multiplex run needs; :meth:`Slide.read` reads one box of any channels, touching only the
chunks (zarr) or tiles (TIFF) under it.

Channel names come from the OME-XML (``Channel Name``) or the OME-Zarr ``omero`` block. Panels
repeat names ("DAPI" in every cycle, "Blank"): repeats get a suffix (``DAPI_2``) so that every
channel has a name to type (:func:`zseg.engine.multiplex.unique_channel_names`); unnamed
channels are called by their index (``"0"``, ``"1"``, ...). A channel can always be given by index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import zarr

from zseg.engine.multiplex import unique_channel_names
from zseg.errors import UserError
from zseg.storage import volume as V
from zseg.storage.arrays import CheckedArray, zarr_store

__all__ = ["Slide", "open_slide"]

#: The axes of a plain zarr array read as a slide: a 3D array is channels first.
_SLIDE_AXES = {**V._DEFAULT_AXES, 3: "cyx"}


@dataclass
class Slide(V._Lazy):
    """An opened slide: metadata plus lazy access to boxes of any channels.

    Attributes
    ----------
    uri, format : the input as given and one of :data:`zseg.storage.volume.FORMATS`
    shape : (Y, X) at the chosen level
    dtype : native-byte-order dtype of the pixels
    channel_names : the unique names of all channels, in stored order
    original_names : the names as stored (repeats and ``None`` kept)
    pixel_size : (y, x) in ``unit``, or None when unknown
    chunks : (y, x) chunk or tile shape, or None
    """

    uri: str
    format: str
    shape: tuple[int, int]
    dtype: np.dtype
    channel_names: list[str]
    original_names: list
    pixel_size: tuple[float, float] | None
    unit: str | None
    chunks: tuple[int, int] | None
    level: int
    _axes: str = field(repr=False)
    _array_shape: tuple[int, ...] = field(repr=False)
    _array_uri: str = field(repr=False)
    _kind: str = field(repr=False)
    _open: dict = field(default_factory=dict, repr=False, compare=False)
    #: A :class:`zseg.storage.fingerprint.Reads` that checks every box read against the run's
    #: fingerprint of the store (set by the run that reads it; None: unchecked).
    reads: object = field(default=None, repr=False, compare=False)

    @property
    def nchannels(self) -> int:
        return len(self.channel_names)

    def channel(self, ch) -> int:
        """The index of a channel given by (unique) name or index; UserError naming them all."""
        index = None
        if isinstance(ch, (int, np.integer)) and not isinstance(ch, bool):
            index = int(ch)
        elif isinstance(ch, str):
            if ch in self.channel_names:
                index = self.channel_names.index(ch)
            elif ch.strip().isdigit():
                index = int(ch)
        if index is None or not 0 <= index < self.nchannels:
            raise UserError(
                f"channel {ch!r} is not in slide {self.uri}, which has {self.nchannels} channels: "
                f"{self.listing()}; give a name or an index 0-{self.nchannels - 1}."
            )
        return index

    def segmentation_channels(self, compartment: str, nuclear=None, membrane=()) -> tuple[int | None, tuple[int, ...]]:
        """The channels a multiplex run segments: ``(nuclear index or None, membrane indices)``.

        ``compartment`` is Mesmer's ``whole-cell``, ``nuclear`` or ``both``. Nuclei need the
        nuclear channel; whole cells need one or more membrane channels (and take the nuclear
        channel as the network's second input when given). A channel named twice, or as both the
        nuclear and a membrane channel, is refused: the composite would hide the nucleus.
        """
        if compartment not in ("whole-cell", "nuclear", "both"):
            raise UserError(f"--compartment {compartment!r}: use whole-cell, nuclear or both.")
        membrane = [m for m in (membrane or ()) if str(m).strip() != ""]
        if compartment in ("nuclear", "both") and nuclear is None:
            raise UserError(f"--compartment {compartment} needs --nuclear-channel (one of {self.listing()}).")
        if compartment in ("whole-cell", "both") and not membrane:
            raise UserError(f"--compartment {compartment} needs --membrane-channels (one or more of "
                            f"{self.listing()}).")
        if compartment == "nuclear" and membrane:
            raise UserError("--membrane-channels: a nuclear-only run reads no membrane; leave it out or use "
                            "--compartment both.")
        nuc = None if nuclear is None else self.channel(nuclear)
        mem = [self.channel(m) for m in membrane]
        if len(set(mem)) != len(mem):
            twice = sorted({self.channel_names[i] for i in mem if mem.count(i) > 1})
            raise UserError(f"--membrane-channels names {', '.join(twice)} more than once; give each channel once.")
        if nuc is not None and nuc in mem:
            raise UserError(f"channel {self.channel_names[nuc]!r} is both --nuclear-channel and one of "
                            "--membrane-channels; the membrane composite must not hold the nucleus: choose "
                            "other membrane channels.")
        return nuc, tuple(mem)

    def listing(self) -> str:
        """``0 (DAPI), 1 (CD3), ...``: the channels as a message names them."""
        return ", ".join(f"{i} ({n})" for i, n in enumerate(self.channel_names))

    def read(self, box: Sequence[slice], channels: Sequence[int] | None = None) -> np.ndarray:
        """Read ``box`` (Y, X slices) of ``channels`` (indices, default all): ``(C, y, x)``."""
        if len(box) != 2:
            raise ValueError(f"box {box} must have 2 slices (Y, X)")
        box = V._check_box((slice(0, 1), *box), (1, *self.shape))[1:]
        chans = list(range(self.nchannels)) if channels is None else [int(c) for c in channels]
        if any(not 0 <= c < self.nchannels for c in chans):
            raise ValueError(f"channels {chans} are not in 0-{self.nchannels - 1}")
        if self.reads is not None:
            self.reads.check(self.array_ranges(box, chans))
        data = V.read_selection(self._array(), self._axes, self._array_shape, chans, dict(zip("yx", box)))
        return np.ascontiguousarray(data, dtype=self.dtype)

    def array_ranges(self, box, channels) -> list[tuple[int, int]]:
        """The ``[start, stop)`` range of each axis of the stored array that reading ``box``
        (Y, X slices within :attr:`shape`) of ``channels`` touches."""
        return V.selection_ranges(self._axes, channels, dict(zip("yx", box)))

    def describe(self) -> dict:
        """A JSON-serialisable summary for ``run.json``; ``channel_names`` are the unique names."""
        return {
            "uri": self.uri, "format": self.format, "shape": list(self.shape), "dtype": self.dtype.name,
            "channel_names": list(self.channel_names), "stored_channel_names": list(self.original_names),
            "pixel_size": None if self.pixel_size is None else list(self.pixel_size), "unit": self.unit,
            "chunks": None if self.chunks is None else list(self.chunks), "level": self.level,
            "array": self._array_uri, "array_axes": self._axes, "array_shape": list(self._array_shape),
        }

    def _array(self):
        if "array" not in self._open:
            if self._kind == "tiff":
                self._open.update(V._open_tiff(self._array_uri, self.level))
            else:
                self._open["array"] = CheckedArray(
                    zarr.open_array(store=zarr_store(self._array_uri), mode="r"), self._array_uri)
        return self._open["array"]


def open_slide(uri, *, axes: str | None = None, level: int = 0, channel_axis: int | None = None) -> Slide:
    """Open a 2D multiplex slide and check that zseg can segment it.

    Parameters
    ----------
    uri : an OME-TIFF or TIFF file, an OME-Zarr image or a zarr array; local or remote
    axes : for a plain array or TIFF, one letter per axis from ``c, y, x`` (``cyx``, ``yxc``);
        default ``cyx`` for 3D and ``yx`` for 2D arrays; OME inputs carry their own
    level : resolution level of a pyramidal input (0 = full resolution)
    channel_axis : Cellpose's ``channel_axis`` (0-based): names the channel axis of a plain array or
        a TIFF without named axes; with ``axes`` or named axes it must agree

    Raises
    ------
    UserError
        Missing or unreadable input, a z or t axis of more than one plane (a volume: use the
        3D track), a bad level, axes or data type.
    """
    uri = str(uri)
    path = V.require_input(uri)
    if axes is not None:
        axes = _slide_axes(uri, axes)
    axes = V.positional_axes(uri, axes, channel_axis, None, level)
    if path.lower().rstrip("/").endswith((".tif", ".tiff")):
        meta = V._inspect_tiff(uri, axes, level)
    else:
        meta = V._inspect_zarr(uri, axes, level, defaults=_SLIDE_AXES)
    try:
        V.agree_with_positions(uri, meta["axes"], channel_axis)
        return _slide(uri, meta, level)
    except BaseException:
        V._close(meta["open"])
        raise


def _slide_axes(uri: str, axes: str) -> str:
    letters = str(axes).strip().lower()
    if set(letters) - set("cyx") or len(set(letters)) != len(letters) or not {"y", "x"} <= set(letters):
        raise UserError(f"--axes {axes!r}: a slide's axes are c, y and x (e.g. cyx or yxc), each once.")
    return letters


def _slide(uri: str, meta: dict, level: int) -> Slide:
    shape, ax = tuple(meta["shape"]), meta["axes"]
    if "y" not in ax or "x" not in ax:
        raise UserError(f"input {uri} has axes {ax!r} (shape {shape}): a slide needs y and x; name them with --axes.")
    for a, n in zip(ax, shape):
        if a not in "cyx" and n != 1:
            what = {"z": "planes in z", "t": "time points"}.get(a, f"entries along an axis {a!r}")
            raise UserError(
                f"input {uri} has {n} {what} (shape {shape}, axes {ax!r}): a multiplex slide is 2D (C, Y, X); "
                "segment a volume with the 3D track (without --compartment), or give one plane; "
                "if that axis holds channels, say so with --axes (e.g. cyx)."
            )
    dtype = V._check_dtype(uri, meta["dtype"])
    sizes = dict(zip(ax, shape))
    nchan = sizes.get("c", 1)
    stored = list(meta.get("channel_names") or [])
    if len(stored) != nchan:
        stored = [None] * nchan
    names = unique_channel_names([n if n else str(i) for i, n in enumerate(stored)])
    size = meta.get("voxel_size")
    pixel = None if size is None else tuple(float(v) for v in size[-2:])
    chunks = meta.get("chunks")
    slide = Slide(
        uri=uri, format=meta["format"], shape=(sizes["y"], sizes["x"]), dtype=dtype,
        channel_names=names, original_names=stored, pixel_size=pixel, unit=meta.get("unit"),
        chunks=None if chunks is None else (int(chunks[ax.index("y")]), int(chunks[ax.index("x")])),
        level=int(level), _axes=ax, _array_shape=shape, _array_uri=meta["array_uri"], _kind=meta["kind"],
    )
    slide._open.update(meta["open"])
    if meta["kind"] == "zarr":
        slide._open["array"] = CheckedArray(slide._open["array"], meta["array_uri"])
    return slide
