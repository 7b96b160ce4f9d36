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
"""

from __future__ import annotations

import fcntl
import os
import struct

from sqlalchemy.engine import make_url

from featsync.errors import Fatal

# struct flock: l_type, l_whence, l_start, l_len, l_pid and the tail padding (native
# alignment: 32 bytes on x86-64 and arm64; the kernel writes the answer back into it)
_FLOCK = "hhqqi4x"


def _whole_file(kind: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)  # l_len 0: to the end; pid 0


class SyncLock:
    def __init__(self, ledger_url: str) -> None:
        u = make_url(ledger_url)
        db = u.database
        file_db = u.get_backend_name() == "sqlite" and db and db != ":memory:"
        self.path = f"{db}.lock" if file_db else None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise Fatal naming the process that holds it."""
        if self.path is None or self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise Fatal(f"cannot open lock file {self.path!r}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _whole_file(fcntl.F_WRLCK))
        except BlockingIOError:
            holder = _first_line(fd)
            os.close(fd)
            raise Fatal(
                f"another featsync (pid {holder}) is syncing with this ledger "
                f"({self.path} is locked); one at a time, or it would send every change twice"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        line = f"{os.getpid()}\n".encode()
        os.pwrite(fd, line, 0)  # first the pid, then cut what an older one left behind
        os.ftruncate(fd, len(line))
        self._fd = fd

    def holder(self) -> str | None:
        """The pid of the process syncing with this ledger now, or None.

        Only looks: the file is opened read-only (never made), and F_OFD_GETLK reports
        a conflicting lock without taking any, so the holder, or a process taking the
        lock at this very moment, never notices."""
        if self.path is None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError:
            return "?"
        try:
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _whole_file(fcntl.F_WRLCK))
            if struct.unpack(_FLOCK, answer)[0] == fcntl.F_UNLCK:
                return None
            return _first_line(fd)
        except OSError:
            return "?"
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops both locks
            self._fd = None


def _first_line(fd: int) -> str:
    """The pid the holder wrote (a holder that has not written it yet: "?")."""
    head = os.pread(fd, 32, 0).decode("ascii", "replace")
    return head.split("\n", 1)[0].strip() or "?"
