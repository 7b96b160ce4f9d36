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

import contextlib
import dataclasses
import functools
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar

from featsync.errors import Fatal

BUSY_WAIT_S = 120.0  # a call that still finds the database locked is tried again this long


def read_only_uri(path: str) -> str:
    """An SQLite URI (for ``sqlite3.connect(..., uri=True)``) that only reads `path`."""
    # mode=ro with immutable too: an immutable open of a path removed meanwhile would
    # otherwise create an empty database there.
    mode = "mode=ro" if os.path.exists(path + "-wal") else "mode=ro&immutable=1"
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?{mode}"


def locked(uri: str) -> bool:
    """Whether a read_only_uri reads through SQLite's locks (not immutable)."""
    return "immutable=1" not in uri


# A look copies a ledger up to this size into memory (below); a bigger one is read in
# place, as it lies.
PRIVATE_COPY_MAX = 512 * 1024 * 1024


def _file_state(path: str) -> tuple[int, ...] | None:
    """What changes when anything writes the file (ctime moves on every write, whatever
    the clock's resolution makes of mtime), and how big it and its -wal are."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        wal = os.stat(path + "-wal").st_size
    except OSError:
        wal = -1
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, wal


def private_copy(path: str, busy_ms: int, attempts: int = 5) -> sqlite3.Connection | None:
    """A consistent copy of the SQLite file `path` in memory, made without writing or
    creating anything on disk; None when the file is bigger than PRIVATE_COPY_MAX.

    A file with no ``-wal`` beside it is read ``immutable`` (see read_only_uri): SQLite
    then takes no lock and trusts the file not to change, and a writer that starts
    meanwhile (a reconcile, a daemon) and checkpoints into it can leave the reader
    with pages of two states ("database disk image is malformed"). So the copy is made
    at once, and is kept only if the file, and the absence of a ``-wal``, are as they
    were before it; else it is made again. With a ``-wal`` the copy is one read
    transaction through SQLite's locks (``mode=ro``): consistent as it is. A long look
    (a report with probes) then reads one state from start to end, and an older
    schema can be brought up to date in the copy without touching the file."""
    for attempt in range(attempts):
        before = _file_state(path)
        if before is None or before[3] + max(before[4], 0) > PRIVATE_COPY_MAX:
            return None
        uri = read_only_uri(path)  # the mode is decided once: what the check below trusts
        through_locks = locked(uri)
        copy = sqlite3.connect(":memory:", check_same_thread=False)
        try:
            source = sqlite3.connect(uri, uri=True, check_same_thread=False)
            try:
                source.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
                source.backup(copy)
            finally:
                source.close()
        except sqlite3.DatabaseError:
            copy.close()
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
            continue
        if through_locks or _file_state(path) == before:
            return copy
        copy.close()  # written to while copied: again
    raise sqlite3.OperationalError(f"{path} kept changing while it was read")


LOOK_ATTEMPTS = 8  # reads of a look tried again while its file keeps being written


class Rows:
    """The rows of one statement of a look, read whole (what a cursor offers of them)."""

    lastrowid: int | None = None  # a look inserts nothing

    def __init__(self, rows: list[Any]) -> None:
        self._rows = rows
        self._next = 0

    def fetchone(self) -> Any:
        if self._next >= len(self._rows):
            return None
        self._next += 1
        return self._rows[self._next - 1]

    def fetchall(self) -> list[Any]:
        rest, self._next = self._rows[self._next :], len(self._rows)
        return rest

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    """What changes when SQLite writes a file (not the ctime: a rename moves it too)."""
    return st.st_ino, st.st_mtime_ns, st.st_size


@dataclasses.dataclass
class _Opened:
    """One connection of a look; the file it reads (a descriptor of our own: the same
    file as SQLite's, whatever becomes of the path) and its stamp when it was opened,
    and whether a ``-wal`` was beside it then. Locked (mode=ro): SQLite's locks keep
    each statement consistent, and no descriptor is kept (-1)."""

    conn: sqlite3.Connection
    fd: int
    stamp: tuple[int, int, int]
    wal: bool

    @property
    def locked(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        self.conn.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LookDb:
    """A look at an SQLite file (nothing written, nothing created) that never answers
    from pages of two states.

    Opened ``immutable`` (no ``-wal`` beside the file, see read_only_uri), SQLite
    takes no lock and trusts the file not to change; a writer that starts meanwhile (a
    cron reconcile) and checkpoints into it leaves the look reading a torn B-tree:
    "database disk image is malformed", or rows that were never there together. So
    while the look is immutable, each statement's rows are read whole and kept only if
    the file it holds (its stat, through a descriptor of the look's own) and the
    absence of a ``-wal`` are as they were when it was opened; else the look opens the
    file again (``mode=ro`` once a ``-wal`` is there: SQLite's own locks then keep
    every statement consistent) and reads again. Many rows are read a page at a time,
    each page a statement (BackupStore._pages). A file removed or replaced at its path
    is read on as it was opened, unless it was written to: then the look says so.

    `data_version()` is SQLite's ``PRAGMA data_version``, moved on by every reopening
    too (a new connection counts from its own start)."""

    def __init__(self, path: str, busy_ms: int) -> None:
        self.path = path
        self._busy_ms = int(busy_ms)
        self._opens = 1
        self._inode: int | None = None  # the file the look reads
        self._main: _Opened | None = self._connect()

    def _connect(self) -> _Opened:
        for _ in range(LOOK_ATTEMPTS):
            uri = read_only_uri(self.path)  # the mode is decided once: what the checks trust
            fd = -1
            if not locked(uri):
                try:
                    fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
                except FileNotFoundError:
                    raise self._gone("removed") from None
            try:
                st = os.fstat(fd) if fd >= 0 else os.stat(self.path)
                if self._inode is not None and st.st_ino != self._inode:
                    raise self._gone("replaced by another file")
                conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                raise
            opened = _Opened(conn, fd, _stamp(st), os.access(self.path + "-wal", os.F_OK))
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == st.st_ino:  # SQLite opened this file too
                    self._inode = st.st_ino
                    return opened
            opened.close()  # the path changed between the two opens: again
        raise sqlite3.OperationalError(f"{self.path} kept changing while it was opened")

    def _gone(self, how: str) -> sqlite3.OperationalError:
        return sqlite3.OperationalError(
            f"{self.path} was {how} while it was read: run the command again"
        )

    def _steady(self, opened: _Opened) -> bool:
        if opened.locked:
            return True
        if _stamp(os.fstat(opened.fd)) != opened.stamp:
            return False  # the file it reads was written
        return os.access(self.path + "-wal", os.F_OK) == opened.wal

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Rows:
        for _ in range(LOOK_ATTEMPTS):
            main = self._main
            if main is None:
                raise sqlite3.ProgrammingError(f"{self.path}: the look is closed")
            try:
                rows = main.conn.execute(sql, parameters).fetchall()
            except sqlite3.DatabaseError:
                if self._steady(main):
                    raise  # a fault of the file or the statement, not of a writer
            else:
                if self._steady(main):
                    return Rows(rows)
            fresh = self._connect()  # written since it was opened: fresh pages
            self._main, self._opens = fresh, self._opens + 1
            main.close()
        raise sqlite3.OperationalError(f"{self.path} kept changing while it was read")

    def tables(self) -> set[str]:
        """The names of the file's tables (a first sync makes them one by one)."""
        return {r[0] for r in self.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def data_version(self) -> int:
        real = int(self.execute("PRAGMA data_version").fetchall()[0][0])
        return (self._opens << 40) + real

    def close(self) -> None:
        if self._main is not None:
            self._main.close()
            self._main = None


def data_version(db: sqlite3.Connection | LookDb) -> int:
    """SQLite's ``PRAGMA data_version`` of a connection or a look."""
    if isinstance(db, LookDb):
        return db.data_version()
    return int(db.execute("PRAGMA data_version").fetchone()[0])


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
