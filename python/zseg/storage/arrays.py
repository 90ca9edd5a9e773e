"""The zarr arrays the phases write and read: create, open, read and write a box.

One funnel, :func:`zarr_store`, turns a URI (local path or ``s3://...``) into a zarr store;
everything else here is a thin, checked wrapper around zarr. Arrays are zarr v3 by default
(zstd through zarr's default codecs), v2 on request. Local chunk writes are atomic (zarr's
``LocalStore`` writes a temporary file and renames it), S3 PUTs are all-or-nothing, so a
killed task never leaves half a chunk behind.
"""

from __future__ import annotations

import itertools

import numpy as np
import zarr
import zarr.errors
from zarr.storage import FsspecStore, LocalStore

from zseg.errors import UserError
from zseg.storage.uri import filesystem, is_remote, join, read_bytes, storage_options

Box = tuple[slice, ...]


def zarr_store(uri: str, *, read_only: bool = True) -> zarr.abc.store.Store:
    """The zarr store rooted at ``uri``.

    Parameters
    ----------
    uri : str
        Local path, ``file://`` URI or any fsspec URL (``s3://bucket/key``); S3 endpoint and
        credentials come from the environment (see :mod:`zseg.storage.uri`).
    read_only : bool
        Open the store read-only.

    Returns
    -------
    zarr.storage.LocalStore or zarr.storage.FsspecStore
    """
    uri = str(uri)
    if is_remote(uri):
        return FsspecStore.from_url(uri, storage_options=storage_options(uri), read_only=read_only)
    _, path = filesystem(uri)
    return LocalStore(path, read_only=read_only)


def _exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    if is_remote(uri):
        fs.invalidate_cache(path)  # another writer (or zarr's async client) may have changed it
    return fs.exists(path)


def is_array(uri: str) -> bool:
    """Whether ``uri`` holds an array's metadata document: a creation killed before writing it
    leaves only a folder, which is no array (a resume creates it again)."""
    return any(_exists(join(str(uri), doc)) for doc in ("zarr.json", ".zarray"))


def create_array(
    uri: str,
    *,
    shape,
    chunks,
    dtype,
    zarr_format: int = 3,
    fill_value=0,
    attributes: dict | None = None,
    overwrite: bool = False,
    shards=None,
    dimension_names=None,
) -> zarr.Array:
    """Create an empty zarr array at ``uri``.

    Parameters
    ----------
    uri : str
        Where the array goes (local path or ``s3://...``); its root is the array itself.
    shape, chunks : tuple of int
        Array shape and chunk shape, one value per axis.
    dtype : numpy dtype-like
    zarr_format : {3, 2}
    fill_value : scalar
        Value of chunks never written (they are not stored).
    attributes : dict, optional
        JSON-serialisable user attributes.
    overwrite : bool
        Replace whatever is at ``uri`` (its chunks are deleted). Without it an existing
        ``uri`` is refused with a :class:`~zseg.errors.UserError`.
    shards : tuple of int, optional
        Shard shape (zarr v3 only); each shard holds several chunks in one object.
    dimension_names : sequence of str, optional
        Axis names stored with the array (zarr v3 only).

    Returns
    -------
    zarr.Array
        Opened for writing.
    """
    uri = str(uri)
    if zarr_format not in (2, 3):
        raise ValueError(f"zarr_format must be 2 or 3, not {zarr_format!r}")
    if not overwrite and _exists(uri):
        raise UserError(
            f"output {uri} already exists; remove it, choose another output, "
            "or pass --overwrite to replace it."
        )
    try:
        return zarr.create_array(
            store=zarr_store(uri, read_only=False),
            shape=tuple(int(s) for s in shape),
            chunks=tuple(int(c) for c in chunks),
            shards=None if shards is None else tuple(int(s) for s in shards),
            dtype=np.dtype(dtype),
            fill_value=fill_value,
            zarr_format=zarr_format,
            attributes=attributes,
            dimension_names=dimension_names,
            overwrite=overwrite,
        )
    except zarr.errors.ContainsArrayError as e:  # created by someone else since the check
        raise UserError(
            f"output {uri} already exists; remove it, choose another output, "
            "or pass --overwrite to replace it."
        ) from e


def open_array(uri: str, mode: str = "r") -> "CheckedArray":
    """Open the zarr array (v2 or v3) at ``uri``.

    Parameters
    ----------
    uri : str
        Local path or ``s3://...`` of the array's root.
    mode : {"r", "r+"}
        Read only, or read and write an existing array.

    Returns
    -------
    CheckedArray
        The zarr array, whose reads name a damaged chunk instead of failing in a codec.
    """
    uri = str(uri)
    if mode not in ("r", "r+"):
        raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}; use create_array to create")
    if not _exists(uri):
        raise UserError(f"array {uri} does not exist; check the path (was its phase run?).")
    try:
        array = zarr.open_array(store=zarr_store(uri, read_only=mode == "r"), mode=mode)
    except (
        zarr.errors.NodeNotFoundError,
        zarr.errors.ContainsGroupError,
        zarr.errors.NodeTypeValidationError,
    ) as e:
        raise UserError(
            f"{uri} is not a zarr array (it is a group or not zarr at all); "
            "give the path of the array itself."
        ) from e
    return CheckedArray(array, uri)


# -- damaged chunks ----------------------------------------------------------------------------
class CheckedArray:
    """A :class:`zarr.Array` whose reads name the stored chunk that cannot be decoded.

    zarr reports a truncated or corrupted chunk as a bare codec error ("Zstd decompression
    error") that names neither the array nor the chunk. On such an error this wrapper reads
    the chunks under the selection one by one and raises a :class:`~zseg.errors.UserError`
    naming each stored object that is present but does not decode. Errors that are not about
    a chunk's bytes (network, permissions) are re-raised unchanged. Everything else is the
    wrapped array's (``shape``, ``dtype``, writes ...).
    """

    def __init__(self, array: zarr.Array, uri: str):
        self._array = array
        self._uri = str(uri)

    def __getattr__(self, name):
        return getattr(self._array, name)

    def __repr__(self) -> str:
        return f"CheckedArray({self._uri!r}, shape={self._array.shape}, dtype={self._array.dtype})"

    @property
    def array(self) -> zarr.Array:
        return self._array

    def __array__(self, dtype=None, copy=None):
        data = self[...]
        return data if dtype is None else data.astype(dtype, copy=False)

    def __getitem__(self, selection):
        return self._checked(lambda: self._array[selection], selection)

    def __setitem__(self, selection, value):  # a partial chunk is read before it is written
        self._checked(lambda: self._array.__setitem__(selection, value), selection)

    @property
    def oindex(self):
        return _CheckedIndex(self)

    def _checked(self, op, selection):
        try:
            return op()
        except UserError:
            raise
        except Exception:
            bad = damaged_chunks(self._array, self._uri, selection)
            if not bad:
                raise
            raise UserError(damaged_message(self._uri, bad)) from None


class _CheckedIndex:
    def __init__(self, checked: CheckedArray):
        self._c = checked

    def __getitem__(self, selection):
        return self._c._checked(lambda: self._c._array.oindex[selection], selection)


def chunk_key(array: zarr.Array, coords) -> str:
    """The store key of the stored object at grid position ``coords``."""
    return array.metadata.encode_chunk_key(tuple(int(c) for c in coords))


def _axis_indices(sel, n: int):
    if isinstance(sel, slice):
        return range(*sel.indices(n))
    if isinstance(sel, (int, np.integer)):
        return [int(sel) % n] if n else []
    return [int(v) % n for v in np.asarray(sel).ravel()]


def _selected_chunks(array: zarr.Array, selection) -> list[tuple[int, ...]]:
    """Grid positions of the stored objects a basic/orthogonal ``selection`` touches."""
    sel = selection if isinstance(selection, tuple) else (selection,)
    if any(s is Ellipsis for s in sel):
        i = next(k for k, s in enumerate(sel) if s is Ellipsis)
        sel = sel[:i] + (slice(None),) * (array.ndim - len(sel) + 1) + sel[i + 1:]
    sel = sel + (slice(None),) * (array.ndim - len(sel))
    per = array.shards or array.chunks
    axes = [sorted({i // c for i in _axis_indices(s, n)}) for s, n, c in zip(sel, array.shape, per)]
    return list(itertools.product(*axes))


def damaged_chunks(array: zarr.Array, uri: str, selection=None) -> list[tuple[str, str]]:
    """``(key, error)`` of each stored object under ``selection`` that exists but does not decode.

    A missing object is not damage (zarr reads it as the fill value); an object that cannot be
    fetched at all is an I/O problem, not damage, and is left out too.
    """
    try:
        coords = _selected_chunks(array, selection if selection is not None else ())
    except Exception:  # a selection we cannot map to chunks (fancy indexing): no diagnosis
        return []
    bad = []
    per = array.shards or array.chunks
    for c in coords:
        box = tuple(slice(i * s, min((i + 1) * s, n)) for i, s, n in zip(c, per, array.shape))
        try:
            array[box]
        except Exception as e:
            key = chunk_key(array, c)
            try:
                read_bytes(join(uri, key))
            except Exception:
                continue
            bad.append((key, f"{type(e).__name__}: {e}"))
    return bad


def damaged_message(uri: str, bad: list[tuple[str, str]]) -> str:
    keys = ", ".join(k for k, _ in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    return (
        f"zarr array {uri}: stored chunk {keys} is truncated or corrupt and cannot be decoded "
        f"({bad[0][1]}); restore that file from a copy, or write the array again."
    )


def _full_box(array: zarr.Array, box: Box) -> tuple[slice, ...]:
    """``box`` (the trailing axes) preceded by full slices over the leading axes."""
    box = tuple(box)
    if len(box) > array.ndim:
        raise ValueError(f"box {box} has more axes than the array's {array.shape}")
    return (slice(None),) * (array.ndim - len(box)) + box


def read_region(array: zarr.Array, box: Box) -> np.ndarray:
    """Read ``box`` (slices of the array's trailing axes) of ``array``, all leading axes.

    Parameters
    ----------
    array : zarr.Array
        E.g. a flow store ``(4, Z, Y, X)``.
    box : tuple of slice
        Half-open intervals of the last ``len(box)`` axes (e.g. ``(Z, Y, X)``).

    Returns
    -------
    ndarray
        ``array.shape[:-len(box)] + box shape``, the array's dtype.
    """
    return array[_full_box(array, box)]


def write_region(array: zarr.Array, box: Box, data) -> None:
    """Write ``data`` into ``box`` (slices of the trailing axes) of ``array``.

    ``data`` has the array's leading axes followed by the box's shape. For writes that do not
    race with other tasks, ``box`` should cover whole chunks (or reach the array's end).
    """
    array[_full_box(array, box)] = data
