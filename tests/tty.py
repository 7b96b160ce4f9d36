"""Running featsync on a pseudo-terminal, as a person at a terminal does."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path


def run_on_tty(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120.0
) -> tuple[int, str]:
    """`python -m featsync ARGS` with stdin, stdout and stderr on one pseudo-terminal;
    its exit code and everything it wrote there (\\r\\n as the terminal gives it)."""
    full_env = {k: v for k, v in os.environ.items() if k != "FEATSYNC_CONFIG"}
    full_env.update({"TERM": "xterm-256color", "COLUMNS": "100", "LINES": "40"})
    full_env.update(env or {})
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "featsync", *args],
        cwd=cwd,
        env=full_env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
    )
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every holder of the terminal's other end has gone
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            raise AssertionError(f"featsync {' '.join(args)} did not end within {timeout} s")
        return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
