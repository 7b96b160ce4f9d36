"""SQLite files: opening one only to look (nothing written, nothing created), and
waiting out another program's lock on one.

``featsync status`` and ``reconcile --dry-run`` read the ledger and the embedded
store; they must work without write access and leave the disk as it was. SQLite's
``mode=ro`` still makes the ``-wal`` and ``-shm`` files of a WAL database when they are
missing (and cannot remove them again), so when there is no ``-wal`` file (no writer
since the last clean close) the file is opened ``immutable``; when there is one, a
writer may be at work, and ``mode=ro`` reads through its WAL.
"""

from __future__ import annotations

import functools
import os
import time
import urllib.parse
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from featsync.errors import Fatal

BUSY_WAIT_S = 120.0  # a call that still finds the database locked is tried again this long


def read_only_uri(path: str) -> str:
    """An SQLite URI (for ``sqlite3.connect(..., uri=True)``) that only reads `path`."""
    mode = "mode=ro" if os.path.exists(path + "-wal") else "immutable=1"
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?{mode}"


P = ParamSpec("P")
R = TypeVar("R")


def folder_missing(what: str, path: str, key: str) -> Fatal | None:
    """The error to raise when the folder an SQLite file (or its lock file) is to be made
    in does not exist: it names the file the user configured, not a file beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(folder):
        return None
    return Fatal(f"{what}: its folder {folder!r} does not exist; create it, or fix {key}")


def _busy(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is SQLite's "database is locked" / "busy"."""
    while exc is not None:
        text = str(exc).lower()
        if "database is locked" in text or "database is busy" in text:
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


def waits_when_locked(fn: Callable[P, R]) -> Callable[P, R]:
    """Run one ledger transaction again while another program holds the database
    locked (a backup, an sqlite3 shell, a long report), up to BUSY_WAIT_S: a briefly
    locked ledger is a pause, not the end of the run. Each transaction is all or
    nothing, so running it again is safe."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        deadline = time.monotonic() + BUSY_WAIT_S
        pause = 0.05
        while True:
            try:
                return fn(*args, **kwargs)
            except Fatal as exc:
                if not _busy(exc) or time.monotonic() >= deadline:
                    if _busy(exc):
                        raise Fatal(f"{exc} (still locked after {BUSY_WAIT_S:.0f} s)") from exc
                    raise
            time.sleep(pause)
            pause = min(2.0, pause * 2)

    return wrapper
