"""Fingerprints of the stores a run reads, so that a store replaced at the same URI is noticed.

A run lasts hours to days, and an input can be rewritten under it: a resume or a later task
would then mix two inputs without a word. ``plan`` fingerprints every store the run reads (the
input, ``--flows``, ``--mask``, the model file):

- a single file (a TIFF, a model): its size and its tag (ETag on S3, generation/ETag on GCS,
  modification time on a local disk), in ``run.json``;
- a zarr array: a hash of each of its metadata documents, in ``run.json``, and the size and tag
  of every stored object (chunk, or shard when sharded), one row per position of the object
  grid, in a small zarr table ``work/fingerprint/<name>.zarr`` (``(2, *grid)`` int64: the size,
  -1 for an object never written, then a 64-bit hash of the tag).

A resume and ``zseg verify`` list the store again and compare everything (:func:`changes`). A
task compares only what it reads (:class:`Reads`): the metadata once, and each stored object
under its boxes once per process, with one ``HEAD`` each and the rows of the table under the
box; it never lists the store.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import posixpath

import numpy as np

from zseg.errors import UserError
from zseg.storage import uri as U
from zseg.storage.arrays import create_array, is_array, open_array

METADATA = ("zarr.json", ".zarray", ".zattrs")
#: Object-grid positions per axis in one chunk of a fingerprint table.
TABLE_CHUNK = 64
#: How many changed objects a message names.
NAMED = 3


def _tag(info: dict) -> str:
    for key in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "created"):
        value = info.get(key)
        if value is not None:  # a listing and a stat may give a time as a number or a datetime
            return f"{key}={value.timestamp() if hasattr(value, 'timestamp') else value}"
    return ""


def _hash(tag: str) -> int:
    return int.from_bytes(hashlib.blake2b(tag.encode(), digest_size=8).digest(), "little", signed=True)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_file(uri: str) -> bool:
    fs, path = U.filesystem(uri)
    return fs.isfile(path)


def file_stamp(uri: str) -> dict:
    fs, path = U.filesystem(uri)
    info = fs.info(path)
    return {"kind": "file", "uri": uri, "size": int(info["size"]), "tag": _tag(info)}


def object_shape(array) -> tuple[int, ...]:
    """The shape of one stored object of ``array``: its shard, or its chunk when unsharded."""
    return tuple(getattr(array, "shards", None) or array.chunks)


def _grid(array) -> tuple[int, ...]:
    return tuple(math.ceil(n / c) for n, c in zip(array.shape, object_shape(array)))


def _metadata(uri: str) -> dict[str, str]:
    fs, path = U.filesystem(uri)
    return {name: _sha(fs.cat_file(posixpath.join(path, name))) for name in METADATA
            if fs.exists(posixpath.join(path, name))}


def _listing(uri: str) -> dict[str, dict]:
    """Every object stored under folder ``uri`` (one listing): its key below ``uri`` -> its info."""
    fs, path = U.filesystem(uri)
    root = path.rstrip("/") + "/"
    return {name[len(root):]: info for name, info in fs.find(path, detail=True).items() if name.startswith(root)}


def _table(uri: str, array) -> np.ndarray:
    """Size and tag hash of every stored object of the array at ``uri``, from one listing."""
    listing = _listing(uri)
    grid = _grid(array)
    table = np.full((2, *grid), -1, np.int64)
    table[1] = 0
    for pos in np.ndindex(*grid):
        info = listing.get(array.metadata.encode_chunk_key(pos))
        if info is not None:
            table[(0, *pos)] = int(info["size"])
            table[(1, *pos)] = _hash(_tag(info))
    return table


def digest(uri: str) -> str:
    """One hash of everything stored at ``uri`` (a file, or every object under a folder or zarr
    store, all levels), from one listing: what the Nextflow pipeline feeds its plan task, so a
    store replaced at the same URI is not taken for the cached one."""
    if not U.exists(uri):
        return "missing"
    if is_file(uri):
        stamp = file_stamp(uri)
        return _sha(f"{stamp['size']} {stamp['tag']}".encode())
    rows = sorted(f"{key} {info['size']} {_tag(info)}" for key, info in _listing(uri).items())
    return _sha("\n".join(rows).encode())


def digest_of(digests: dict[str, str]) -> str:
    return _sha(json.dumps(digests, sort_keys=True).encode())


def take(uri: str) -> tuple[dict, np.ndarray | None]:
    """The fingerprint of the store at ``uri``: its summary for ``run.json`` and, for a zarr
    array, its object table (:func:`write_table` stores it)."""
    if is_file(uri):
        return file_stamp(uri), None
    array = open_array(uri)
    table = _table(uri, array)
    summary = {"kind": "zarr", "uri": uri, "metadata": _metadata(uri), "object_shape": list(object_shape(array)),
               "grid": list(table.shape[1:]), "objects": int((table[0] >= 0).sum()),
               "digest": _sha(table.tobytes())}
    return summary, table


def write_table(table_uri: str, table: np.ndarray) -> None:
    """Store ``table`` at ``table_uri``, replacing what a killed write left there."""
    out = create_array(table_uri, shape=table.shape, chunks=(2, *(min(TABLE_CHUNK, n) for n in table.shape[1:])),
                       dtype="int64", fill_value=-1, overwrite=True)
    out[...] = table


def table_holds(table_uri: str, recorded: dict) -> bool:
    """Whether the table at ``table_uri`` is whole and is the one ``recorded`` (its digest): a
    write killed midway leaves a folder without metadata, or chunks missing."""
    if not is_array(table_uri):
        return False
    try:
        table = np.asarray(open_array(table_uri)[...])
    except UserError:  # a damaged chunk
        return False
    return list(table.shape[1:]) == recorded["grid"] and _sha(table.tobytes()) == recorded["digest"]


def _what(name: str, uri: str) -> str:
    return f"{name} {uri!r}"


def changes(name: str, recorded: dict, table_uri: str | None) -> list[str]:
    """What changed in store ``name`` since ``recorded`` was taken (everything listed again)."""
    uri = recorded["uri"]
    what = _what(name, uri)
    if not U.exists(uri):
        return [f"{what} is gone"]
    if recorded["kind"] == "file":
        now = file_stamp(uri) if is_file(uri) else {"size": None, "tag": "not a file"}
        if (now["size"], now["tag"]) != (recorded["size"], recorded["tag"]):
            return [f"{what} was replaced (size {recorded['size']} -> {now['size']}, {now['tag'] or 'no tag'})"]
        return []
    if is_file(uri):
        return [f"{what} was a zarr array and is now a file"]
    meta = _metadata(uri)
    changed = sorted(k for k in set(meta) | set(recorded["metadata"]) if meta.get(k) != recorded["metadata"].get(k))
    if changed:
        return [f"{what}: its metadata ({', '.join(changed)}) changed"]
    array = open_array(uri)
    table = _table(uri, array)
    if list(table.shape[1:]) != recorded["grid"]:
        return [f"{what}: its object grid changed ({recorded['grid']} -> {list(table.shape[1:])})"]
    if _sha(table.tobytes()) == recorded["digest"]:
        return []
    if table_uri is None or not table_holds(table_uri, recorded):  # no table, or one a killed plan left half-written
        return [f"{what}: its stored objects changed"]
    return [_objects_changed(what, array, np.asarray(open_array(table_uri)[...]), table)]


def _objects_changed(what: str, array, before: np.ndarray, now: np.ndarray) -> str:
    diff = np.argwhere((before != now).any(axis=0))
    named = []
    for pos in map(tuple, diff[:NAMED]):
        key = array.metadata.encode_chunk_key(pos)
        was, size = int(before[(0, *pos)]), int(now[(0, *pos)])
        named.append(f"{key} ({'new' if was < 0 else 'removed' if size < 0 else f'size {was} -> {size}' if was != size else 'rewritten'})")
    more = f" and {len(diff) - NAMED} more" if len(diff) > NAMED else ""
    return f"{what}: {len(diff)} stored object(s) changed: {', '.join(named)}{more}"


def refuse_changes(problems: list[str], advice: str) -> None:
    if problems:
        raise UserError(f"{'; '.join(problems)} since this run was planned; {advice}")


class Reads:
    """A task's check of the store it reads: the metadata on the first read, then every stored
    object under each box read, once per object (``check(ranges)``: per array axis, the
    ``[start, stop)`` element range read)."""

    ADVICE = "a run must read one input throughout: restore it, or start again with --overwrite."

    def __init__(self, name: str, recorded: dict, table_uri: str | None):
        self.name, self.recorded, self.table_uri = name, recorded, table_uri
        self._seen: set = set()
        self._array = self._table = None  # the store's array and its table, opened once

    def __getstate__(self):  # a worker starts afresh: its own checks, its own handles
        return {**self.__dict__, "_seen": set(), "_array": None, "_table": None}

    def check(self, ranges) -> None:
        rec = self.recorded
        if rec["kind"] == "file":  # one stat per process
            if not self._seen:
                refuse_changes(changes(self.name, rec, None), self.ADVICE)
                self._seen.add(())
            return
        what = _what(self.name, rec["uri"])
        if self._array is None:
            if _metadata(rec["uri"]) != rec["metadata"]:
                raise UserError(f"{what}: its metadata changed since this run was planned; {self.ADVICE}")
            self._array, self._table = open_array(rec["uri"]), open_array(self.table_uri)
        spans = [(a // c, max(a // c, -(-b // c))) for (a, b), c in zip(ranges, rec["object_shape"])]
        todo = [p for p in itertools.product(*(range(a, b) for a, b in spans)) if p not in self._seen]
        if not todo:
            return
        table = np.asarray(self._table[(slice(None), *(slice(a, b) for a, b in spans))])
        fs, path = U.filesystem(rec["uri"])
        for pos in todo:
            key = self._array.metadata.encode_chunk_key(pos)
            want = tuple(int(v) for v in table[(slice(None), *(p - a for p, (a, _) in zip(pos, spans)))])
            try:
                info = fs.info(posixpath.join(path, key))
                now = (int(info["size"]), _hash(_tag(info)))
            except FileNotFoundError:
                now = (-1, 0)
            if now != want:
                raise UserError(f"{what}: stored object {key} changed since this run was planned; {self.ADVICE}")
            self._seen.add(pos)
