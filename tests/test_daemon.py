"""`featsync run` as a real subprocess on a real folder: it follows every kind of change,
coalesces bursts, survives SIGTERM, SIGKILL and SIGHUP, and speaks systemd's notify
protocol over a real unix datagram socket. Tests poll conditions with deadlines."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from featsync.model import State
from featsync.samples import textured_bytes
from tests.conftest import Backend, Server, Workspace, set_mtime_past, start_server, wait_for
from tests.test_aspose import CREDS, requests_for, served_ids, use_server
from tests.test_cli import featsync

QUIET = 0.3
DAEMON = {
    "quiet_period": QUIET,
    "max_delay": 3.0,
    "heartbeat_interval": 1.0,
    "rescan_interval": 3600.0,  # changes must come from the watcher, not a rescan
    "stop_timeout": 10.0,
}


@dataclass
class Running:
    """A `featsync run` subprocess; its JSON log lines in `log_path`."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("{") and line.endswith("}"):
                event = json.loads(line)
                if name is None or event["event"] == name:
                    out.append(event)
        return out

    def count(self, name: str) -> int:
        return len(self.events(name))

    def wait_event(self, name: str, n: int = 1, timeout: float = 30.0) -> None:
        wait_for(lambda: self.count(name) >= n, timeout, f"{n} x {name}\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(encoding="utf-8").splitlines()[-15:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"featsync run did not stop on {sig}:\n{self.tail()}") from None


class Daemons:
    """Starts daemons for a test and makes sure none outlives it."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.started: list[Running] = []

    def start(self, env: dict[str, str] | None = None) -> Running:
        n = len(self.started)
        log_path = self.ws.base / f"daemon-{n}.log"
        full_env = {k: v for k, v in os.environ.items() if k != "FEATSYNC_CONFIG"}
        full_env.update(env or {})
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "featsync", "run", "--config", str(self.ws.config_path)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=full_env,
            )
        run = Running(proc, log_path)
        self.started.append(run)
        return run

    def close(self) -> None:
        for run in self.started:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


def configure(ws: Workspace, **extra: dict[str, Any]) -> None:
    sections: dict[str, dict[str, Any]] = {
        "sync": {"folder": "images"},
        "log": {"format": "json"},
        "daemon": dict(DAEMON),
    }
    for name, values in extra.items():
        sections[name] = {**sections.get(name, {}), **values}
    ws.write_config(**sections)


@dataclass
class Served:
    """A `featsync serve` of a test's own, and the search context the config points at."""

    srv: Server
    context_id: str
    ws: Workspace

    def in_step(self) -> bool:
        return in_step(self.ws, served_ids(self.srv, self.context_id))

    def sends(self, *methods: str) -> Counter[str]:
        """Image IDs by the number of successful calls of these methods the server saw."""
        return Counter(
            e["image_id"]
            for e in requests_for(self.srv, self.context_id)
            if e["method"] in methods and e["status"] == 200
        )


@contextlib.contextmanager
def served(
    ws: Workspace, tmp_path: Path, name: str, *serve_args: str, **sections: dict[str, Any]
) -> Iterator[Served]:
    """Start `featsync serve` with these options, make a context on it, and write the
    config (`sections` added to the daemon tests' own) to sync into it."""
    srv = start_server(tmp_path / name, *serve_args)
    try:
        context_id = use_server(ws, srv)
        configure(ws, context=ws.overrides["context"], **sections)
        yield Served(srv, context_id, ws)
    finally:
        srv.stop()


def folder_digests(ws: Workspace) -> dict[str, str]:
    out = {}
    for path in ws.images.rglob("*"):
        if path.is_file() and not path.name.startswith(".") and path.suffix in (".jpg", ".png"):
            rel = path.relative_to(ws.images).as_posix()
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def ledger_digests(ws: Workspace) -> dict[str, str]:
    ledger = ws.ledger()
    try:
        return {i: r.digest for i, r in ledger.load().items() if r.state == State.SYNCED}
    finally:
        ledger.close()


def in_step(ws: Workspace, remote: set[str] | None = None) -> bool:
    """The folder, the ledger and the context agree, content included."""
    folder = folder_digests(ws)
    held = ws.remote_ids() if remote is None else remote
    return ledger_digests(ws) == folder and held == set(folder)


def wait_in_step(
    ws: Workspace,
    run: Running,
    timeout: float = 30.0,
    remote: Callable[[], set[str]] | None = None,
) -> None:
    def ok() -> bool:
        return in_step(ws, remote() if remote is not None else None)

    wait_for(ok, timeout, f"folder, ledger and context in step\n{run.tail()}")


def write(path: Path, seed: int, size: tuple[int, int] = (160, 120)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = textured_bytes(seed, size=size)
    path.write_bytes(data)
    return data


# -- the watcher's pieces, in process ---------------------------------------------------


def test_pending_releases_a_burst_once_it_is_quiet_and_holds_growing_files() -> None:
    from featsync.watch import Pending

    now = [100.0]
    pending = Pending(quiet=2.0, max_delay=30.0, limit=10, clock=lambda: now[0])
    sizes = {"a.jpg": 10, "b.jpg": 20}
    pending.mark("a.jpg", 10)
    now[0] += 1.5
    pending.mark("b.jpg", 20)
    now[0] += 1.0  # a.jpg is quiet, but the burst is not: wait for it
    assert pending.take(sizes.get) == []
    assert pending.holds("b.jpg") and not pending.holds("a.jpg")
    now[0] += 1.0
    sizes["b.jpg"] = 25  # grew without an event: not yet
    assert pending.take(sizes.get) == ["a.jpg"]
    assert pending.next_due() == now[0] + 2.0
    now[0] += 2.0
    assert pending.take(sizes.get) == ["b.jpg"] and len(pending) == 0


def test_pending_lets_a_steady_stream_through_after_max_delay_and_is_bounded() -> None:
    from featsync.watch import Pending

    now = [0.0]
    pending = Pending(quiet=1.0, max_delay=5.0, limit=3, clock=lambda: now[0])
    pending.mark("old.jpg", 1)
    while now[0] < 5.0:  # another file keeps changing: the newest event is never quiet
        now[0] += 0.5
        pending.mark("busy.jpg", int(now[0] * 10))
        if now[0] < 5.0:
            assert pending.take(lambda _: 1) == []
    assert pending.take(lambda rel: 1 if rel == "old.jpg" else 50) == ["old.jpg"]
    for name in ["x", "y", "z"]:
        pending.mark(name, 1)
    assert pending.overflowed and len(pending) == 0  # dropped: a full rescan instead


def test_a_failing_handler_or_a_watchdog_warning_asks_for_a_rescan(tmp_path: Path) -> None:
    import logging

    from featsync.scan import ScanRules
    from featsync.watch import Handler, Pending, Watcher

    troubles: list[str] = []
    wakes: list[int] = []
    pending = Pending(1.0, 10.0, 100)
    rules = ScanRules(str(tmp_path), frozenset({"jpg"}), (".*", "*.tmp"))
    handler = Handler(rules, pending, lambda: wakes.append(1), troubles.append)

    class Broken:  # an event watchdog could never build: the handler must not raise
        event_type = "created"
        is_directory = False
        src_path = None

    handler.dispatch(Broken())
    assert troubles and "event handler failed" in troubles[0]

    class Event:
        def __init__(self, kind: str, src: str, dest: str = "", is_dir: bool = False) -> None:
            self.event_type, self.src_path, self.dest_path = kind, src, dest
            self.is_directory = is_dir

    root = str(tmp_path)
    handler.dispatch(Event("opened", f"{root}/a.jpg"))  # our own reads
    handler.dispatch(Event("created", f"{root}/.a.jpg.swp"))
    handler.dispatch(Event("created", f"{root}/a.jpg.tmp"))
    handler.dispatch(Event("created", f"{root}/.git/x.jpg"))
    handler.dispatch(Event("modified", f"{root}/sub", is_dir=True))
    assert len(pending) == 0 and not wakes
    handler.dispatch(Event("moved", f"{root}/a.jpg.tmp", f"{root}/a.jpg"))  # an editor's save
    handler.dispatch(Event("created", f"{root}/new", is_dir=True))
    assert len(pending) == 2
    assert len(wakes) == 1  # the first of a batch wakes the daemon; it knows when to look

    class Log:
        def info(self, *a: Any, **k: Any) -> None: ...

        error = warning = info

    watcher = Watcher("native", 1.0, handler, Log())
    assert watcher.start() == "native"
    try:
        troubles.clear()
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
        assert troubles == ["watchdog: Inotify queue overflowed; filesystem events were lost"]
        assert watcher.alive()
    finally:
        watcher.stop()


# -- the daemon, as a subprocess --------------------------------------------------------


def test_the_daemon_follows_every_kind_of_change(
    ws: Workspace, daemons: Daemons, backend: Backend
) -> None:
    configure(ws, context=backend.context)
    write(ws.images / "keep.jpg", 1)
    write(ws.images / "edit.jpg", 2)
    write(ws.images / "gone.jpg", 3)
    write(ws.images / "old-name.jpg", 4)
    run = daemons.start(backend.env)
    wait_in_step(ws, run, remote=backend.remote)
    assert run.count("image_added") == 4

    write(ws.images / "new.jpg", 10)  # create
    write(ws.images / "edit.jpg", 11)  # modify
    os.utime(ws.images / "keep.jpg")  # touch: the content is the same
    (ws.images / "gone.jpg").unlink()  # delete
    (ws.images / "old-name.jpg").rename(ws.images / "new-name.jpg")  # rename
    deep = ws.images / "a" / "b" / "c"
    deep.mkdir(parents=True)  # mkdir -p, files right after it
    for n in range(3):
        write(deep / f"{n}.jpg", 20 + n)
    temp = ws.images / ".edit.jpg.swp"  # an editor's save: a temp file, then a rename
    write(temp, 12)
    temp.rename(ws.images / "edit.jpg")
    (ws.images / "notes.tmp").write_text("not an image")
    outside = ws.base / "outside"  # a folder dragged in from elsewhere, and one out
    write(outside / "in-1.jpg", 30)
    write(outside / "in-2.jpg", 31)
    outside.rename(ws.images / "dragged-in")
    wait_in_step(ws, run, remote=backend.remote)
    (ws.images / "dragged-in").rename(ws.base / "dragged-out")
    wait_in_step(ws, run, remote=backend.remote)
    assert set(ledger_digests(ws)) == {
        "keep.jpg",
        "edit.jpg",
        "new.jpg",
        "new-name.jpg",
        "a/b/c/0.jpg",
        "a/b/c/1.jpg",
        "a/b/c/2.jpg",
    }
    wait_for(lambda: run.count("image_deleted") == 4, 10, "four deletes")
    ids = Counter(e["image_id"] for e in run.events() if e["event"].startswith("image_"))
    assert ids["keep.jpg"] == 1  # the touch cost no call
    assert ids[".edit.jpg.swp"] == 0 and ids["notes.tmp"] == 0
    assert run.stop() == 0
    assert run.count("daemon_stopped") == 1


def test_a_file_written_slowly_is_sent_once_whole(
    ws: Workspace, daemons: Daemons, backend: Backend
) -> None:
    configure(ws, context=backend.context)
    run = daemons.start(backend.env)
    run.wait_event("cycle_finished")
    data = textured_bytes(7, size=(640, 480))
    target = ws.images / "slow.jpg"
    chunks = [data[i : i + len(data) // 8] for i in range(0, len(data), len(data) // 8)]
    with open(target, "wb") as fh:
        for chunk in chunks:  # a slow writer: a chunk every QUIET/3 seconds
            fh.write(chunk)
            fh.flush()
            time.sleep(QUIET / 3)
    wait_in_step(ws, run, remote=backend.remote)
    ledger = ws.ledger()
    try:
        history = ledger.history_of("slow.jpg")
    finally:
        ledger.close()
    whole = hashlib.sha256(data).hexdigest()
    assert [(h["action"], h["digest"]) for h in history] == [("add", whole)]
    assert not [e for e in run.events("image_failed") if e["image_id"] == "slow.jpg"]


def test_a_burst_of_a_thousand_files_is_one_add_per_file(ws: Workspace, daemons: Daemons) -> None:
    configure(ws, sync={"concurrency": 4})
    run = daemons.start()
    run.wait_event("cycle_finished")
    blobs = [textured_bytes(n, "PNG", size=(48, 48)) for n in range(1000)]
    for n, blob in enumerate(blobs):
        (ws.images / f"burst-{n:04}.png").write_bytes(blob)
    wait_for(lambda: run.count("image_added") >= 1000, 120, f"1000 adds\n{run.tail()}")
    wait_in_step(ws, run)
    added = Counter(e["image_id"] for e in run.events("image_added"))
    assert len(added) == 1000 and set(added.values()) == {1}
    assert run.count("image_updated") == 0
    cycles = [e for e in run.events("cycle_finished") if e["scope"] == "paths"]
    assert len(cycles) < 20, f"{len(cycles)} cycles for one burst"


def test_sigterm_mid_batch_stops_cleanly_and_a_restart_finishes(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    with served(
        ws, tmp_path, "slow", "--latency", "0.3", "--access-log", sync={"concurrency": 2}
    ) as s:
        for n in range(30):
            write(ws.images / f"{n:02}.jpg", n)
        run = daemons.start(CREDS)
        run.wait_event("image_added", 4)
        started = time.monotonic()
        assert run.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 10  # the calls in flight finished, no more
        assert run.count("daemon_stopped") == 1
        done = run.count("image_added")
        assert 4 <= done < 30
        assert len(ledger_digests(ws)) == done  # every acknowledged call is recorded

        again = daemons.start(CREDS)
        wait_for(s.in_step, 60, again.tail())
        posts = s.sends("POST")
        assert set(posts) == set(folder_digests(ws)) and max(posts.values()) == 1
        assert again.stop() == 0


def test_sigkill_at_random_points_then_a_restart_converges(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    rnd = random.Random(4)
    concurrency = 4
    sync = {"concurrency": concurrency}
    with served(ws, tmp_path, "killed", "--latency", "0.05", "--access-log", sync=sync) as s:
        for n in range(80):
            write(ws.images / f"{n:02}.jpg", n, size=(96, 72))
        kills = 0
        for _ in range(4):
            run = daemons.start(CREDS)
            target = rnd.randrange(3, 15)  # acknowledged calls before the kill

            def far_enough(r: Running = run, t: int = target) -> bool:
                return _acks(r) >= t or s.in_step()

            wait_for(far_enough, 60, "calls to be acknowledged")
            run.proc.kill()
            run.proc.wait()
            kills += 1
        last = daemons.start(CREDS)
        wait_for(s.in_step, 60, last.tail())
        assert last.stop() == 0
        sends = s.sends("POST", "PUT")
        assert set(sends) == set(folder_digests(ws))
        repeats = sum(n - 1 for n in sends.values())
        # A repeat only for a call in flight when a kill came: handed to a worker and its
        # outcome not yet recorded. apply keeps at most 2 x concurrency handed out (the
        # workers run `concurrency` of them; finished ones wait a moment to be recorded).
        assert repeats <= kills * 2 * concurrency, sends
        assert max(sends.values()) <= 1 + kills


def _acks(run: Running) -> int:
    return run.count("image_added") + run.count("image_updated")


def test_sighup_reloads_the_config_and_a_broken_one_is_refused(
    ws: Workspace, daemons: Daemons
) -> None:
    configure(ws, sync={"ignore": [".*", "draft-*"]})
    write(ws.images / "final.jpg", 1)
    write(ws.images / "draft-1.jpg", 2)
    run = daemons.start()
    wait_for(lambda: set(ledger_digests(ws)) == {"final.jpg"}, 30, run.tail())

    configure(ws, sync={"ignore": [".*"]})
    run.proc.send_signal(signal.SIGHUP)
    run.wait_event("config_reloaded")
    assert run.events("config_reloaded")[0]["changed"] == ["sync"]
    wait_in_step(ws, run)  # the reload's rescan picked up the draft
    assert "draft-1.jpg" in ledger_digests(ws)

    good = ws.config_path.read_text(encoding="utf-8")
    ws.config_path.write_text("[sync\nfolder = ", encoding="utf-8")
    run.proc.send_signal(signal.SIGHUP)
    run.wait_event("config_reload_failed")
    assert "not valid TOML" in run.events("config_reload_failed")[0]["error"]
    ws.config_path.write_text(good, encoding="utf-8")  # for this test's helpers; no SIGHUP
    write(ws.images / "after.jpg", 3)  # still running, on the config it had
    wait_in_step(ws, run)
    assert run.proc.poll() is None
    assert run.stop() == 0


def test_systemd_notify_protocol_over_a_real_socket(ws: Workspace, daemons: Daemons) -> None:
    configure(ws)
    write(ws.images / "a.jpg", 1)
    path = str(ws.base / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    got: list[tuple[float, str]] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            try:
                got.append((time.monotonic(), sock.recv(4096).decode()))
            except TimeoutError:
                continue

    reader = threading.Thread(target=listen)
    reader.start()
    try:
        run = daemons.start({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})

        def messages() -> list[str]:
            return [m for _, m in got]

        wait_for(lambda: any("READY=1" in m for m in messages()), 30, "READY=1")
        wait_for(lambda: sum(m == "WATCHDOG=1" for m in messages()) >= 3, 10, "WATCHDOG=1")
        wait_for(lambda: any(m.startswith("STATUS=1 synced") for m in messages()), 10, "STATUS")
        assert run.stop() == 0
        wait_for(lambda: any("STOPPING=1" in m for m in messages()), 5, "STOPPING=1")
        first = messages()
        assert first.index(next(m for m in first if "READY=1" in m)) < first.index("WATCHDOG=1")
    finally:
        stop.set()
        reader.join()
        sock.close()


def test_the_watchdog_ping_stops_while_a_cycle_makes_no_progress(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    # Every call takes 3 s: while the first cycle waits on them, nothing moves on, so
    # systemd must hear no WATCHDOG=1 (it would restart a daemon stuck like this).
    srv = start_server(tmp_path / "stuck", "--latency", "3")
    path = str(ws.base / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        use_server(ws, srv)
        configure(
            ws,
            sync={"concurrency": 1},
            context={**ws.overrides["context"], "read_timeout": 30.0},
        )
        write(ws.images / "a.jpg", 1)
        run = daemons.start({**CREDS, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "500000"})
        sock.settimeout(30)
        while "READY=1" not in sock.recv(4096).decode():
            pass
        # Pings may trail the last progress by up to one interval; then, while the
        # calls hang (the token and the add take 3 s each), there must be silence of
        # three watchdog intervals.
        sock.settimeout(0.1)
        deadline = time.monotonic() + 5
        last_ping = time.monotonic()
        quiet = False
        while not quiet and time.monotonic() < deadline:
            try:
                if sock.recv(4096).decode() == "WATCHDOG=1":
                    last_ping = time.monotonic()
            except TimeoutError:
                pass
            quiet = time.monotonic() - last_ping >= 1.5
        assert quiet, "WATCHDOG=1 kept coming while the cycle was stuck on a call"
        assert run.count("image_added") == 0
        run.wait_event("image_added", timeout=30)  # it moves on: the pings come back
        sock.settimeout(5)
        while sock.recv(4096).decode() != "WATCHDOG=1":
            pass
        assert run.stop() == 0
    finally:
        sock.close()
        srv.stop()


def test_a_rejected_image_waits_and_retry_clears_the_wait(ws: Workspace, daemons: Daemons) -> None:
    configure(ws)
    (ws.images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    write(ws.images / "fine.jpg", 1)
    run = daemons.start()
    run.wait_event("image_failed")
    status = featsync("status", cwd=ws.base)
    assert status.returncode == 1
    assert "failed: broken.jpg" in status.stdout and "tries 1" in status.stdout
    assert run.count("image_failed") == 1  # waits 30 s before the next try

    retried = featsync("retry", "--all", cwd=ws.base)
    assert retried.returncode == 0 and "retry broken.jpg" in retried.stdout
    run.wait_event("image_failed", 2)  # tried again within a second or so
    assert "tries 2" in featsync("status", cwd=ws.base).stdout

    write(ws.images / "broken.jpg", 5)  # fixed: a changed file is tried at once
    wait_in_step(ws, run)
    assert featsync("retry", "nothing.jpg", cwd=ws.base).returncode == 1
    assert run.stop() == 0


@pytest.mark.parametrize("mode", ["polling", "off"])
def test_without_inotify_polling_or_rescans_still_see_changes(
    ws: Workspace, daemons: Daemons, mode: str
) -> None:
    daemon = {"watcher": mode, "polling_interval": 0.2}
    if mode == "off":
        daemon["rescan_interval"] = 1.0  # only the periodic rescans see changes
    configure(ws, daemon=daemon)
    run = daemons.start()
    run.wait_event("cycle_finished")
    assert run.events("watcher_started")[0]["mode"] == mode
    write(ws.images / "later.jpg", 9)
    wait_in_step(ws, run)
    assert run.stop() == 0


def test_the_heartbeat_tells_an_operator_how_things_stand(ws: Workspace, daemons: Daemons) -> None:
    configure(ws)
    write(ws.images / "a.jpg", 1)
    run = daemons.start()
    wait_in_step(ws, run)
    run.wait_event("heartbeat", 2)
    beat = run.events("heartbeat")[-1]
    assert beat["synced"] == 1 and beat["synced_since_start"] == 1
    assert beat["pending"] == 0 and beat["in_flight"] == 0 and beat["quarantined"] == 0
    assert beat["last_good_cycle_age_s"] is not None and beat["watcher"] == "native"
    assert beat["counts_age_s"] is not None
    assert run.stop() == 0


def test_a_ledger_locked_by_another_program_holds_up_the_sync_never_the_heartbeat(
    ws: Workspace, daemons: Daemons
) -> None:
    """Another program holds the ledger locked (BEGIN EXCLUSIVE): the sync waits for the
    lock, the heartbeat goes on with the last known counts and their age, and once the
    lock is let go the daemon carries on."""
    configure(ws)
    write(ws.images / "a.jpg", 1)
    run = daemons.start()
    wait_in_step(ws, run)
    run.wait_event("heartbeat")
    db = make_url(ws.settings().ledger.url).database
    assert db is not None
    holder = sqlite3.connect(db, isolation_level=None, timeout=0)
    other = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")  # no one else can write now
        mark = len(run.events())
        write(ws.images / "b.jpg", 2)  # its cycle waits for the lock

        def beats() -> list[dict[str, Any]]:
            return [e for e in run.events()[mark:] if e["event"] == "heartbeat"]

        wait_for(lambda: len(beats()) >= 3, 30, f"3 heartbeats while locked\n{run.tail()}")
        assert "b.jpg" not in ledger_digests(ws), "the lock held nothing up: no proof"
        for beat in beats():
            assert beat["level"] == "info" and "error" not in beat, beat
            assert beat["synced"] == 1 and beat["quarantined"] == 0, beat
        ages = [beat["counts_age_s"] for beat in beats()]
        assert ages == sorted(ages) and ages[-1] > ages[0], ages  # kept, not read anew
    finally:
        holder.close()  # lets the lock go (the transaction rolled back)
        other.close()
    wait_in_step(ws, run)
    wait_for(
        lambda: any(e["synced"] == 2 for e in run.events("heartbeat")),
        30,
        f"a heartbeat with the new counts\n{run.tail()}",
    )
    for name in ("loop_error", "cycle_failed", "counts_failed", "fatal_error"):
        assert run.count(name) == 0, run.tail()
    assert run.stop() == 0


def test_an_outage_pauses_the_worker_instead_of_burning_calls(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "flaky")
    port = int(srv.url.rsplit(":", 1)[1])
    try:
        context_id = use_server(ws, srv, max_retries=1, backoff_max=0.2, connect_timeout=1.0)
        configure(
            ws,
            sync={"concurrency": 2},
            context=ws.overrides["context"],
            daemon={"outage_wait": 1.0},
        )
        write(ws.images / "first.jpg", 1)
        run = daemons.start(CREDS)
        wait_for(lambda: in_step(ws, served_ids(srv, context_id)), 30, run.tail())
        srv.stop()  # the service goes away
        for n in range(30):
            write(ws.images / f"later-{n:02}.jpg", 10 + n, size=(64, 48))
        run.wait_event("sync_paused", 3)
        paused = [e["retry_in_s"] for e in run.events("sync_paused")]
        # the pause grows (doubling, with ±10% jitter)
        assert all(0.9 * b <= p <= 1.1 * b for p, b in zip(paused[:3], [1, 2, 4], strict=True))
        backoffs = run.events("worker_backoff")
        assert backoffs and backoffs[0]["not_sent"] > 20  # most images were never tried
        failed = Counter(e["image_id"] for e in run.events("image_failed"))
        cycles = len(run.events("cycle_finished"))
        # a cycle stops after 3 transient failures in a row, and the calls already
        # handed to the 2 workers fail too: a handful of calls a cycle, not one per image
        assert sum(failed.values()) <= (3 + 2 * 2) * cycles, failed

        srv = start_server(tmp_path / "flaky", port=port)  # back, with its contexts
        wait_for(lambda: in_step(ws, served_ids(srv, context_id)), 60, run.tail())
        ledger = ws.ledger()
        try:
            assert max(r.attempts for r in ledger.load().values()) == 0  # no image's fault
        finally:
            ledger.close()
        assert run.stop() == 0
    finally:
        srv.stop()


def test_an_overrunning_rescan_is_followed_by_one_more_right_after_never_stacked(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    import datetime as dt
    import itertools

    sections: dict[str, dict[str, Any]] = {
        "sync": {"concurrency": 1},
        "daemon": {"rescan_interval": 1.0},
    }
    with served(ws, tmp_path, "slowscan", "--latency", "0.4", **sections):
        for n in range(8):
            write(ws.images / f"{n}.jpg", n, size=(64, 48))
        run = daemons.start(CREDS)  # the first rescan takes over 3 s: the next are due
        run.wait_event("rescan_queued", timeout=30)
        assert run.events("rescan_queued")[0]["reason"] == "schedule"

        def fulls() -> list[dict[str, Any]]:
            return [e for e in run.events("cycle_finished") if e["scope"] == "full"]

        wait_for(lambda: len(fulls()) >= 2, 30, "a second full rescan")
        assert run.stop() == 0
        spans = []  # (start, end) of each full cycle, on the log's clock
        for e in fulls():
            end = dt.datetime.fromisoformat(e["timestamp"]).timestamp()
            spans.append((end - e["duration_ms"] / 1000, end))
        # One at a time, and the one asked for during the first starts as it ends (the
        # timer's requests were kept: folded into one, not dropped, not stacked).
        assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(spans))
        assert spans[1][0] - spans[0][1] < 0.5, spans
        assert run.count("cycle_crashed") == 0 and run.count("rescan_failed") == 0


def test_an_inotify_queue_overflow_leads_to_a_full_rescan(ws: Workspace, daemons: Daemons) -> None:
    configure(ws)
    run = daemons.start()
    run.wait_event("cycle_finished")
    noise = ws.images / "noise"
    noise.mkdir()
    run.wait_event("cycle_finished", 2)  # the new folder was looked at: it is watched
    run.proc.send_signal(signal.SIGSTOP)  # nothing reads the kernel's queue meanwhile
    try:
        limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        for n in range(limit + 2000):  # more events than the queue holds
            (noise / f"{n}.txt").touch()
        write(ws.images / "lost-in-the-noise.jpg", 1)
    finally:
        run.proc.send_signal(signal.SIGCONT)
    run.wait_event("watcher_problem")
    assert "overflow" in run.events("watcher_problem")[0]["error"]
    wait_in_step(ws, run)
    assert any(e["scope"] == "full" and e["added"] == 1 for e in run.events("cycle_finished")), (
        run.tail()
    )
    assert run.stop() == 0


def test_an_inotify_limit_is_explained_and_rescans_carry_on(
    ws: Workspace, daemons: Daemons
) -> None:
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    configure(ws, daemon={"rescan_interval": 1.0})
    held: list[int] = []
    try:  # use up this user's inotify instances, as a busy machine might
        while True:
            fd = libc.inotify_init1(os.O_CLOEXEC)
            if fd < 0:
                assert ctypes.get_errno() == errno.EMFILE
                break
            held.append(fd)
        run = daemons.start()
        run.wait_event("watcher_failed")
    finally:
        for fd in held:
            os.close(fd)
    failed = run.events("watcher_failed")[0]
    assert "inotify instance limit" in failed["error"]
    assert "fs.inotify.max_user_instances" in failed["hint"]
    write(ws.images / "seen-by-a-rescan.jpg", 1)
    wait_in_step(ws, run)
    # the instances are free again: the next rescan starts the watch
    wait_for(lambda: run.count("watcher_started") >= 1, 15, run.tail())
    assert run.events("watcher_started")[-1]["mode"] == "native"
    assert run.stop() == 0


def test_a_folder_that_goes_away_deletes_nothing_and_is_watched_again(
    ws: Workspace, daemons: Daemons
) -> None:
    configure(ws, daemon={"rescan_interval": 1.0})
    for n in range(3):
        write(ws.images / f"{n}.jpg", n)
    run = daemons.start()
    wait_in_step(ws, run)
    held = ws.remote_ids()
    ws.images.rename(ws.base / "unmounted")  # as if the disk went away
    run.wait_event("folder_unavailable")
    wait_for(lambda: run.count("folder_unavailable") >= 2, 15, "two rescans of a missing folder")
    assert ws.remote_ids() == held and run.count("image_deleted") == 0
    (ws.base / "unmounted").rename(ws.images)  # back
    wait_for(lambda: run.count("watcher_started") >= 2, 15, run.tail())
    write(ws.images / "new.jpg", 9)
    wait_in_step(ws, run)
    assert run.count("image_deleted") == 0
    assert run.stop() == 0


def test_calls_stuck_past_stop_timeout_do_not_hold_up_the_stop(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    sections: dict[str, dict[str, Any]] = {
        "sync": {"concurrency": 2},
        "daemon": {"stop_timeout": 1.0},
    }
    with served(ws, tmp_path, "stuckstop", "--latency", "4", "--access-log", **sections) as s:
        for n in range(4):
            write(ws.images / f"{n}.jpg", n, size=(64, 48))
        run = daemons.start(CREDS)
        wait_for(lambda: any(e["in_flight"] > 0 for e in run.events("heartbeat")), 30)
        started = time.monotonic()
        assert run.stop() == 0
        assert time.monotonic() - started < 4  # did not wait for the 4 s calls
        assert run.events("daemon_stopped")[0]["timed_out"] is True
        again = daemons.start(CREDS)
        wait_for(s.in_step, 60, again.tail())
        posts = s.sends("POST")
        assert set(posts) == set(folder_digests(ws)) and max(posts.values()) <= 2
        assert again.stop() == 0


def test_a_folder_deleted_whole_past_the_limit_is_withheld_not_deleted(
    ws: Workspace, daemons: Daemons
) -> None:
    configure(ws, safety={"max_delete_count": 2})
    for n in range(3):
        write(ws.images / "album" / f"{n}.jpg", n)
    write(ws.images / "other.jpg", 9)
    run = daemons.start()
    wait_in_step(ws, run)
    held = ws.remote_ids()
    for path in (ws.images / "album").iterdir():
        path.unlink()
    (ws.images / "album").rmdir()  # rm -rf album: one folder, three deletes in one plan
    run.wait_event("deletes_withheld")
    assert "max_delete_count" in run.events("deletes_withheld")[0]["reason"]
    assert ws.remote_ids() == held and run.count("image_deleted") == 0
    assert run.stop() == 0
    confirmed = featsync("reconcile", "--confirm-deletes", cwd=ws.base)
    assert confirmed.returncode == 0, confirmed.stderr
    assert ws.remote_ids() == {"other.jpg"}


def test_one_syncing_process_per_ledger_and_no_stale_lock_after_a_kill(
    ws: Workspace, daemons: Daemons
) -> None:
    configure(ws)
    write(ws.images / "a.jpg", 1)
    # An old file: its stat is trusted at once, so the dry run below finds nothing to
    # refresh however quickly the daemon synced it (a file synced within 2 s of being
    # written is read again next time, by the racy-clean rule).
    set_mtime_past(ws.images / "a.jpg")
    run = daemons.start()
    wait_in_step(ws, run)
    second = daemons.start()
    assert second.proc.wait(timeout=30) == 2
    assert f"another featsync (pid {run.proc.pid})" in second.log_path.read_text()
    cron = featsync("reconcile", cwd=ws.base)
    assert cron.returncode == 2 and f"pid {run.proc.pid}" in cron.stderr
    assert f"syncing: pid {run.proc.pid}" in featsync("status", cwd=ws.base).stdout
    status = json.loads(featsync("status", "--json", cwd=ws.base).stdout)
    assert status["syncing_pid"] == run.proc.pid and status["syncing"] is True  # a number
    look = featsync("reconcile", "--dry-run", cwd=ws.base)
    assert look.returncode == 0, look.stdout + look.stderr  # looking is fine
    run.proc.kill()  # SIGKILL: the kernel drops the lock with the process
    run.proc.wait()
    assert "syncing: no process now" in featsync("status", cwd=ws.base).stdout
    assert featsync("reconcile", cwd=ws.base).returncode == 0
