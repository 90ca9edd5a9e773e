"""One run per output folder: the lock ``OUTPUT/zseg.lock``.

Two writers in one folder would interleave their chunks and leave a run that no marker can
vouch for, so whoever runs stages holds the folder's lock, created exclusively
(:func:`zseg.storage.uri.create_json`: a hard link locally, ``If-None-Match: *`` on S3):

- ``zseg run`` holds it from before planning to the end of its run, refreshing a heartbeat every
  :data:`HEARTBEAT_SECONDS`, and removes it when it ends. A ``zseg run`` killed without a chance
  to remove it leaves a lock whose process is gone: the next ``zseg run`` *on the same host*
  takes it over (and says so), which is what makes kill-and-resume one command. On another host
  the process cannot be asked: a lock whose heartbeat is older than :data:`STALE_SECONDS` is
  reported as stale, with the command that clears it.
- Under Nextflow the folder belongs to the Nextflow session (``workflow.sessionId``, which
  ``-resume`` keeps): the plan task claims it with ``--session``, every task passes the same
  ``--session`` and refuses a folder held by another session or by a ``zseg run``; the last
  stage gives the folder up once the run is complete.
- A stage run by hand (``zseg <phase> --run``, no session) is refused while a ``zseg run`` holds
  the folder and is alive.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
import uuid

from zseg.errors import UserError
from zseg.storage import uri as U

log = logging.getLogger(__name__)

LOCK = "zseg.lock"
HEARTBEAT_SECONDS = 60.0
#: A lock of another host whose heartbeat is older than this is reported as stale.
STALE_SECONDS = 600.0
ZSEG_RUN, NEXTFLOW = "zseg run", "nextflow"


def lock_uri(output: str) -> str:
    return U.join(output, LOCK)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _record(holder: str, session: str | None = None) -> dict:
    now = _now()
    return {"holder": holder, "session": session, "host": socket.gethostname(), "pid": os.getpid(),
            "started": now, "heartbeat": now, "token": uuid.uuid4().hex}


def read_lock(output: str) -> dict | None:
    try:
        return U.read_json(lock_uri(output))
    except FileNotFoundError:
        return None


def _alive(rec: dict) -> bool | None:
    """Whether the holder's process runs: known on its own host only (None elsewhere)."""
    if rec.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(rec["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _age(rec: dict) -> float:
    try:
        beat = dt.datetime.fromisoformat(rec["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return float("inf")
    return (dt.datetime.now(dt.timezone.utc) - beat).total_seconds()


def _describe(rec: dict) -> str:
    if rec.get("holder") == NEXTFLOW:
        return f"Nextflow session {rec.get('session')} (planned on host {rec.get('host')} at {rec.get('started')})"
    return f"a zseg run (pid {rec.get('pid')} on host {rec.get('host')}, since {rec.get('started')})"


def _dead_zseg_run(rec: dict) -> bool:
    return rec.get("holder") == ZSEG_RUN and _alive(rec) is False


def _refusal(output: str, rec: dict) -> UserError:
    where = lock_uri(output)
    if rec.get("holder") == NEXTFLOW:
        return UserError(f"output {output!r} belongs to {_describe(rec)}; resume that run with `nextflow run ... "
                         f"-resume {rec.get('session')}`, or if it is over, delete {where} and start again.")
    if _alive(rec) is None and _age(rec) > STALE_SECONDS:
        return UserError(f"output {output!r} is locked by {_describe(rec)}, whose last heartbeat is "
                         f"{_age(rec) / 60:.0f} minutes old: if no run is using the folder, delete {where} and "
                         "start again.")
    return UserError(f"output {output!r} is in use by {_describe(rec)}; wait for it to finish, or choose "
                     "another folder.")


def _claim(output: str, rec: dict, *, same_session: bool = False) -> bool:
    """Create the lock; take over a dead zseg run's. True when ``rec`` now holds the folder,
    False when the lock already held is the same Nextflow session's."""
    for _ in range(3):
        if U.create_json(lock_uri(output), rec):
            return True
        other = read_lock(output)
        if other is None:  # removed meanwhile: try again
            continue
        if same_session and other.get("holder") == NEXTFLOW and other.get("session") == rec.get("session"):
            return False
        if not _dead_zseg_run(other):
            raise _refusal(output, other)
        log.warning("taking over the lock of %s, which is no longer running", _describe(other))
        U.remove(lock_uri(output))
    raise UserError(f"output {output!r}: could not take its lock {lock_uri(output)} (other runs keep taking it).")


class RunLock:
    """``with RunLock(output):`` holds the folder for a ``zseg run``; see the module."""

    def __init__(self, output: str):
        self.output = output
        self.record = _record(ZSEG_RUN)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        self._fresh = not U.exists(self.output)
        _claim(self.output, self.record)
        self._thread = threading.Thread(target=self._beat, name="zseg-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _ours(self) -> bool:
        rec = read_lock(self.output)
        return rec is not None and rec.get("token") == self.record["token"]

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if self._ours():
                    self.record["heartbeat"] = _now()
                    U.write_json(lock_uri(self.output), self.record)
            except Exception as e:  # a missed heartbeat only makes the lock look older
                log.debug("lock heartbeat failed: %s", e)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._ours():
            _drop(self.output, self._fresh)


def _drop(output: str, fresh: bool) -> None:
    """Remove the lock, and the folder when the lock made it and nothing else was written (a
    refused run leaves no trace)."""
    U.remove(lock_uri(output))
    if fresh and U.exists(output) and not U.listdir(output):
        U.remove(output)


@contextlib.contextmanager
def session_claim(output: str, session: str):
    """The Nextflow plan task, around planning: the folder becomes this session's (again under
    ``-resume``); if planning fails, a lock this task made goes again (with the folder it made)."""
    fresh = not U.exists(output)
    made = _claim(output, _record(NEXTFLOW, session), same_session=True)
    try:
        yield
    except BaseException:
        if made:
            _drop(output, fresh)
        raise


def check_task(root: str, session: str | None) -> None:
    """A stage's task may write into ``root``: with a Nextflow session, only a folder of that
    session (or one without a lock: planned by an earlier zseg); by hand, none a live
    ``zseg run`` holds."""
    rec = read_lock(root)
    if rec is None:
        return
    if session is not None:
        if rec.get("holder") == NEXTFLOW and rec.get("session") == session:
            return
        raise UserError(f"this task is of Nextflow session {session}, but {root!r} belongs to {_describe(rec)}; "
                        "one folder takes one run.")
    if rec.get("holder") == ZSEG_RUN and not _dead_zseg_run(rec) and _age(rec) <= STALE_SECONDS:
        raise _refusal(root, rec)


def release(root: str, session: str) -> None:
    """The session's last stage: a complete run gives its folder up."""
    rec = read_lock(root)
    if rec is not None and rec.get("holder") == NEXTFLOW and rec.get("session") == session:
        U.remove(lock_uri(root))
