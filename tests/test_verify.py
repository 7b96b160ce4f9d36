"""`featsync verify` and the daemon's own reviews (issue 11), for real: a temp folder,
a real SQLite ledger, the embedded context and a real `featsync serve` on loopback,
the command and the daemon as subprocesses. The context is changed behind featsync's
back through its own API (or, for bulk, its store file), then verify must say so, and
`--repair` (or the daemon with `repair = true`) must mend it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from featsync.aspose import AsposeContext, ClientSettings
from featsync.drift import LIST_PAGE
from featsync.errors import NotFound
from featsync.localcontext import LocalContext
from featsync.lock import SyncLock
from featsync.model import SearchContext, Secret, State
from featsync.samples import textured_bytes
from featsync.schema import images, meta
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    Backend,
    Server,
    Workspace,
    client_for,
    set_mtime_past,
    start_server,
    wait_for,
)
from tests.test_aspose import CREDS, OddServer, odd_server, requests_for, use_server
from tests.test_cli import featsync
from tests.test_daemon import Daemons, Running, configure

NAMES = ("a.jpg", "b.jpg", "c.jpg")


def synced(ws: Workspace, backend: Backend, names: tuple[str, ...] = NAMES) -> None:
    """Write these images and reconcile them into the context."""
    for n, name in enumerate(names):
        set_mtime_past(ws.image(name, n))
    r = featsync("reconcile", cwd=ws.base, env=backend.env)
    assert r.returncode == 0, r.stderr


@contextlib.contextmanager
def behind(ws: Workspace, backend: Backend) -> Iterator[SearchContext]:
    """The context the workspace syncs into, opened apart from featsync's ledger: what
    is done through it happens behind featsync's back."""
    ctx: SearchContext
    if backend.name == "embedded":
        ctx = LocalContext(ws.settings().context.path)
    else:
        c = backend.context
        settings = ClientSettings(
            base_url=c["base_url"],
            auth_url=c["auth_url"],
            context_id=c["context_id"],
            trust_env=False,
        )
        ctx = AsposeContext(settings, CLIENT_ID, Secret(CLIENT_SECRET))
    try:
        yield ctx
    finally:
        ctx.close()


def fresh_features(tmp_path: Path, path: Path) -> bytes:
    """The features a fresh extraction of this file gives."""
    ctx = LocalContext(str(tmp_path / "fresh.search"))
    try:
        return ctx.extract(path.name, path.read_bytes()).features
    finally:
        ctx.close()


def verify(ws: Workspace, backend: Backend, *args: str) -> tuple[int, dict[str, Any]]:
    r = featsync("verify", "--json", *args, cwd=ws.base, env=backend.env)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return r.returncode, json.loads(r.stdout)


def kinds(report: dict[str, Any]) -> list[tuple[str, str]]:
    return [(d["image_id"], d["kind"]) for d in report["drifts"]]


def test_a_record_deleted_behind_its_back_is_missing_and_repair_sends_it_again(
    ws: Workspace, backend: Backend, tmp_path: Path
) -> None:
    synced(ws, backend)
    assert verify(ws, backend)[0] == 0
    with behind(ws, backend) as ctx:
        ctx.delete_features("b.jpg")
    code, report = verify(ws, backend)
    assert code == 1 and kinds(report) == [("b.jpg", "missing")]
    assert report["checked"] == 3 and report["orphans_looked_for"] is True

    r = featsync("verify", "--repair", cwd=ws.base, env=backend.env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "missing          b.jpg" in r.stdout and "repair: 1 sent again" in r.stdout
    [done] = [json.loads(x) for x in r.stderr.splitlines() if "verify_repaired" in x]
    assert done["sent"] == 1 and done["drifts"] == 1
    with behind(ws, backend) as ctx:
        held = ctx.get_features("b.jpg").features
    assert held == fresh_features(tmp_path, ws.images / "b.jpg")
    assert verify(ws, backend)[0] == 0


def test_a_record_replaced_behind_its_back_is_count_differs_and_repair_sends_the_file(
    ws: Workspace, backend: Backend, tmp_path: Path
) -> None:
    synced(ws, backend)
    assert verify(ws, backend)[0] == 0  # with Aspose, this learns the counts adds did not tell
    other = textured_bytes(77, size=(120, 90))  # another image, with fewer features
    with behind(ws, backend) as ctx:
        before = ctx.get_features("c.jpg").features_count
        ctx.update_features("c.jpg", other)
        after = ctx.get_features("c.jpg").features_count
    assert after != before
    code, report = verify(ws, backend)
    assert code == 1 and kinds(report) == [("c.jpg", "count_differs")]
    assert f"{after} features held, {before} recorded" in report["drifts"][0]["detail"]

    code, report = verify(ws, backend, "--repair")
    assert code == 0 and report["repair"]["outcomes"] == {"c.jpg": "sent"}
    with behind(ws, backend) as ctx:
        assert ctx.get_features("c.jpg").features == fresh_features(tmp_path, ws.images / "c.jpg")
    assert verify(ws, backend)[0] == 0


def test_an_orphan_is_found_and_repair_deletes_it_within_the_delete_guard(
    ws: Workspace, backend: Backend
) -> None:
    synced(ws, backend)
    with behind(ws, backend) as ctx:
        ctx.add_features("stray.jpg", textured_bytes(9))
    r = featsync("verify", cwd=ws.base, env=backend.env)
    assert r.returncode == 1
    assert "orphan           stray.jpg: held, unknown to the ledger" in r.stdout
    code, report = verify(ws, backend, "--repair")
    assert code == 0 and report["repair"]["outcomes"] == {"stray.jpg": "deleted"}
    assert backend.remote() == set(NAMES)

    # More orphans than the delete guard lets go at once: withheld, not sent.
    strays = {f"stray{n}.jpg" for n in range(3)}
    with behind(ws, backend) as ctx:
        for n, name in enumerate(sorted(strays)):
            ctx.add_features(name, textured_bytes(20 + n))
    settings = dict(ws.overrides)
    ws.write_config(**settings, safety={"max_delete_count": 2})
    code, report = verify(ws, backend, "--repair")
    assert code == 1
    assert report["repair"]["outcomes"] == dict.fromkeys(sorted(strays), "withheld")
    assert "max_delete_count = 2" in report["repair"]["withheld_reason"]
    assert backend.remote() == set(NAMES) | strays  # nothing was sent


def test_a_record_held_though_deleted_is_found_and_repair_deletes_it(
    ws: Workspace, backend: Backend
) -> None:
    synced(ws, backend)
    (ws.images / "a.jpg").unlink()
    assert featsync("reconcile", cwd=ws.base, env=backend.env).returncode == 0
    with behind(ws, backend) as ctx:
        ctx.add_features("a.jpg", textured_bytes(0))
    code, report = verify(ws, backend)
    assert code == 1 and kinds(report) == [("a.jpg", "held_but_deleted")]
    code, report = verify(ws, backend, "--sample", "3")  # by its GET alone: no listing
    assert code == 1 and kinds(report) == [("a.jpg", "held_but_deleted")]
    code, report = verify(ws, backend, "--repair")
    assert code == 0 and report["repair"]["outcomes"] == {"a.jpg": "deleted"}
    assert backend.remote() == {"b.jpg", "c.jpg"}
    assert verify(ws, backend)[0] == 0


def test_with_aspose_verify_fills_the_features_counts_adds_did_not_return(
    ws: Workspace, server: Server
) -> None:
    context_id = use_server(ws, server)
    backend = Backend("serve", dict(ws.overrides["context"]), CREDS, set)
    synced(ws, backend)
    ledger = ws.ledger()
    try:
        assert {r.features_count for r in ledger.believed_of(NAMES).values()} == {None}
    finally:
        ledger.close()
    r = featsync("verify", cwd=ws.base, env=CREDS)
    assert r.returncode == 0 and "filled 3 features count(s)" in r.stdout, r.stdout
    client = client_for(server, context_id)
    ledger = ws.ledger()
    try:
        held = {n: client.get_features(n).features_count for n in NAMES}
        rows = ledger.believed_of(NAMES)
        assert {n: rows[n].features_count for n in NAMES} == held
        assert ledger.history_of("a.jpg")[0]["features_count"] == held["a.jpg"]
        # compare-and-set: a count read from another version is not written
        with ledger.engine.begin() as conn:
            conn.execute(images.update().values(features_count=None))
        stale = [(n, rows[n].version - 1, 5) for n in NAMES]
        assert ledger.fill_counts(stale) == 0
        assert ledger.fill_counts([("a.jpg", rows["a.jpg"].version, held["a.jpg"])]) == 1
    finally:
        ledger.close()
        client.close()
    assert "filled 2 features count(s)" in featsync("verify", cwd=ws.base, env=CREDS).stdout


def test_sample_n_checks_n_images_at_random(ws: Workspace) -> None:
    backend = Backend("embedded", {}, {}, ws.remote_ids)
    synced(ws, backend, tuple(f"{n}.jpg" for n in range(6)))
    seen: set[str] = set()
    for _ in range(2):
        r = featsync("verify", "--sample", "2", cwd=ws.base)
        assert r.returncode == 0 and "verified 2 images: 0 drift(s)" in r.stdout
    ctx = LocalContext(ws.settings().context.path)
    try:
        for n in range(6):
            ctx.delete_features(f"{n}.jpg")
    finally:
        ctx.close()
    for _ in range(4):
        code, report = verify(ws, backend, "--sample", "3")
        assert code == 1 and report["checked"] == 3 and len(report["drifts"]) == 3
        seen.update(i for i, _kind in kinds(report))
    assert len(seen) > 3  # not the same three each time


def test_an_unreachable_context_leaves_images_unverified_and_exits_1(
    ws: Workspace, tmp_path: Path
) -> None:
    first = start_server(tmp_path / "serve")
    try:
        use_server(ws, first)
        synced(ws, Backend("serve", dict(ws.overrides["context"]), CREDS, set))
    finally:
        first.stop()
    # The same server (port, data: the context the ledger mirrors), now failing every call
    port = int(first.url.rsplit(":", 1)[1])
    broken = start_server(tmp_path / "serve", "--error-rate", "1", port=port)
    try:
        context = {**ws.overrides["context"], "max_retries": 0}
        ws.write_config(sync=ws.overrides["sync"], context=context)
        r = featsync("verify", cwd=ws.base, env=CREDS)
    finally:
        broken.stop()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "0 drift(s), 3 unverified" in r.stdout and "stopped early" in r.stdout


# -- the listing on featsync serve, and a server without one ------------------------------


def test_serve_lists_a_contexts_ids_in_pages(server: Server) -> None:
    client = client_for(server)
    try:
        context_id = client.create_context()
    finally:
        client.close()
    ids = sorted(f"img/{n:05}.jpg" for n in range(LIST_PAGE + 500))
    # synthetic rows, straight into the store's file: the listing reads IDs only
    with contextlib.closing(sqlite3.connect(server.data / f"{context_id}.search")) as db, db:
        db.executemany(
            "INSERT INTO features (image_id, count, descriptors, updated_at) "
            "VALUES (?, 1, x'00', 0)",
            [(i,) for i in ids],
        )
    client = client_for(server, context_id)
    try:
        first = client.image_id_page("", None, LIST_PAGE)
        assert first == ids[:LIST_PAGE]
        assert client.image_id_page(ids[LIST_PAGE - 1], None, LIST_PAGE) == ids[LIST_PAGE:]
        assert client.image_id_page("img/00010.jpg", "img/00012.jpg", 5) == ids[11:13]
    finally:
        client.close()


@pytest.mark.parametrize(
    "answer",
    [
        (404, b"<html>Not Found</html>"),
        (404, b'{"error": {"code": "NotFound", "message": "no such route"}}'),
        (405, b'{"error": {"code": "MethodNotAllowed"}}'),
        (302, b""),
        (200, b'{"something": "else"}'),
    ],
)
def test_a_server_without_the_listing_cannot_list_and_nothing_else_changes(
    answer: tuple[int, bytes],
) -> None:
    """Aspose itself has no listing: the probe's answer is "cannot list", never the
    fatal "wrong base_url" that a 404 or 405 of an image call would be."""
    srv: OddServer
    with odd_server() as (srv, client):
        path = "/v3.0/imaging/ai/imageSearch/c1/features/ids"
        srv.answers[("GET", path)] = (*answer, {"Location": "/elsewhere"})
        assert client.image_id_page("", None, 10) is None
        assert client.image_id_page("", None, 10) is None  # remembered: asked once
        assert srv.seen.count(("GET", path)) == 1
        assert ("GET", "/v3.0/imaging/ai/imageSearch/c1/status") not in srv.seen
        srv.answers[("GET", "/v3.0/imaging/ai/imageSearch/c1/features")] = (
            404,
            b'{"error": {"code": "NotFound", "message": "no features"}}',
        )
        with pytest.raises(NotFound):  # an image call is judged as before
            client.get_features("a.jpg")


# -- repair beside a daemon, and the daemon's own reviews ---------------------------------


def test_repair_while_a_daemon_runs_leaves_the_marks_to_it(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    configure(ws)
    for n, name in enumerate(NAMES):
        set_mtime_past(ws.image(name, n))
    run = daemons.start()
    wait_for(lambda: ws.remote_ids() == set(NAMES), 30, run.tail())
    run.wait_event("cycle_finished")
    ctx = LocalContext(ws.settings().context.path)
    try:
        ctx.delete_features("b.jpg")
    finally:
        ctx.close()
    r = featsync("verify", "--repair", cwd=ws.base)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"a daemon (pid {run.proc.pid})" in r.stdout
    wait_for(lambda: "b.jpg" in ws.remote_ids(), 20, run.tail())
    ctx = LocalContext(ws.settings().context.path)
    try:
        assert ctx.get_features("b.jpg").features == fresh_features(tmp_path, ws.images / "b.jpg")
    finally:
        ctx.close()
    wait_for(lambda: featsync("verify", cwd=ws.base).returncode == 0, 20, run.tail())
    assert run.stop() == 0


REVIEW = {"verify_interval": 0.5, "verify_min": 20, "verify_sample": 0.01}


def test_the_daemon_reviews_finds_drift_and_with_repair_mends_it(
    ws: Workspace, backend: Backend, daemons: Daemons
) -> None:
    names = tuple(f"{n:02}.jpg" for n in range(25))  # more than one review's 20
    synced(ws, backend, names)
    with behind(ws, backend) as ctx:
        ctx.delete_features("03.jpg")
        ctx.add_features("zz-stray.jpg", textured_bytes(99))
    configure(ws, context=backend.context, daemon=REVIEW)
    run = daemons.start(backend.env)
    run.wait_event("context_drift", timeout=60)
    drift = run.events("context_drift")[0]
    assert drift["by_kind"] == {"missing": 1} and drift["image_ids"] == ["03.jpg"]
    assert drift["repair"] is False
    run.wait_event("review_finished", 3, timeout=60)  # the stray is in the next range
    strays = [e for e in run.events("context_drift") if e["by_kind"] == {"orphan": 1}]
    assert strays and strays[0]["image_ids"] == ["zz-stray.jpg"]
    run.wait_event("heartbeat", run.count("heartbeat") + 1)
    beats = [e["drift"] for e in run.events("heartbeat")]
    assert beats[-1] == {"missing": 1, "orphan": 1}  # found in two ranges, not mended
    assert run.stop() == 0
    assert "03.jpg" not in backend.remote()  # found, not mended
    finished = [e for e in run.events("review_finished") if not e["stopped"]]
    ledger = ws.ledger()
    try:  # kept for the next start: where the last whole review ended ("" after the end)
        assert ledger.review_cursor() == (finished[-1]["until"] or "")
    finally:
        ledger.close()

    configure(ws, context=backend.context, daemon={**REVIEW, "repair": True})
    again = daemons.start(backend.env)
    wait_for(lambda: backend.remote() == set(names), 60, again.tail())

    def mended() -> int:
        return sum(e["sent"] + e["deleted"] for e in again.events("verify_repaired"))

    wait_for(lambda: mended() >= 2, 30, again.tail())
    assert mended() == 2 and again.events("verify_repaired")[0]["daemon_pid"] == again.proc.pid
    n = again.count("review_finished")
    again.wait_event("review_finished", n + 2, timeout=60)  # a whole round, clean
    assert [e["drift"] for e in again.events("review_finished")[n : n + 2]] == [0, 0]
    assert again.stop() == 0


def test_sigterm_during_a_long_review_stops_within_seconds(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    slow = start_server(tmp_path / "slow", "--latency", "0.05")
    try:
        use_server(ws, slow)
        configure(
            ws,
            context=ws.overrides["context"],
            sync={"concurrency": 2},
            daemon={**REVIEW, "verify_min": 10_000},
        )
        ledger = ws.ledger()
        now = time.time()
        rows = [
            {
                "image_id": f"gone/{n:05}.jpg",
                "size": 1,
                "mtime_ns": 1,
                "inode": 1,
                "digest": f"{n:064x}",
                "version": 2,
                "state": State.DELETED.value,
                "remote": False,
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
            }
            for n in range(10_000)
        ]
        try:
            with ledger.engine.begin() as conn:
                conn.execute(images.insert(), rows)
        finally:
            ledger.close()
        run = daemons.start(CREDS)
        run.wait_event("review_started", timeout=60)
        assert run.events("review_started")[0]["images"] == 10_000
        stopped = time.monotonic()
        assert run.stop(signal.SIGTERM) == 0
        assert time.monotonic() - stopped < 3.0, run.tail()
        assert run.count("review_stopped") == 1 and run.count("review_finished") == 0
        ledger = ws.ledger()
        try:
            with ledger.engine.begin() as conn:
                cursor = conn.execute(
                    sa.select(meta.c.value).where(meta.c.key == "review_cursor")
                ).scalar()
        finally:
            ledger.close()
        assert cursor is None  # a review cut short starts over
    finally:
        slow.stop()


def test_a_review_that_meets_a_failing_context_is_logged_and_the_daemon_goes_on(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    first = start_server(tmp_path / "serve")
    try:
        use_server(ws, first)
        synced(ws, Backend("serve", dict(ws.overrides["context"]), CREDS, set))
    finally:
        first.stop()
    # The same server (port, data), now failing every call: the folder is unchanged,
    # so the cycles need no call and stay good; only the reviews meet the failures.
    port = int(first.url.rsplit(":", 1)[1])
    broken = start_server(tmp_path / "serve", "--error-rate", "1", port=port)
    try:
        configure(ws, context={**ws.overrides["context"], "max_retries": 0}, daemon=REVIEW)
        run = daemons.start(CREDS)
        run.wait_event("review_failed", 2, timeout=60)
        assert "failed 3 times in a row" in run.events("review_failed")[0]["error"]
    finally:
        broken.stop()
    # The server back, without the search context: a Fatal answer to the review.
    context_id = ws.overrides["context"]["context_id"]
    for leftover in (tmp_path / "serve").glob(f"{context_id}.search*"):
        leftover.unlink()
    back = start_server(tmp_path / "serve", port=port)
    try:
        wait_for(
            lambda: any("not found" in e["error"] for e in run.events("review_failed")),
            30,
            run.tail(),
        )
        assert run.proc.poll() is None and run.count("context_drift") == 0
        assert run.count("loop_error") == 0
        assert run.stop() == 0
    finally:
        back.stop()


# -- the context the ledger mirrors ---------------------------------------------------------


def test_verify_refuses_another_context_than_the_ledger_mirrors_before_any_mark(
    ws: Workspace, tmp_path: Path
) -> None:
    backend = Backend("embedded", {}, {}, ws.remote_ids)
    synced(ws, backend)
    ws.write_config(sync={"folder": "images"}, context={"path": str(tmp_path / "other.db")})
    for args in ((), ("--repair",), ("--sample", "2")):
        r = featsync("verify", *args, cwd=ws.base)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "the ledger mirrors local store" in r.stderr and r.stdout == ""
    ledger = ws.ledger()
    try:
        rows = ledger.believed_of(NAMES)
        assert {r.state for r in rows.values()} == {State.SYNCED.value}  # nothing marked
    finally:
        ledger.close()


def test_verify_on_a_ledger_never_bound_asks_for_one_reconcile_first(ws: Workspace) -> None:
    ws.image("a.jpg", 1)
    ledger = ws.ledger()  # a new ledger: it has not yet recorded which context it mirrors
    ledger.close()
    r = featsync("verify", "--repair", cwd=ws.base)
    assert r.returncode == 2 and "featsync reconcile" in r.stderr, r.stdout + r.stderr
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    assert featsync("verify", cwd=ws.base).returncode == 0


# -- signals: a check or a repair cut short ------------------------------------------------


@contextlib.contextmanager
def slowed(
    ws: Workspace, tmp_path: Path, names: tuple[str, ...], gone: tuple[str, ...] = ()
) -> Iterator[Server]:
    """These images synced into a context of a `featsync serve` of the test's own, the
    records of `gone` deleted behind featsync's back; then the same server (port,
    data) again, answering every call 0.3 s late, with its access log."""
    first = start_server(tmp_path / "serve")
    try:
        use_server(ws, first)
        backend = Backend("serve", dict(ws.overrides["context"]), CREDS, set)
        synced(ws, backend, names)
        with behind(ws, backend) as ctx:
            for image_id in gone:
                ctx.delete_features(image_id)
    finally:
        first.stop()
    port = int(first.url.rsplit(":", 1)[1])
    slow = start_server(tmp_path / "serve", "--latency", "0.3", "--access-log", port=port)
    try:
        yield slow
    finally:
        slow.stop()


def started(ws: Workspace, *args: str) -> subprocess.Popen[str]:
    """`featsync ARGS` as a subprocess that a test signals (SIGINT as from a terminal)."""
    env = {k: v for k, v in os.environ.items() if k != "FEATSYNC_CONFIG"}
    return subprocess.Popen(
        [sys.executable, "-m", "featsync", *args],
        cwd=ws.base,
        env={**env, **CREDS},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # the default SIGINT, even under a runner that ignores it (a background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def marks(ws: Workspace) -> int:
    """Drift marks in the ledger, read as another process would."""
    path = make_url(ws.settings().ledger.url).database
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        q = "SELECT count(*) FROM images WHERE last_error LIKE 'verify found %'"
        return int(db.execute(q).fetchone()[0])


MANY = tuple(f"{n:02}.jpg" for n in range(20))


def test_ctrl_c_during_a_check_ends_it_with_what_was_checked_and_exit_1(
    ws: Workspace, tmp_path: Path
) -> None:
    with slowed(ws, tmp_path, MANY) as slow:
        context_id = ws.overrides["context"]["context_id"]
        proc = started(ws, "verify")
        wait_for(
            lambda: any(e["method"] == "GET" for e in requests_for(slow, context_id)),
            30,
            "the check's first GET",
        )
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "stopped early (stop requested)" in out, out
    assert "verify_stopping" in err


def test_an_update_a_daemon_sent_and_has_not_yet_recorded_is_no_drift(ws: Workspace) -> None:
    """The context holds what a syncing process just sent; its answer is not in the
    ledger yet. verify, seeing the sync lock held, looks again a moment later: by then
    the answer is recorded, and there is no drift to report (it was reported, and
    exited 1, in 1 of 8 runs beside a daemon)."""
    names = ("a.jpg", "b.jpg", "c.jpg")
    for n, name in enumerate(names):
        set_mtime_past(ws.image(name, n))
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    syncer = SyncLock(ws.settings().ledger.url, role="daemon")
    syncer.acquire()  # as a daemon holds it while it syncs
    try:
        ctx = LocalContext(ws.settings().context.path)
        try:  # the update it sent
            ctx.update_features("c.jpg", textured_bytes(77, size=(120, 90)))
            held = ctx.get_features("c.jpg").features_count
        finally:
            ctx.close()
        proc = started(ws, "verify", "--json")
        err: list[str] = []
        assert proc.stderr is not None
        reader = threading.Thread(target=lambda: err.extend(proc.stderr or []), daemon=True)
        reader.start()
        wait_for(lambda: any("verify_confirm_wait" in x for x in err), 60, "the pause")
        db = sqlite3.connect(ws.base / "featsync-ledger.db")  # ... and its answer recorded
        with db:
            db.execute(
                "UPDATE images SET version = version + 1, features_count = ? "
                "WHERE image_id = 'c.jpg'",
                (held,),
            )
        db.close()
        out, _ = proc.communicate(timeout=60)
        reader.join(10)
    finally:
        syncer.release()
    assert proc.returncode == 0, out + "".join(err)
    assert json.loads(out)["drifts"] == []


def test_a_sample_too_large_for_the_ledger_is_refused_by_the_arguments(ws: Workspace) -> None:
    r = featsync("verify", "--sample", "99999999999999999999", cwd=ws.base)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--sample" in r.stderr


def test_ctrl_c_during_a_repair_says_what_was_not_sent_and_exits_1(
    ws: Workspace, tmp_path: Path
) -> None:
    with slowed(ws, tmp_path, MANY, gone=MANY[:12]):
        proc = started(ws, "verify", "--repair", "--json")
        wait_for(lambda: marks(ws) > 0, 60, "the repair's marks")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, out + err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
        repair = json.loads(out)["repair"]
        assert repair["stopped"] is True and repair["daemon_pid"] is None
        counts = repair["counts"]
        assert counts["waiting"] == 0 and counts["not_sent"] >= 1
        assert counts["sent"] + counts["not_sent"] + counts["failed"] == 12
        assert "not sent" in set(repair["outcomes"].values())
        # the marks stay: the next cycle sends them
        assert featsync("reconcile", cwd=ws.base, env=CREDS).returncode == 0
        r = featsync("verify", cwd=ws.base, env=CREDS)
        assert r.returncode == 0, r.stdout + r.stderr


# -- the sync lock's holder: a daemon, or not ------------------------------------------------


def test_repair_beside_a_lock_holder_that_is_no_daemon_says_so_and_the_marks_are_counted(
    ws: Workspace,
) -> None:
    backend = Backend("embedded", {}, {}, ws.remote_ids)
    synced(ws, backend)
    with behind(ws, backend) as ctx:
        ctx.delete_features("b.jpg")
    holder = SyncLock(ws.settings().ledger.url)  # a reconcile's lock, held by this process
    holder.acquire()
    try:
        r = featsync("verify", "--repair", "--json", cwd=ws.base)
        assert r.returncode == 1, r.stdout + r.stderr
        repair = json.loads(r.stdout)["repair"]
        assert repair["daemon_pid"] is None
        assert repair["holder"] == {"pid": str(os.getpid()), "role": "reconcile"}
        assert repair["outcomes"] == {"b.jpg": "not sent"}
        # b.jpg is marked now (failed): not checked, but counted, and not clean
        r = featsync("verify", cwd=ws.base)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "0 drift(s)" in r.stdout and "1 marked" in r.stdout, r.stdout
        code, report = verify(ws, backend)
        assert code == 1 and report["pending"] == 1 and report["marked"] == 1
    finally:
        holder.release()
    assert featsync("reconcile", cwd=ws.base).returncode == 0  # the next cycle mends it
    code, report = verify(ws, backend)
    assert code == 0 and report["pending"] == 0 and report["marked"] == 0
    assert backend.remote() == set(NAMES)


def test_the_lock_says_who_holds_it_and_a_crashed_holder_is_not_taken_for_the_next(
    ws: Workspace,
) -> None:
    url = ws.settings().ledger.url
    ws.ledger().close()
    code = (
        "import sys; from featsync.lock import SyncLock\n"
        f"lock = SyncLock({url!r}, role='daemon'); lock.acquire()\n"
        "print('held', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        who = SyncLock(url).who()
        assert who is not None and (who.pid, who.role) == (str(proc.pid), "daemon")
    finally:
        proc.kill()  # a crash: the kernel drops the lock, the file keeps what it said
        proc.wait()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.stdout.close()
    assert SyncLock(url).who() is None
    mine = SyncLock(url, role="verify --repair")
    mine.acquire()
    try:
        who = SyncLock(url).who()
        assert who is not None and (who.pid, who.role) == (str(os.getpid()), "verify --repair")
    finally:
        mine.release()


def test_ids_with_control_characters_are_escaped_in_the_text_output(ws: Workspace) -> None:
    backend = Backend("embedded", {}, {}, ws.remote_ids)
    synced(ws, backend)
    evil = "evil\x1b[31mRED\x1b[0m\nverified 3 images: 0 drift(s), 0 unverified"
    with behind(ws, backend) as ctx:
        ctx.add_features(evil, textured_bytes(5))
    r = featsync("verify", cwd=ws.base)
    assert r.returncode == 1
    assert "\x1b" not in r.stdout
    assert not any(x.startswith("verified 3 images: 0") for x in r.stdout.splitlines())
    assert "orphan           evil\\x1b[31mRED\\x1b[0m\\nverified 3 images" in r.stdout
    assert len(r.stdout.splitlines()) == 2, r.stdout
    code, report = verify(ws, backend)  # JSON escapes it by itself, the ID as it is
    assert code == 1 and kinds(report) == [(evil, "orphan")]


def test_an_orphan_with_an_nfd_id_handed_to_a_daemon_is_deleted_by_one_full_cycle(
    ws: Workspace, daemons: Daemons
) -> None:
    configure(ws)
    for n, name in enumerate(NAMES):
        set_mtime_past(ws.image(name, n))
    run = daemons.start()
    wait_for(lambda: ws.remote_ids() == set(NAMES), 30, run.tail())
    run.wait_event("cycle_finished")
    nfd = unicodedata.normalize("NFD", "café.jpg")  # no path gives this ID: IDs are NFC
    ctx = LocalContext(ws.settings().context.path)
    try:
        ctx.add_features(nfd, textured_bytes(8))
    finally:
        ctx.close()
    r = featsync("verify", "--repair", cwd=ws.base)
    assert r.returncode == 0 and f"a daemon (pid {run.proc.pid})" in r.stdout, r.stdout
    wait_for(lambda: ws.remote_ids() == set(NAMES), 20, run.tail())
    # the cycle that deleted it has written its line (the store changed a moment before)
    wait_for(lambda: any(e["deleted"] for e in run.events("cycle_finished")), 20, run.tail())
    cycles = run.count("cycle_finished")
    run.wait_event("heartbeat", run.count("heartbeat") + 3)  # three beats, no cycle
    assert run.count("cycle_finished") == cycles, run.tail()
    code, report = verify(ws, Backend("embedded", {}, {}, ws.remote_ids))
    assert code == 0 and report["marked"] == 0
    assert run.stop() == 0


# -- the heartbeat's drift: found and not yet mended ---------------------------------------

TWENTY_FIVE = tuple(f"{n:02}.jpg" for n in range(25))
RANGES = {  # reviews of 5 images each: 00-04, 05-09, ..., 20-24, then the (empty) end
    "verify_interval": 0.5,
    "verify_min": 5,
    "verify_sample": 0.0,
    "heartbeat_interval": 1.0,
}


def beats_after(run: Running, event: str, match: Callable[[dict[str, Any]], bool]) -> list[Any]:
    """The heartbeats logged after the first `event` that `match` accepts."""
    events = run.events()
    first = next(n for n, e in enumerate(events) if e["event"] == event and match(e))
    return [e for e in events[first:] if e["event"] == "heartbeat"]


def test_the_heartbeats_drift_outlives_reviews_of_other_ranges_and_goes_when_mended(
    ws: Workspace, daemons: Daemons
) -> None:
    backend = Backend("embedded", {}, {}, ws.remote_ids)
    synced(ws, backend, TWENTY_FIVE)
    with behind(ws, backend) as ctx:
        ctx.delete_features("02.jpg")
    configure(ws, daemon=RANGES)
    run = daemons.start()
    run.wait_event("context_drift", timeout=60)
    run.wait_event("heartbeat", run.count("heartbeat") + 4)  # other ranges reviewed meanwhile
    beats = beats_after(run, "context_drift", lambda _e: True)
    drifts = [b["drift"] for b in beats]
    assert len(drifts) >= 3 and all(d == {"missing": 1} for d in drifts), drifts

    r = featsync("verify", "--repair", cwd=ws.base)  # the daemon mends it
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: run.count("image_added") >= 1, 30, "02.jpg sent again")
    run.wait_event("heartbeat", run.count("heartbeat") + 2)
    drifts = [b["drift"] for b in beats_after(run, "cycle_finished", lambda e: e["added"] == 1)]
    assert drifts and all(d == {} for d in drifts), drifts  # mended: gone without a review
    assert run.stop() == 0


def test_a_review_cut_short_changes_neither_the_drift_nor_its_age(
    ws: Workspace, daemons: Daemons, tmp_path: Path
) -> None:
    first = start_server(tmp_path / "serve")
    try:
        use_server(ws, first)
        backend = Backend("serve", dict(ws.overrides["context"]), CREDS, set)
        synced(ws, backend, TWENTY_FIVE[:10])
        with behind(ws, backend) as ctx:
            ctx.delete_features("02.jpg")
        context = {**ws.overrides["context"], "max_retries": 0}
        configure(ws, context=context, daemon=RANGES)
        run = daemons.start(CREDS)
        run.wait_event("context_drift", timeout=60)
        run.wait_event("heartbeat", run.count("heartbeat") + 1)
    finally:
        first.stop()
    port = int(first.url.rsplit(":", 1)[1])
    broken = start_server(tmp_path / "serve", "--error-rate", "1", port=port)
    try:
        run.wait_event("review_failed", 3, timeout=60)
        run.wait_event("heartbeat", run.count("heartbeat") + 2)
    finally:
        broken.stop()
    beats = beats_after(run, "review_failed", lambda _e: True)
    drifts = [b["drift"] for b in beats]
    assert drifts and all(d == {"missing": 1} for d in drifts), drifts
    ages = [b["last_review_age_s"] for b in beats]
    assert ages == sorted(ages) and ages[-1] > ages[0], ages  # no reset by a failed review
    assert run.stop() == 0
