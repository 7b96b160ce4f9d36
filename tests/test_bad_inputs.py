"""No input stops the sync: a corpus of bad and odd files, mixed with good ones, under
`featsync reconcile`, under `featsync run` and through `featsync serve`; the extractor's
worker processes crashing and hanging for real; files swapped between scan and send.

Every good image must be synced, every bad one recorded with its reason, the weak ones
synced and counted as weak, and the special files (FIFO, socket, device) never opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import structlog
from PIL import Image

from featsync.engine import Engine
from featsync.errors import ItemRejected, Transient
from featsync.localcontext import LocalContext
from featsync.localcontext.extractor import Extractor
from featsync.model import OpenImage
from featsync.samples import textured_bytes
from tests import corpus
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    Server,
    Workspace,
    set_mtime_past,
    wait_for,
)
from tests.test_cli import featsync
from tests.test_daemon import DAEMON, Daemons


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "PNG")
    return buf.getvalue()


# -- the extractor's worker processes, crashing and hanging for real ---------------------


def test_a_native_crash_in_a_worker_is_that_images_rejection_and_the_next_image_works() -> None:
    # min_side=1 lets the 200x1 image reach OpenCV's AKAZE, which corrupts its heap and
    # aborts the process (the crash featsync's own check keeps away in normal use).
    extractor = Extractor(1, min_side=1)
    try:
        with pytest.raises(
            ItemRejected, match=r"crashed on image 'row\.png' twice \(killed by SIG"
        ):
            extractor.extract(_png((200, 1)), "row.png")
        assert extractor.crashes == 1
        assert len(extractor.extract(textured_bytes(1), "next.jpg")) > 20  # a new worker
    finally:
        extractor.close()


def test_a_worker_killed_from_outside_costs_no_image_its_sync() -> None:
    """The OOM killer or an operator may kill a worker: an idle one is replaced before
    the next image is sent to it; the next image is not blamed."""
    extractor = Extractor(1)
    try:
        assert len(extractor.extract(textured_bytes(1), "first.jpg")) > 20
        [idle] = [w for w in extractor._idle.queue if w is not None]
        idle.proc.kill()
        idle.proc.wait()
        assert len(extractor.extract(textured_bytes(2), "next.jpg")) > 20
        assert extractor.crashes == 0
    finally:
        extractor.close()


def test_a_worker_past_its_time_limit_is_stopped_and_replaced() -> None:
    extractor = Extractor(1, time_limit=2.0)
    read_end, write_end = os.pipe()  # a "file" that never ends: the decoder waits forever
    try:
        assert len(extractor.extract(textured_bytes(2), "warm.jpg")) > 20
        with pytest.raises(ItemRejected, match=r"took longer than 2 s on image 'endless\.jpg'"):
            extractor.extract(OpenImage(read_end, 1000, "endless.jpg"), "endless.jpg")
        assert extractor.crashes == 1
        assert len(extractor.extract(textured_bytes(3), "after.jpg")) > 20
    finally:
        os.close(read_end)
        os.close(write_end)
        extractor.close()


@contextlib.contextmanager
def calls_in_threads(extractor: Extractor) -> Iterator[tuple[Callable[..., None], list[Any]]]:
    """`start(image, name)` runs extractor.extract in a thread of its own; what each
    call ended with (descriptors or the exception) lands in the list. An image given
    as None is a "file" that never ends (the read end of a pipe nobody writes to): the
    worker waits on it until it is stopped. Every thread is joined at the end."""
    read_end, write_end = os.pipe()
    ended: list[Any] = []
    threads: list[threading.Thread] = []

    def call(image: bytes | None, name: str) -> None:
        try:
            ended.append(extractor.extract(image or OpenImage(read_end, 10, name), name))
        except BaseException as exc:
            ended.append(exc)

    def start(image: bytes | None, name: str) -> None:
        threads.append(threading.Thread(target=call, args=(image, name)))
        threads[-1].start()

    try:
        yield start, ended
    finally:
        extractor.close()
        for t in threads:
            t.join(30)
        os.close(read_end)
        os.close(write_end)
    assert not any(t.is_alive() for t in threads)


def test_closing_the_extractor_ends_busy_and_waiting_calls_as_transient_not_the_images_fault() -> (
    None
):
    extractor = Extractor(1, time_limit=60.0)
    with calls_in_threads(extractor) as (start, ended):
        start(None, "endless.jpg")
        wait_for(lambda: bool(extractor._busy), 60, "the worker to take the job")
        start(textured_bytes(1), "queued.jpg")  # waits: the one worker is busy
        extractor.close()
        wait_for(lambda: len(ended) == 2, 30, "both calls to end")
    assert all(isinstance(e, Transient) for e in ended), ended
    assert extractor.crashes == 0
    with pytest.raises(Transient, match="stopped"):
        extractor.extract(textured_bytes(1), "late.jpg")


# -- the corpus under every entry point ------------------------------------------------------


def _status(ws: Workspace) -> dict[str, Any]:
    done = featsync("status", "--json", "--config", str(ws.config_path), cwd=ws.base)
    assert done.returncode in (0, 1), done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def _check_outcomes(ws: Workspace, cases: dict[str, corpus.Case]) -> None:
    """The ledger, `status` and the context say what each case expects."""
    status = _status(ws)
    failures = {f["image_id"]: f for f in status["failures"]}
    weak = {w["image_id"] for w in status["weak"]}
    rows = ws.ledger()
    try:
        ledger = rows.load()
    finally:
        rows.close()
    held = ws.remote_ids()
    for name, case in cases.items():
        if case.expect == "skipped":
            assert name not in ledger, f"{name} should never have been opened"
            continue
        if case.expect in ("synced", "weak"):
            assert ledger[name].state == "synced", (name, failures.get(name))
            assert name in held, name
            assert (name in weak) == (case.expect == "weak"), (name, status["weak"])
            continue
        assert name in failures, f"{name} should have failed; ledger: {ledger.get(name)}"
        assert re.search(case.reason, failures[name]["error"], re.IGNORECASE), failures[name]
        assert name not in held
    assert status["counts"]["weak"] == sum(1 for c in cases.values() if c.expect == "weak")


def test_the_corpus_under_reconcile_syncs_every_good_image_and_names_every_bad_one(
    ws: Workspace,
) -> None:
    ws.write_config(**corpus.config(), log={"format": "json"})
    with corpus.written(ws.images) as cases:
        first = featsync("reconcile", "--config", str(ws.config_path), cwd=ws.base)
        assert first.returncode == 1, first.stderr  # some images failed: not in step
        events = [json.loads(x) for x in first.stderr.splitlines() if x.startswith("{")]
        assert len(events) == len(first.stderr.splitlines()), "every log line is JSON"
        [summary] = [e for e in events if e["event"] == "cycle_finished"]
        rejected = sum(1 for c in cases.values() if c.expect == "rejected")
        good = sum(1 for c in cases.values() if c.expect in ("synced", "weak"))
        assert (summary["added"], summary["failed"]) == (good, rejected), summary
        assert summary["weak"] == sum(1 for c in cases.values() if c.expect == "weak")
        weak_events = {e["image_id"] for e in events if e["event"] == "image_weak"}
        assert weak_events == {n for n, c in cases.items() if c.expect == "weak"}
        _check_outcomes(ws, cases)

        again = featsync("reconcile", "--config", str(ws.config_path), cwd=ws.base)
        assert again.returncode == 1  # the rejected ones wait for their next try
        events = [json.loads(x) for x in again.stderr.splitlines() if x.startswith("{")]
        [summary] = [e for e in events if e["event"] == "cycle_finished"]
        assert (summary["added"], summary["updated"]) == (0, 0), summary


def test_the_corpus_under_the_daemon_syncs_every_good_image_and_the_daemon_lives_on(
    ws: Workspace, daemons: Daemons
) -> None:
    ws.write_config(**corpus.config(), log={"format": "json"}, daemon=dict(DAEMON))
    run = daemons.start()
    run.wait_event("watcher_started")
    with corpus.written(ws.images) as cases:
        expected = sum(1 for c in cases.values() if c.expect != "skipped")
        wait_for(
            lambda: run.count("image_added") + run.count("image_failed") >= expected,
            120,
            f"every image judged\n{run.tail()}",
        )
        assert run.proc.poll() is None, run.tail()
        _check_outcomes(ws, cases)
        (ws.images / "good" / "late.jpg").write_bytes(textured_bytes(77))  # still syncing
        wait_for(lambda: "good/late.jpg" in ws.remote_ids(), 60, f"late.jpg\n{run.tail()}")
    assert run.stop() == 0


def test_the_corpus_through_serve_answers_400_with_the_reason_and_the_server_stays_up(
    server: Server,
) -> None:
    session = requests.Session()
    session.trust_env = False
    token = session.post(
        server.token_url,
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
        timeout=30,
    ).json()["access_token"]
    session.headers["Authorization"] = f"Bearer {token}"
    api = f"{server.api}/imaging/ai/imageSearch"
    context_url = f"{api}/{session.post(f'{api}/create', timeout=30).json()['id']}"
    try:
        for name, (case, data) in corpus.build_cases().items():
            if data is None:
                continue
            r = session.post(
                f"{context_url}/features",
                params={"imageId": name},
                files={"imageData": ("imageData", data)},
                timeout=60,
            )
            if case.expect in ("synced", "weak") or name.endswith("oversized.jpg"):
                assert r.status_code == 200, (name, r.text)
                continue
            assert r.status_code == 400, (name, r.status_code, r.text)
            message = r.json()["error"]["message"]
            assert re.search(case.reason, message, re.IGNORECASE), (name, message)
        assert server.proc.poll() is None
        got = session.get(f"{context_url}/features", params={"imageId": "good/one.jpg"}, timeout=30)
        assert got.status_code == 200 and got.json()["featuresCount"] > 20
    finally:
        session.close()


# -- a file swapped between the scan and the send -------------------------------------------

SWAP_SCRIPT = """
import json, os, sys
import structlog
from structlog.testing import capture_logs
from featsync import config, engine
from featsync.ledger import SqlLedger

settings = config.load(sys.argv[1])
mode, outside = sys.argv[2], sys.argv[3]
real_apply = engine.apply_plan

def swap_then_apply(p, root, *args, **kwargs):
    victim = os.path.join(root, "victim.jpg")
    os.remove(victim)
    if mode == "fifo":
        os.mkfifo(victim)
    else:
        os.symlink(outside, victim)
    return real_apply(p, root, *args, **kwargs)

engine.apply_plan = swap_then_apply
ledger = SqlLedger(settings.ledger.url)
from featsync.wiring import open_context
ctx = open_context(settings)
with capture_logs() as logs:
    report = engine.Engine(settings, ledger, ctx, structlog.get_logger()).cycle()
held = sorted(ctx.image_ids())
ctx.close()
ledger.close()
print(json.dumps({"held": held, "events": [
    {k: v for k, v in e.items() if isinstance(v, (str, int, float, type(None)))} for e in logs
]}))
"""


@pytest.mark.parametrize(
    ("mode", "follow", "reason"),
    [
        ("fifo", False, "FIFO"),
        ("symlink", False, "symbolic link"),
        ("symlink", True, "another file took its name"),
    ],
)
def test_a_file_swapped_after_the_scan_is_not_sent_and_nothing_hangs(
    ws: Workspace, tmp_path: Path, mode: str, follow: bool, reason: str
) -> None:
    ws.write_config(sync={"folder": "images", "follow_symlinks": follow})
    ws.image("victim.jpg", 1)
    ws.image("other.jpg", 2)
    outside = tmp_path / "outside-the-folder.jpg"
    outside.write_bytes(textured_bytes(3))
    done = subprocess.run(
        [sys.executable, "-c", SWAP_SCRIPT, str(ws.config_path), mode, str(outside)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["held"] == ["other.jpg"]  # nothing of the outside file, nothing hung
    [deferred] = [e for e in out["events"] if e["event"] == "image_deferred"]
    assert deferred["image_id"] == "victim.jpg" and reason in deferred["reason"], deferred


def test_a_file_over_max_file_size_is_rejected_unread_and_waits_until_it_changes(
    ws: Workspace,
) -> None:
    ws.write_config(sync={"folder": "images", "max_file_size": 50_000})
    big = ws.images / "big.jpg"
    big.write_bytes(textured_bytes(1) + b"\0" * 60_000)
    first = ws.cycle()
    [failed] = first.events("image_failed")
    assert first.calls == {}
    assert f"file is {big.stat().st_size:,} bytes" in failed["error"]
    assert "more than [sync] max_file_size = 50,000 bytes" in failed["error"]
    ledger = ws.ledger()
    try:  # the scan never read it: its "digest" stands for its stat
        assert ledger.load()["big.jpg"].digest.startswith("unhashed:")
    finally:
        ledger.close()
    assert ws.cycle().report.plan.waiting == ("big.jpg",)
    big.write_bytes(textured_bytes(1))  # smaller now: tried at once
    assert ws.cycle().calls == {"add": 1}


class RewritingContext:
    """The real embedded context; while a call runs, the file is rewritten in place with
    other bytes of the same size and put back, its mtime restored (as `cp -p` would):
    only the ctime tells."""

    def __init__(self, inner: LocalContext, path: Path, other: bytes) -> None:
        self.inner, self.path, self.other = inner, path, other
        self.rewrites = 0

    def add_features(self, image_id: str, image: Any) -> int | None:
        if not self.rewrites:
            self.rewrites += 1
            original, st = self.path.read_bytes(), self.path.stat()
            with open(self.path, "r+b") as fh:
                fh.write(self.other)
            try:
                return self.inner.add_features(image_id, image)  # of `other`
            finally:
                with open(self.path, "r+b") as fh:
                    fh.write(original)
                os.utime(self.path, ns=(st.st_atime_ns, st.st_mtime_ns))
        return self.inner.add_features(image_id, image)

    def update_features(self, image_id: str, image: Any) -> int | None:
        return self.inner.update_features(image_id, image)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_file_rewritten_while_it_is_sent_is_sent_again_by_the_next_cycle(
    ws: Workspace,
) -> None:
    """The context took features of bytes the file held for a moment only: the ledger
    must not call it synced as it is, or the wrong features would stay for good."""
    original = textured_bytes(1)
    other = textured_bytes(2, size=(160, 120))  # smaller; padded to the same size:
    other += b"\0" * (len(original) - len(other))  # a JPEG decoder ignores the tail
    path = ws.images / "a.jpg"
    path.write_bytes(original)
    set_mtime_past(path)
    settings = ws.settings()
    ledger = ws.ledger()
    ctx = LocalContext(settings.context.path)
    try:
        rewriting = RewritingContext(ctx, path, other)
        first = Engine(settings, ledger, rewriting, structlog.get_logger()).cycle()
        assert first.applied is not None and first.applied.added == 1, first.applied
        assert rewriting.rewrites == 1
        assert ctx.get_features("a.jpg").features == ctx.extract("x", other).features
        row = ledger.load()["a.jpg"]
        assert (row.state, row.digest, row.mtime_ns) == ("synced", "", 0)
        second = Engine(settings, ledger, ctx, structlog.get_logger()).cycle()
        assert second.applied is not None and second.applied.updated == 1
        assert ctx.get_features("a.jpg").features == ctx.extract("x", original).features
        assert ledger.load()["a.jpg"].digest == hashlib.sha256(original).hexdigest()
    finally:
        ctx.close()
        ledger.close()


def test_running_out_of_file_descriptors_is_transient_not_the_images_fault(
    ws: Workspace,
) -> None:
    ws.write_config(sync={"folder": "images", "concurrency": 8}, log={"format": "json"})
    for n in range(40):
        ws.image(f"i{n:02}.jpg", n)
    failed: list[dict[str, Any]] = []
    for limit in (20, 22, 24):  # tight enough to bite somewhere, loose enough to start
        done = featsync(
            "reconcile",
            "--config",
            str(ws.config_path),
            cwd=ws.base,
            prefix=("sh", "-c", f'ulimit -n {limit} && exec "$@"', "sh"),
        )
        events = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
        failed += [e for e in events if e["event"] == "image_failed"]
    assert failed, "the limit was meant to bite"
    assert {e["error_kind"] for e in failed} == {"transient"}, failed
    assert all("Too many open files" in e["error"] for e in failed), failed
    again = featsync("reconcile", "--config", str(ws.config_path), cwd=ws.base)
    assert again.returncode == 0, again.stderr  # with descriptors to spare, all synced
    assert len(ws.remote_ids()) == 40


def test_an_error_nobody_foresaw_is_that_images_failure_and_the_cycle_finishes(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featsync import scan

    ws.image("a.jpg", 1)
    ws.image("b.jpg", 2)
    real = scan.open_checked

    def broken(path: str, *args: Any) -> Any:
        if path.endswith("a.jpg"):
            raise KeyError("a bug")
        return real(path, *args)

    monkeypatch.setattr("featsync.apply.open_checked", broken)
    cycle = ws.cycle()
    [failed] = cycle.events("image_failed")
    assert failed["image_id"] == "a.jpg" and failed["error_kind"] == "internal"
    assert "KeyError" in failed["error"]
    assert cycle.calls == {"add": 1} and len(cycle.events("cycle_finished")) == 1
    assert ws.remote_ids() == {"b.jpg"}


def _tree(pid: int) -> list[int]:
    """The process and every descendant, from /proc."""
    out = [pid]
    for p in out:
        with contextlib.suppress(OSError):  # a thread or process may end meanwhile
            for task in os.listdir(f"/proc/{p}/task"):
                with (
                    contextlib.suppress(OSError),
                    open(f"/proc/{p}/task/{task}/children", encoding="ascii") as fh,
                ):
                    out += [int(x) for x in fh.read().split()]
    return out


def _session_of(*argv: str) -> subprocess.Popen[str]:
    """A process in a session of its own (a signal to its group reaches it and its
    children only), its stderr piped as text."""
    return subprocess.Popen(
        list(argv),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize("how", ["sigint-to-the-group", "sigterm-to-every-process"])
def test_a_stop_signal_to_everyone_does_not_blame_the_image_being_extracted(
    ws: Workspace, how: str
) -> None:
    """Ctrl-C in a terminal reaches the process group; systemd's stop sends SIGTERM to
    every process in the unit's cgroup. Neither may kill a worker mid-image (which would
    be recorded as the image's fault): the daemon stops cleanly, nothing has failed."""
    ws.write_config(sync={"folder": "images"}, log={"format": "json"})
    for n in range(40):
        (ws.images / f"i{n:02}.jpg").write_bytes(textured_bytes(n, size=(640, 480)))
    proc = _session_of(sys.executable, "-m", "featsync", "run", "--config", str(ws.config_path))
    try:
        wait_for(lambda: len(_tree(proc.pid)) > 1, 60, "extraction workers")
        if how == "sigint-to-the-group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            for pid in _tree(proc.pid):
                os.kill(pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == 0, err
    failed = [x for x in err.splitlines() if '"image_failed"' in x]
    assert failed == [], failed


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--extract-timeout", "inf"),
        ("--extract-timeout", "nan"),
        ("--extract-timeout", "1e-9"),
        ("--max-pixels", "0"),
        ("--header-timeout", "inf"),
    ],
)
def test_serve_refuses_an_out_of_range_limit_naming_it(
    tmp_path: Path, option: str, value: str
) -> None:
    env = {"FEATSYNC_CLIENT_ID": "x", "FEATSYNC_CLIENT_SECRET": "y"}
    done = featsync(
        "serve", "--port", "0", "--data", str(tmp_path), option, value, cwd=tmp_path, env=env
    )
    assert done.returncode == 2 and option in done.stderr, done.stderr


def test_a_busy_extractor_makes_a_caller_wait_at_most_max_wait() -> None:
    """featsync serve's threads must not all be held by callers queued for a worker:
    past max_wait a caller gets Transient (serve answers 503 with Retry-After)."""
    extractor = Extractor(1, time_limit=60.0, max_wait=0.5)
    with calls_in_threads(extractor) as (start, ended):
        start(None, "endless.jpg")
        wait_for(lambda: bool(extractor._busy), 60, "the worker to take the job")
        with pytest.raises(Transient, match="busy"):
            extractor.extract(textured_bytes(1), "queued.jpg")
    assert len(ended) == 1 and isinstance(ended[0], Transient)


class _Lines(list[str]):
    reader: threading.Thread


def _read_lines(proc: subprocess.Popen[str]) -> _Lines:
    """Lines of `proc`'s stderr as they come, read by a thread (so that a test waits on
    them with a deadline, never on a blocking read); the pipe is closed at EOF."""
    lines = _Lines()
    assert proc.stderr is not None
    stream = proc.stderr

    def read() -> None:
        with stream:
            for line in stream:
                lines.append(line)

    lines.reader = threading.Thread(target=read, daemon=True)
    lines.reader.start()
    return lines


def test_ctrl_c_stops_reconcile_cleanly_with_its_summary_and_nothing_lost(ws: Workspace) -> None:
    ws.write_config(sync={"folder": "images", "concurrency": 2}, log={"format": "json"})
    for n in range(60):
        (ws.images / f"i{n:02}.jpg").write_bytes(textured_bytes(n, size=(640, 480)))
    proc = _session_of(
        sys.executable, "-m", "featsync", "reconcile", "--config", str(ws.config_path)
    )
    lines = _read_lines(proc)
    try:
        # the first image synced: now Ctrl-C, while the log is busiest (a handler that
        # logged itself could deadlock on the log's lock right here)
        wait_for(lambda: any('"image_added"' in x for x in lines), 60, "a first image")
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines.reader.join(30)
    assert proc.returncode == 128 + signal.SIGINT, "".join(lines)
    assert not any("Traceback" in x for x in lines), "".join(lines)
    events = [json.loads(x) for x in lines if x.startswith("{")]
    [summary] = [e for e in events if e["event"] == "cycle_finished"]
    assert summary["not_sent"] > 0 and summary["added"] < 60, summary
    assert any(e["event"] == "reconcile_stopping" for e in events)
    added = {e["image_id"] for e in events if e["event"] == "image_added"}
    assert added == ws.remote_ids()  # every acknowledged call is in the context and ledger
    again = featsync("reconcile", "--config", str(ws.config_path), cwd=ws.base)
    assert again.returncode == 0, again.stderr
    assert len(ws.remote_ids()) == 60


def test_a_second_ctrl_c_stops_reconcile_at_once(ws: Workspace, tmp_path: Path) -> None:
    ws.write_config(sync={"folder": "images", "concurrency": 1}, log={"format": "json"})
    for n in range(3):
        (ws.images / f"i{n}.jpg").write_bytes(textured_bytes(n))
    hang = (
        "import os, sys, time\n"
        "from featsync import cli\n"
        "from featsync.localcontext import context\n"
        "def slow(self, image_id, image):\n"
        "    open(sys.argv[2], 'w').close()\n"
        "    time.sleep(600)\n"
        "context.LocalContext.add_features = slow\n"
        "sys.exit(cli.main(['--config', sys.argv[1], 'reconcile']))\n"
    )
    started = tmp_path / "in-a-call"
    proc = _session_of(sys.executable, "-c", hang, str(ws.config_path), str(started))
    assert proc.stderr is not None
    try:
        wait_for(started.exists, 60, "a call under way")
        os.killpg(proc.pid, signal.SIGINT)  # the first: waits for the call in flight
        seen = ""
        while "reconcile_stopping" not in seen:  # (two signals at once would be one)
            line = proc.stderr.readline()
            assert line, "reconcile ended on the first signal"
            seen += line
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGINT)  # the second: now
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert '"reconcile_stopped_at_once"' in err and "Traceback" not in err
    assert featsync("reconcile", "--config", str(ws.config_path), cwd=ws.base).returncode == 0
