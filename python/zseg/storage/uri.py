"""One funnel from a URI (local path, ``s3://...``, ``gs://...``) to a file system, plus small-file I/O.

Small files (manifests, per-chunk results, done markers) are written atomically: on a local
file system to a temporary name that is then renamed into place; on object stores a PUT is
already all-or-nothing. A reader therefore never sees half a file.

S3 credentials and endpoints come from the standard AWS variables and profiles
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` ...), never from parameters;
``gs://`` (gcsfs) takes Google's application-default credentials (a Google Batch VM's service
account, ``GOOGLE_APPLICATION_CREDENTIALS``) and ``STORAGE_EMULATOR_HOST`` for an emulator. Any
other fsspec protocol works the same way (tests/test_uris.py runs the pipeline on ``memory://``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import uuid
import zipfile

import fsspec
import numpy as np
from fsspec.core import url_to_fs

from zseg.errors import UserError


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


#: Attempts per S3 request (botocore's "standard" retries: exponential backoff with jitter, up to
#: 20 s between attempts). A long run's thousands of tasks meet 503 SlowDown, connection resets and
#: timeouts; botocore's default of 5 attempts gives up after about a second of backoff, this rides
#: out throttling episodes of many seconds. ("adaptive" retries would also slow every later request
#: of the process down to a crawl after a few throttled ones.)
S3_ATTEMPTS = 12


def storage_options(uri: str) -> dict:
    """fsspec options for ``uri``: for S3 the endpoint from ``AWS_ENDPOINT_URL`` when set, and
    retries of transient errors (:data:`S3_ATTEMPTS`). A retried PUT cannot leave half an object:
    an S3 object appears whole or not at all."""
    if str(uri).startswith("s3://"):
        options = {"config_kwargs": {"retries": {"max_attempts": S3_ATTEMPTS, "mode": "standard"},
                                     "connect_timeout": 10, "read_timeout": 60}}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return options
    return {}


def filesystem(uri: str):
    """``(fs, path)`` for ``uri``."""
    return url_to_fs(str(uri), **storage_options(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with ``/`` (works for local paths and ``s3://``)."""
    uri = str(uri)
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def _fresh(fs, path: str, uri: str) -> None:
    """Forget cached listings of ``path`` and its parents: other tasks write markers meanwhile."""
    if is_remote(str(uri)):
        fs.invalidate_cache(path)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    _fresh(fs, path, uri)
    try:
        return fs.exists(path)
    except Exception as e:  # no credentials at all: the first touch of an object store says so
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise UserError(f"{uri} cannot be reached: no AWS credentials were found ({e}); set AWS_PROFILE, or "
                            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a local "
                            "server).") from None
        raise


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


#: The suffix of an atomic write's temporary file: one a SIGKILL left behind is no content.
PARTIAL = ".partial"


def is_leftover(name: str) -> bool:
    """Whether entry ``name`` is the temporary file of an atomic write that never finished."""
    return name.endswith(PARTIAL)


@contextlib.contextmanager
def atomic_local_file(path: str, *, exclusive: bool = False):
    """A local binary file that appears at ``path`` only when complete: written to a temporary
    name beside it, renamed into place on success, removed on failure. The one copy of this.

    ``exclusive``: put into place only if nothing is at ``path`` (a hard link, which fails if the
    name exists: of racing writers exactly one wins); ``FileExistsError`` otherwise."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}{PARTIAL}"
    try:
        with open(tmp, "wb") as f:
            yield f
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_file(uri: str):
    """A binary file at ``uri`` that readers see either whole or not at all: a local temporary
    file renamed into place, or on an object store an upload that appears on close."""
    if is_remote(str(uri)):
        with open_file(uri, "wb") as f:
            yield f
        return
    _, path = filesystem(uri)
    with atomic_local_file(path) as f:
        yield f


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` so that readers see either nothing or all of it."""
    fs, path = filesystem(uri)
    if is_remote(str(uri)):
        fs.pipe_file(path, data)
        return
    with atomic_local_file(path) as f:
        f.write(data)


def create_exclusive(uri: str, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if nothing is there yet; False when something is.

    The check and the write are one step, so of two writers racing for the same name exactly
    one wins: a local file is written under a temporary name and hard-linked into place (the
    link fails if the name exists); on S3 the upload is conditional (``If-None-Match: *``).
    """
    fs, path = filesystem(uri)
    try:
        if is_remote(str(uri)):
            fs.pipe_file(path, data, mode="create")
        else:
            with atomic_local_file(path, exclusive=True) as f:
                f.write(data)
    except FileExistsError:
        return False
    return True


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()


def create_json(uri: str, obj) -> bool:
    """:func:`create_exclusive` of ``obj`` as JSON."""
    return create_exclusive(uri, _json_bytes(obj))


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj) -> None:
    write_bytes(uri, _json_bytes(obj))


def read_npz(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_npz(uri: str, **arrays) -> None:
    """``numpy.savez_compressed`` with fixed zip timestamps: the same arrays give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, mode="w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    write_bytes(uri, buf.getvalue())


def remove(uri: str, recursive: bool = True) -> None:
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def remove_entries(uri: str, keep=()) -> None:
    """Remove everything directly under folder ``uri`` but the names in ``keep``. A link is
    removed, never what it points to."""
    fs, path = filesystem(uri)
    for name in listdir(uri):
        if name in keep:
            continue
        entry = posixpath.join(path, name)
        if not is_remote(str(uri)) and (os.path.islink(entry) or not os.path.isdir(entry)):
            os.unlink(entry)
        else:
            fs.rm(entry, recursive=True)


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly under ``uri``; empty when it does not exist."""
    fs, path = filesystem(uri)
    _fresh(fs, path, uri)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def open_file(uri: str, mode: str = "rb"):
    return fsspec.open(str(uri), mode, **storage_options(uri))
