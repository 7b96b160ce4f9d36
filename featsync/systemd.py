"""systemd's side of the daemon: the notify protocol, and the sense of progress that
decides whether the watchdog is pinged.

`Type=notify` services tell systemd READY=1, STATUS=..., WATCHDOG=1 and STOPPING=1
as datagrams of KEY=VALUE lines on the unix socket named by $NOTIFY_SOCKET (an
initial "@" means the abstract namespace). With WatchdogSec= set, systemd passes
$WATCHDOG_USEC and restarts a service that stays silent that long.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any


class Notifier:
    """systemd's notify protocol: datagrams of KEY=VALUE lines to $NOTIFY_SOCKET."""

    def __init__(self, log: Any, environ: Mapping[str, str] = os.environ) -> None:
        self.log = log
        self.address: str | None = environ.get("NOTIFY_SOCKET") or None
        if self.address and self.address.startswith("@"):  # the abstract namespace
            self.address = "\0" + self.address[1:]
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and mine and int(usec) > 0 else None
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> None:
        if self.address is None:
            return
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self.address)
        except OSError as exc:
            if not self._failed:  # say it once, not every ping
                self._failed = True
                self.log.warning("notify_failed", socket=self.address, error=str(exc))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Pulse:
    """Whether the daemon is making progress: the main loop turns, or a running cycle
    moves on (a folder listed, a file hashed, an outcome recorded)."""

    def __init__(self) -> None:
        self.loop_at = self.progress_at = time.monotonic()
        self.cycles = 0  # cycles running now

    def loop(self) -> None:
        self.loop_at = time.monotonic()

    def progress(self) -> None:
        self.progress_at = time.monotonic()

    def alive(self, within: float) -> bool:
        now = time.monotonic()
        if self.cycles:
            return now - self.progress_at < within
        return now - self.loop_at < within
