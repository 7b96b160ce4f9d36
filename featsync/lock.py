"""One syncing process per ledger.

Two featsync processes syncing through one ledger (a daemon, and a `reconcile` from
cron on the same config) would plan the same changes and send them twice. The lock is
an flock on ``<ledger file>.lock`` beside a SQLite ledger: the kernel drops it when
its process ends, however it ends (a kill -9 included), so it is never stale. A
ledger on a database server is not a file; such setups bring their own coordination
and get no lock here.
"""

from __future__ import annotations

import fcntl
import os

from sqlalchemy.engine import make_url

from featsync.errors import Fatal


class SyncLock:
    def __init__(self, ledger_url: str) -> None:
        u = make_url(ledger_url)
        db = u.database
        file_db = u.get_backend_name() == "sqlite" and db and db != ":memory:"
        self.path = f"{db}.lock" if file_db else None
        self._fd: int | None = None

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
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise Fatal(
                f"another featsync (pid {holder}) is syncing with this ledger "
                f"({self.path} is locked); one at a time, or it would send every change twice"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def holder(self) -> str | None:
        """The pid of the process syncing with this ledger now, or None."""
        if self.path is None or not os.path.exists(self.path):
            return None
        try:
            self.acquire()
        except Fatal:
            try:
                with open(self.path, encoding="ascii", errors="replace") as fh:
                    return fh.read().strip() or "?"
            except OSError:
                return "?"
        self.release()
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
