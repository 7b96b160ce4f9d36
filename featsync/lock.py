"""One syncing process per ledger.

Two featsync processes syncing through one ledger (a daemon, and a `reconcile` from
cron on the same config) would plan the same changes and send them twice. The lock is
taken on ``<ledger file>.lock`` beside a SQLite ledger: the kernel drops it when its
process ends, however it ends (a kill -9 included), so it is never stale. A ledger on
a database server is not a file; such setups bring their own coordination and get no
lock here.

Two kernel locks, on one open file description:
- an exclusive ``flock``: what keeps syncing processes apart (and keeps this version
  apart from older ones, which take only that);
- an open-file-description ("OFD") write lock over the whole file, taken once the
  flock is ours. It is there to be *seen*: ``F_OFD_GETLK`` asks whether a lock
  conflicts without taking one, so `featsync status` learns whether someone syncs
  without ever holding the lock itself (a probe that took it, even for an instant,
  would make a daemon or a reconcile starting at that instant fail). The flock cannot
  be tested that way; the holder's pid is the file's first line.

The second line says what the holder is (`role`): "daemon" (its cycles act on drift
marks within seconds, so `verify --repair` may leave them to it), "reconcile",
"verify --repair"; an older version writes no role ("?": not known to be a daemon).
Both lines are written while only the flock is held, before the OFD lock that makes
the holder visible: `who` never reads what a crashed holder left behind (its locks went
with it, so nobody is seen holding), nor a new holder's file before it is written.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from dataclasses import dataclass

from sqlalchemy.engine import make_url

from featsync.errors import Fatal
from featsync.ledger_open import shown_url
from featsync.sqlitefiles import folder_missing

# struct flock: l_type, l_whence, l_start, l_len, l_pid and the tail padding (native
# alignment: 32 bytes on x86-64 and arm64; the kernel writes the answer back into it)
_FLOCK = "hhqqi4x"


def _whole_file(kind: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)  # l_len 0: to the end; pid 0


@dataclass(frozen=True, slots=True)
class Holder:
    """The process syncing with a ledger now: its pid and what it is ("?": unknown)."""

    pid: str
    role: str


class SyncLock:
    def __init__(self, ledger_url: str, role: str = "reconcile") -> None:
        u = make_url(ledger_url)
        db = u.database
        file_db = u.get_backend_name() == "sqlite" and db and db != ":memory:"
        self.path = f"{db}.lock" if file_db else None
        self._ledger = f"ledger {shown_url(ledger_url)}"
        self.role = role  # written beside the pid: "daemon", "reconcile", "verify --repair"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise Fatal naming the process that holds it."""
        if self.path is None or self._fd is not None:
            return
        try:
            # O_NONBLOCK: a FIFO put where the lock file goes cannot hang us (checked below)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            missing = folder_missing(self._ledger, self.path, "[ledger] url")
            if missing is not None:
                raise missing from None
            raise Fatal(
                f"{self._ledger}: cannot open its lock file {self.path!r}: {exc.strerror}"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise Fatal(
                f"{self._ledger}: its lock file {self.path!r} is not a regular file; "
                "remove it (featsync makes it anew)"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Ours alone now (no syncing process gets past the flock): who we are is
            # written before the OFD lock makes us visible to `who`.
            lines = f"{os.getpid()}\n{self.role}\n".encode()
            os.pwrite(fd, lines, 0)  # first the pid, then cut what an older one left
            os.ftruncate(fd, len(lines))
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _whole_file(fcntl.F_WRLCK))
        except BlockingIOError:
            holder = _read_holder(fd).pid
            os.close(fd)
            raise Fatal(
                f"another featsync (pid {holder}) is syncing with this ledger "
                f"({self.path} is locked); one at a time, or it would send every change twice"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def holder(self) -> str | None:
        """The pid of the process syncing with this ledger now, or None."""
        who = self.who()
        return None if who is None else who.pid

    def who(self) -> Holder | None:
        """The process syncing with this ledger now (its pid and role), or None.

        Only looks: the file is opened read-only (never made), and F_OFD_GETLK reports
        a conflicting lock without taking any, so the holder, or a process taking the
        lock at this very moment, never notices."""
        if self.path is None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError:
            return Holder("?", "?")
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO, a device: no holder's
                return Holder("?", "?")
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _whole_file(fcntl.F_WRLCK))
            if struct.unpack(_FLOCK, answer)[0] == fcntl.F_UNLCK:
                return None
            return _read_holder(fd)
        except OSError:
            return Holder("?", "?")
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops both locks
            self._fd = None


def _read_holder(fd: int) -> Holder:
    """The pid and role the holder wrote (what it did not write, as an older version
    writes no role: "?")."""
    lines = os.pread(fd, 128, 0).decode("ascii", "replace").split("\n")
    role = lines[1].strip() if len(lines) > 1 else ""
    return Holder(lines[0].strip() or "?", role or "?")
