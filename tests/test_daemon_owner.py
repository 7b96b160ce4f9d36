"""One owner for every cycle (issue 10, item 5): `featsync run` as a real subprocess.

One sync thread runs every cycle; the watcher, the timer, signals and reloads only
post requests to it. So a SIGTERM stops a watch-triggered cycle as it stops a rescan,
the main thread never waits behind a cycle, a rescan asked for during a rescan runs
after it, and the ledger's lock is held from the start to the stop, reloads included.
`featsync status` finds the syncing process without ever taking the lock. Tests poll
conditions with deadlines."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from featsync.lock import SyncLock
from tests.conftest import Workspace, wait_for
from tests.test_aspose import CREDS, requests_for
from tests.test_cli import featsync
from tests.test_daemon import (
    Daemons,
    Running,
    configure,
    folder_digests,
    ledger_digests,
    served,
    wait_in_step,
    write,
)


def _posts(s: Any) -> list[dict[str, Any]]:
    return [e for e in requests_for(s.srv, s.context_id) if e["method"] == "POST"]


def _stop_quickly(run: Running, within: float) -> float:
    started = time.monotonic()
    assert run.stop(signal.SIGTERM) == 0
    took = time.monotonic() - started
    assert took < within, f"the stop took {took:.1f}s\n{run.tail()}"
    return took


def test_sigterm_stops_a_watch_triggered_cycle_after_the_calls_in_flight(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    # 20 changed files make one targeted cycle of 20 calls of 0.5 s, two at a time
    # (5 s). A SIGTERM in it must stop it as it stops a rescan: no new call, the ones
    # in flight finished and recorded.
    concurrency = 2
    sections: dict[str, dict[str, Any]] = {
        "sync": {"concurrency": concurrency},
        "daemon": {"stop_timeout": 8.0},
    }
    with served(ws, tmp_path, "slowwatch", "--latency", "0.5", "--access-log", **sections) as s:
        run = daemons.start(CREDS)
        run.wait_event("cycle_finished")  # the first full rescan, of an empty folder
        for n in range(20):
            write(ws.images / f"{n:02}.jpg", n, size=(64, 48))
        run.wait_event("image_added")  # the watch-triggered cycle is sending
        acked = run.count("image_added")
        _stop_quickly(run, within=3.0)
        assert run.count("daemon_stopped") == 1
        assert "timed_out" not in run.events("daemon_stopped")[0]
        [targeted] = [e for e in run.events("cycle_finished") if e["scope"] == "paths"]
        assert targeted["not_sent"] > 0
        # At most the calls in flight (and those acknowledged but not yet logged) after
        # the signal: never the rest of the batch.
        posts = _posts(s)
        assert len(posts) <= acked + 2 * concurrency < 20, len(posts)
        # Every call the daemon made is in the ledger.
        assert {e["image_id"] for e in posts if e["status"] == 200} == set(ledger_digests(ws))
        assert run.count("image_added") == len(ledger_digests(ws))


def test_the_main_thread_never_waits_behind_a_full_rescan(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    # A full rescan of 20 calls of 0.5 s, one at a time (10 s). A SIGHUP during it is
    # taken at once; heartbeats go on; a SIGTERM stops it after the call in flight.
    sections: dict[str, dict[str, Any]] = {"sync": {"concurrency": 1}}
    with served(ws, tmp_path, "longscan", "--latency", "0.5", "--access-log", **sections) as s:
        for n in range(20):
            write(ws.images / f"{n:02}.jpg", n, size=(64, 48))
        run = daemons.start(CREDS)
        run.wait_event("image_added")  # the first full rescan is sending
        configure(ws, context=ws.overrides["context"], sync={"concurrency": 1, "ignore": [".*"]})
        mark = len(run.events())
        run.proc.send_signal(signal.SIGHUP)

        def beats_after_the_reload() -> int:
            return sum(e["event"] == "heartbeat" for e in run.events()[mark:])

        wait_for(lambda: beats_after_the_reload() >= 2, 8, f"two heartbeats\n{run.tail()}")
        assert run.count("config_reloaded") == 1
        assert run.count("cycle_finished") == 0, "the rescan ended first: no proof"
        _stop_quickly(run, within=3.0)
        [full] = run.events("cycle_finished")
        assert full["scope"] == "full" and full["not_sent"] > 0
        posts = _posts(s)
        assert {e["image_id"] for e in posts if e["status"] == 200} == set(ledger_digests(ws))


def test_a_full_rescan_asked_for_while_one_runs_is_kept_and_runs_after_it(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    # More changed paths than max_pending: the watcher drops them and asks for a full
    # rescan (an overflow). Paths are judged only after 30 s of quiet here, so only
    # full rescans send anything. An overflow during a full rescan must not be lost.
    sections: dict[str, dict[str, Any]] = {
        "sync": {"concurrency": 1},
        "daemon": {"max_pending": 2, "quiet_period": 30.0, "max_delay": 60.0},
    }
    staging = tmp_path / "staging"

    def overflow(prefix: str, seed: int) -> None:
        """Three files moved in whole: one event each, the third one too many."""
        for n in range(3):
            write(staging / f"{prefix}-{n}.jpg", seed + n, size=(64, 48))
            (staging / f"{prefix}-{n}.jpg").rename(ws.images / f"{prefix}-{n}.jpg")

    def sent(prefix: str) -> bool:
        return any(e["image_id"].startswith(prefix) for e in run.events("image_added"))

    with served(ws, tmp_path, "overrun", "--latency", "0.5", **sections) as s:
        for n in range(3):
            write(ws.images / f"first-{n}.jpg", n, size=(64, 48))
        run = daemons.start(CREDS)
        run.wait_event("image_added")  # the first rescan has scanned; it sends
        overflow("second", 10)
        run.wait_event("watch_overflow")
        wait_for(lambda: sent("second-"), 30, f"the second rescan\n{run.tail()}")
        # the second full rescan has scanned and sends: the next overflow comes now
        overflow("third", 20)
        run.wait_event("watch_overflow", 2)
        wait_for(s.in_step, 15, "the files of the second overflow synced")
        fulls = [e for e in run.events("cycle_finished") if e["scope"] == "full"]
        assert len(fulls) == 3, run.tail()  # one per request, never stacked
        assert run.count("rescan_queued") == 2
        assert run.stop() == 0


def _lock_path(ws: Workspace) -> str:
    path = SyncLock(ws.settings().ledger.url).path
    assert path is not None
    return path


class Waiter:
    """Another process's view: a blocking flock on the lock file, in a thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.got = threading.Event()
        self.thread = threading.Thread(target=self._wait)
        self.thread.start()
        # blocked in the kernel: /proc/locks lists it as waiting ("->")
        me = f" {os.getpid()} "
        wait_for(
            lambda: any(
                "->" in line and me in line for line in Path("/proc/locks").read_text().splitlines()
            ),
            10,
            "the waiter to block on the lock",
        )

    def _wait(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.got.set()
        finally:
            os.close(fd)

    def join(self) -> None:
        self.thread.join(timeout=30)


def test_a_reload_that_reopens_the_same_ledger_never_lets_go_of_the_lock(
    ws: Workspace, daemons: Daemons
) -> None:
    configure(ws)
    write(ws.images / "a.jpg", 1)
    run = daemons.start()
    wait_in_step(ws, run)
    lock_path = _lock_path(ws)
    taken = os.stat(lock_path).st_mtime_ns  # each taking of the lock writes the pid
    waiter = Waiter(lock_path)  # another featsync, waiting for its turn
    try:
        # Another [context] with the same store: the ledger and the context are opened
        # anew, the lock must stay with the daemon throughout.
        configure(ws, context={"extract_timeout": 30.0})
        run.proc.send_signal(signal.SIGHUP)
        run.wait_event("config_reloaded")
        assert run.events("config_reloaded")[0]["changed"] == ["context"]

        def fulls() -> int:
            return sum(e["scope"] == "full" for e in run.events("cycle_finished"))

        wait_for(lambda: fulls() >= 2, 30, f"the reload's rescan\n{run.tail()}")
        write(ws.images / "b.jpg", 2)
        wait_in_step(ws, run)
        assert not waiter.got.is_set(), "the lock was let go during the reload"
        # Not even for an instant: it was never taken again.
        assert os.stat(lock_path).st_mtime_ns == taken, "the lock was taken again"
        assert run.count("config_reload_failed") == 0
        assert run.stop() == 0
        wait_for(waiter.got.is_set, 10, "the lock, once the daemon stopped")
    finally:
        run.proc.kill()
        waiter.join()


def test_a_reload_onto_another_ledger_takes_its_lock_before_letting_go_of_the_old(
    ws: Workspace, daemons: Daemons
) -> None:
    configure(ws)
    write(ws.images / "a.jpg", 1)
    run = daemons.start()
    wait_in_step(ws, run)
    old_url = ws.settings().ledger.url
    other_db = ws.base / "other-ledger.db"
    other_url = f"sqlite:///{other_db}"
    other = SyncLock(other_url)
    other.acquire()  # someone syncs with the other ledger
    try:
        configure(ws, ledger={"url": other_url})
        run.proc.send_signal(signal.SIGHUP)
        run.wait_event("config_reload_failed")
        assert "another featsync" in run.events("config_reload_failed")[0]["error"]
        assert SyncLock(old_url).holder() == str(run.proc.pid)  # the old one still held
    finally:
        other.release()
    run.proc.send_signal(signal.SIGHUP)  # the other ledger is free now
    run.wait_event("config_reloaded")
    wait_for(lambda: SyncLock(other_url).holder() == str(run.proc.pid), 30, run.tail())
    wait_for(lambda: SyncLock(old_url).holder() is None, 30, run.tail())
    assert run.stop() == 0


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
