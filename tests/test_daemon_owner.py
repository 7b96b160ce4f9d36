"""One owner for every cycle (issue 10, item 5): `featsync status` finds the syncing
process without ever taking the lock. Tests poll conditions with deadlines."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from featsync.lock import SyncLock
from tests.conftest import Workspace, wait_for
from tests.test_cli import featsync
from tests.test_daemon import (
    Daemons,
    configure,
    folder_digests,
    ledger_digests,
    wait_in_step,
    write,
)


@pytest.fixture
def daemons(ws: Workspace) -> Iterator[Daemons]:
    d = Daemons(ws)
    yield d
    d.close()


def _lock_path(ws: Workspace) -> str:
    path = SyncLock(ws.settings().ledger.url).path
    assert path is not None
    return path


def test_status_finds_the_syncing_pid_without_taking_the_lock_or_making_its_file(
    ws: Workspace, daemons: Daemons
) -> None:
    configure(ws)
    write(ws.images / "a.jpg", 1)
    url = ws.settings().ledger.url
    lock_path = _lock_path(ws)
    assert featsync("status", cwd=ws.base).returncode in (0, 1)
    assert not os.path.exists(lock_path), "status made the lock file"
    assert SyncLock(url).holder() is None and not os.path.exists(lock_path)

    probes = [0]
    stop = threading.Event()

    def probe() -> None:  # `featsync status` at every instant
        while not stop.is_set():
            SyncLock(url).holder()
            probes[0] += 1

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        for _ in range(3):
            r = featsync("reconcile", cwd=ws.base)
            assert r.returncode == 0, r.stderr
        mine = SyncLock(url)
        for _ in range(300):  # this process taking it, as a reconcile would
            mine.acquire()
            mine.release()
        run = daemons.start()
        wait_in_step(ws, run)
        assert run.proc.poll() is None, run.tail()
        assert run.count("fatal_error") == 0
        wait_for(lambda: SyncLock(url).holder() == str(run.proc.pid), 10, "the daemon's pid")
        assert f"syncing: pid {run.proc.pid}" in featsync("status", cwd=ws.base).stdout
        assert run.stop() == 0
        assert SyncLock(url).holder() is None
    finally:
        stop.set()
        prober.join()
    assert probes[0] > 100
    assert set(folder_digests(ws)) == set(ledger_digests(ws))
