"""Running featsync on a pseudo-terminal, as a person at a terminal does."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_tty(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
    interrupt_at: str | None = None,
    columns: int = 120,
    stdout: Path | None = None,
) -> tuple[int, str]:
    """`python -m featsync ARGS` on a pseudo-terminal of `columns`x40; its exit code and
    all it wrote there, as the terminal got it. `interrupt_at`: a pattern; once the
    output matches it, SIGINT (as Ctrl-C) is sent, once. `stdout`: a file to send
    stdout to instead (as `featsync ... | jq` does)."""
    full_env = {
        k: v for k, v in os.environ.items() if k not in ("FEATSYNC_CONFIG", "COLUMNS", "LINES")
    }
    full_env.update({"TERM": "xterm-256color", **(env or {})})
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    out = open(stdout, "wb") if stdout is not None else None  # noqa: SIM115 (closed below)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "featsync", *args],
            cwd=cwd,
            env=full_env,
            stdin=follower,
            stdout=follower if out is None else out,
            stderr=follower,
            close_fds=True,
        )
    finally:
        if out is not None:
            out.close()
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"featsync {' '.join(args)} did not end in {timeout} s")
            ready, _, _ = select.select([leader], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the follower end is closed by every holder
                break
            if not data:
                break
            chunks.append(data)
            if interrupt_at is not None and re.search(interrupt_at, _text(chunks)):
                proc.send_signal(signal.SIGINT)
                interrupt_at = None
        return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _text(chunks: list[bytes]) -> str:
    return ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))
