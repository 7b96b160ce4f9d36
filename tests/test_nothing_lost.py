"""Nothing lost, nothing deleted by mistake (issue 10): a lost answer or a crash at any
step leaves no features in the context that the ledger does not know of; the delete
guard cannot be walked around (two cycles, paced deletes, duplicates); a failed
image is looked at again by its path on disk. Against the embedded context and
against `featsync serve` over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from featsync import ledger as ledger_module
from featsync import sqlitefiles
from featsync.engine import Engine
from featsync.errors import Fatal, Transient
from featsync.ledger import SqlLedger
from featsync.localcontext import LocalContext
from featsync.model import (
    ImageData,
    Kind,
    LedgerRow,
    LocalFile,
    Policy,
    RootState,
    Snapshot,
    State,
)
from featsync.plan import plan
from featsync.samples import textured_bytes
from featsync.schema import SCHEMA_VERSION
from tests.conftest import (
    Backend,
    CountingContext,
    Server,
    Workspace,
    set_mtime_past,
    start_server,
    wait_for,
)
from tests.test_aspose import CREDS, requests_for, served_ids, use_server
from tests.test_cli import featsync

# -- both contexts ----------------------------------------------------------------------


def _images(ws: Workspace, names: list[str], seed: int = 0) -> None:
    for n, name in enumerate(names):
        set_mtime_past(ws.image(name, seed + n))


# -- a lost answer, a crash: no orphans ---------------------------------------------------


class Crash(BaseException):
    """featsync dies here (nothing after this point runs, nothing is recorded)."""


class Faulty(CountingContext):
    """The real embedded context; its `at`-th add, update or delete goes wrong: "before"
    (featsync dies before sending it), "after" (dies once the context did it) or "drop"
    (the context did it; the answer is lost). `sent` counts each add/update passed on,
    by image ID."""

    def __init__(self, inner: LocalContext, at: int = 0, how: str = "") -> None:
        super().__init__(inner)
        self.at, self.how = at, how
        self.n = 0
        self.faulted: str | None = None  # the image ID of the call that went wrong
        self.sent: Counter[str] = Counter()
        self.lock = threading.Lock()

    def _do(self, image_id: str, send: bool, call: Callable[[], Any]) -> Any:
        with self.lock:
            self.n += 1
            hit = self.n == self.at
            if hit:
                self.faulted = image_id
        if hit and self.how == "before":
            raise Crash
        result = call()
        if send:
            with self.lock:
                self.sent[image_id] += 1
        if hit and self.how == "after":
            raise Crash
        if hit and self.how == "drop":
            raise Transient("fault injection: the answer was lost")
        return result

    def add_features(self, image_id: str, image: ImageData) -> int | None:
        call = super().add_features
        return self._do(image_id, True, lambda: call(image_id, image))  # type: ignore[no-any-return]

    def update_features(self, image_id: str, image: ImageData) -> int | None:
        call = super().update_features
        return self._do(image_id, True, lambda: call(image_id, image))  # type: ignore[no-any-return]

    def delete_features(self, image_id: str) -> None:
        call = super().delete_features
        self._do(image_id, False, lambda: call(image_id))


def _cycle_with(ws: Workspace, ctx: Faulty, **kw: Any) -> Any:
    settings = ws.settings()
    ledger = SqlLedger(settings.ledger.url)
    try:
        with capture_logs():
            return Engine(settings, ledger, ctx, structlog.get_logger()).cycle(**kw)
    finally:
        ledger.close()


@pytest.mark.parametrize("how", ["drop", "after"])
def test_an_add_whose_answer_was_lost_is_deleted_when_its_file_goes_embedded(
    ws: Workspace, how: str
) -> None:
    """The context took the add; the answer was lost (or featsync died right after the
    call): when the file goes, its features go too."""
    _images(ws, ["keep.jpg", "lost.jpg"])
    ws.write_config(sync={"folder": "images", "concurrency": 1})
    ctx = Faulty(LocalContext(ws.settings().context.path), at=2, how=how)
    try:
        with contextlib.suppress(Crash):
            _cycle_with(ws, ctx)
    finally:
        ctx.close()
    assert ws.remote_ids() == {"keep.jpg", "lost.jpg"}  # but the context took it
    lost = next(i for i in ("keep.jpg", "lost.jpg") if i not in _synced(ws))
    (ws.images / lost).unlink()
    after = ws.cycle()
    assert after.calls == {"delete": 1} and after.report.in_step
    assert ws.remote_ids() == {"keep.jpg", "lost.jpg"} - {lost}


def _synced(ws: Workspace) -> set[str]:
    ledger = ws.ledger()
    try:
        return {i for i, r in ledger.load().items() if r.state == State.SYNCED}
    finally:
        ledger.close()


def test_an_add_whose_answer_was_dropped_by_serve_is_deleted_when_its_file_goes(
    ws: Workspace, tmp_path: Path
) -> None:
    data = tmp_path / "serve-data"
    maker = start_server(data)
    port = int(maker.api.split(":")[2].split("/")[0])
    try:
        context_id = use_server(ws, maker, max_retries=0)
    finally:
        maker.stop()
    dropping = start_server(data, "--drop-rate", "1", port=port)  # the same context, same URL
    try:
        _images(ws, ["a.jpg", "b.jpg", "c.jpg"])
        first = featsync("reconcile", cwd=ws.base, env=CREDS)
        assert first.returncode == 1, first.stderr
        assert served_ids(dropping, context_id) == {"a.jpg", "b.jpg", "c.jpg"}  # answers cut
    finally:
        dropping.stop()
    healthy = start_server(data, "--access-log", port=port)  # the same context, same URL
    try:
        (ws.images / "a.jpg").unlink()
        second = featsync("reconcile", cwd=ws.base, env=CREDS)
        assert second.returncode == 0, second.stderr
        assert served_ids(healthy, context_id) == {"b.jpg", "c.jpg"}
        deletes = [e for e in requests_for(healthy, context_id) if e["method"] == "DELETE"]
        assert len(deletes) == 1
    finally:
        healthy.stop()


@pytest.mark.parametrize("seed", range(16))
def test_a_crash_or_a_lost_answer_at_any_step_of_any_plan_loses_nothing(
    ws: Workspace, seed: int
) -> None:
    """A random folder change, a fault at a random call, then runs to completion: the
    context holds exactly the folder's images, each with its current content, and no
    image was sent more than twice (1 + one fault)."""
    rnd = random.Random(seed)
    ws.write_config(
        sync={"folder": "images", "concurrency": rnd.choice([1, 2, 3])},
        safety={"max_delete_fraction": 1.0},  # orphans here, not the delete guard
    )
    names = [f"i{n}.jpg" for n in range(6)]
    _images(ws, names, seed * 100)
    assert ws.cycle().report.in_step
    content = seed * 100 + 50
    for name in names:
        roll = rnd.random()
        if roll < 0.25:
            set_mtime_past(ws.image(name, content := content + 1))  # modified
        elif roll < 0.45:
            (ws.images / name).unlink()
        elif roll < 0.6:
            (ws.images / name).rename(ws.images / f"moved-{name}")
    for n in range(rnd.randint(0, 2)):
        set_mtime_past(ws.image(f"new{n}.jpg", content := content + 1))
    planned = ws.cycle(dry_run=True).report.plan
    if not planned.actions:
        return
    how = rnd.choice(["before", "after", "drop"])
    ctx = Faulty(
        LocalContext(ws.settings().context.path), rnd.randint(1, len(planned.actions)), how
    )
    try:
        with contextlib.suppress(Crash):
            _cycle_with(ws, ctx)
    finally:
        ctx.close()
    sent = Counter(ctx.sent)
    # and the folder changes again before the next run: the image whose call went
    # wrong may be gone now (the orphan case: features added, answer never recorded)
    if ctx.faulted is not None and rnd.random() < 0.8:
        for p in ws.images.rglob("*.jpg"):
            if p.relative_to(ws.images).as_posix() == ctx.faulted:
                p.unlink()
    for _ in range(3):
        cycle = ws.cycle()
        for a in cycle.logs:
            if a["event"] in ("image_added", "image_updated"):
                sent[a["image_id"]] += 1
        if cycle.report.in_step:
            break
    folder = {p.relative_to(ws.images).as_posix() for p in ws.images.rglob("*.jpg")}
    assert ws.remote_ids() == folder, f"{how} at call {ctx.at}"
    assert max(sent.values(), default=0) <= 2, sent
    # what the context holds is the current content of each file
    reference = LocalContext(str(ws.base / "reference.search"))
    held = ws.context()
    try:
        for name in sorted(folder):
            reference.add_features(name, (ws.images / name).read_bytes())
            assert held.get_features(name).features == reference.get_features(name).features
    finally:
        reference.close()
        held.close()


@pytest.mark.parametrize("where", ["embedded", "serve"])
def test_a_reconcile_killed_in_the_middle_loses_nothing(
    ws: Workspace, tmp_path: Path, where: str
) -> None:
    """kill -9 while adds are under way (on a slow server: some still in flight, which
    the server finishes); the files the ledger did not record as synced are deleted;
    the next run leaves the context equal to the folder."""
    srv = start_server(tmp_path / "slow", "--latency", "0.4") if where == "serve" else None
    held: Callable[[], set[str]] = ws.remote_ids
    env: dict[str, str] = {}
    try:
        if srv is not None:
            context_id = use_server(ws, srv)
            env = dict(CREDS)

            def held() -> set[str]:
                assert srv is not None
                return served_ids(srv, context_id)

        with ws.config_path.open("a", encoding="utf-8") as fh:  # orphans, not the guard
            fh.write("[safety]\nmax_delete_fraction = 1.0\n")
        names = [f"k{n:02}.jpg" for n in range(12)]
        _images(ws, names)
        ledger_file = ws.base / "featsync-ledger.db"
        proc = subprocess.Popen(
            [sys.executable, "-m", "featsync", "reconcile"],
            cwd=ws.base,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(
                lambda: len(_synced_in(ledger_file)) >= 2 or proc.poll() is not None, 60, "adds"
            )
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        synced = _synced_in(ledger_file)
        unsure = sorted(set(names) - synced, key=lambda n: (n not in held(), n))
        gone = unsure[:5]  # those the context may hold first; within the delete guard
        for name in gone:
            (ws.images / name).unlink()
        r = featsync("reconcile", cwd=ws.base, env=env)
        assert r.returncode == 0, r.stderr
        assert held() == set(names) - set(gone)
    finally:
        if srv is not None:
            srv.stop()


def _synced_in(db: Path) -> set[str]:
    if not db.exists():
        return set()
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            rows = conn.execute("SELECT image_id FROM images WHERE state = 'synced'")
            return {r[0] for r in rows}
    except sqlite3.Error:
        return set()


# -- the delete guard ----------------------------------------------------------------------


def test_withheld_deletes_stay_withheld_until_confirmed(ws: Workspace, backend: Backend) -> None:
    """A folder swapped for one with other images: the first cycle withholds the deletes;
    the second must not send them (judged against 210 they would be under 50%)."""
    old = [f"old{n:03}.jpg" for n in range(20)]
    _images(ws, old)
    assert featsync("reconcile", cwd=ws.base, env=backend.env).returncode == 0
    for name in old:
        (ws.images / name).unlink()
    new = [f"new{n:03}.jpg" for n in range(22)]
    _images(ws, new, 500)
    for attempt in range(2):
        r = featsync("reconcile", cwd=ws.base, env=backend.env)
        assert r.returncode == 1, r.stderr
        assert "deletes_withheld" in r.stderr, attempt
        assert backend.remote() == set(old) | set(new), attempt
    status = featsync("status", cwd=ws.base, env=backend.env)
    assert status.returncode == 1
    assert "withheld deletes: 20" in status.stdout and "--confirm-deletes" in status.stdout
    confirmed = featsync("reconcile", "--confirm-deletes", cwd=ws.base, env=backend.env)
    assert confirmed.returncode == 0, confirmed.stderr
    assert backend.remote() == set(new)
    assert featsync("status", cwd=ws.base, env=backend.env).returncode == 0


def test_withheld_deletes_are_released_when_the_files_come_back(ws: Workspace) -> None:
    names = [f"b{n}.jpg" for n in range(4)]
    _images(ws, names)
    ws.cycle()
    (ws.images).rename(ws.base / "away")
    ws.images.mkdir()
    set_mtime_past(ws.image("other.jpg", 99))
    first = ws.cycle()
    assert len(first.report.plan.withheld) == 4
    for name in names:
        shutil.move(ws.base / "away" / name, ws.images / name)
    back = ws.cycle()
    assert back.report.in_step and back.calls == {}
    assert back.events("deletes_released")[0]["count"] == 4
    ledger = ws.ledger()
    try:
        assert ledger.withheld_ids() == []
    finally:
        ledger.close()


def test_deletes_paced_over_many_cycles_are_judged_together(ws: Workspace) -> None:
    """Emptying a folder a few files per cycle (as a daemon's targeted cycles see it)
    deletes no more than the fraction limit allows within the window."""
    names = [f"p{n:03}.jpg" for n in range(20)]
    _images(ws, names)
    ws.cycle()
    settings = ws.settings()
    deleted = 0
    for burst in range(5):
        batch = names[burst * 4 : burst * 4 + 4]
        for name in batch:
            (ws.images / name).unlink()
        ledger = SqlLedger(settings.ledger.url)
        ctx = LocalContext(settings.context.path)
        try:
            with capture_logs():
                report = Engine(settings, ledger, ctx, structlog.get_logger()).cycle(scope=batch)
        finally:
            ctx.close()
            ledger.close()
        assert report.applied is not None
        deleted += report.applied.deleted
    assert deleted <= 10  # max_delete_fraction 0.5 of 20
    assert len(ws.remote_ids()) >= 10


def test_one_new_file_excuses_one_delete_of_its_content_not_all() -> None:
    """The move exemption counts: 100 deletes of one content and one new file with it
    is 99 deletes, over max_delete_count = 5."""
    rows = {
        f"d{n}.jpg": LedgerRow(f"d{n}.jpg", 1, 1, n, "same", 1, State.SYNCED, True, 0, None)
        for n in range(100)
    }
    rows["keep.jpg"] = LedgerRow("keep.jpg", 1, 1, 999, "k", 1, State.SYNCED, True, 0, None)
    new = LocalFile("new.jpg", "new.jpg", 1, 1, 1000, "same")
    snap = Snapshot(
        "/x", RootState.OK, 1, False, {"new.jpg": new}, unchanged=frozenset({"keep.jpg"})
    )
    p = plan(snap, rows, Policy(max_delete_count=5, max_delete_fraction=1.0), 0.0)
    assert len(p.withheld) == 100 and "99 deletes" in (p.withheld_reason or "")
    moved = plan(
        snap,
        {k: v for k, v in rows.items() if k in ("d0.jpg", "keep.jpg")},
        Policy(max_delete_count=0, max_delete_fraction=1.0),
        0.0,
    )
    assert [a.kind for a in moved.actions] == [Kind.ADD, Kind.DELETE]  # a move is no loss


def test_a_same_name_rewrite_of_most_of_the_folder_is_logged_as_mass_update(
    ws: Workspace,
) -> None:
    names = [f"m{n}.jpg" for n in range(6)]
    _images(ws, names)
    ws.cycle()
    _images(ws, names[:4], 300)
    c = ws.cycle()
    assert c.calls == {"update": 4}
    [event] = c.events("mass_update")
    assert event["count"] == 4 and event["held"] == 6


def test_a_gone_files_delete_does_not_wait_out_a_rejected_updates_quarantine(
    ws: Workspace, backend: Backend
) -> None:
    _images(ws, ["good.jpg", "bad.jpg"])
    assert featsync("reconcile", cwd=ws.base, env=backend.env).returncode == 0
    bad = ws.images / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    set_mtime_past(bad)
    r = featsync("reconcile", cwd=ws.base, env=backend.env)
    assert r.returncode == 1 and "image_failed" in r.stderr
    bad.unlink()
    gone = featsync("reconcile", cwd=ws.base, env=backend.env)
    assert gone.returncode == 0, gone.stderr
    assert backend.remote() == {"good.jpg"}


def test_a_failed_image_with_an_nfd_name_is_looked_at_again_by_its_path(ws: Workspace) -> None:
    """The retry of a failed image goes by the path found on disk: an NFD name is not
    rebuilt from its NFC ID, found missing, and deleted."""
    nfd = unicodedata.normalize("NFD", "café.jpg")
    path = ws.image(nfd, 1)
    set_mtime_past(path)
    ws.cycle()
    image_id = unicodedata.normalize("NFC", nfd)
    assert ws.remote_ids() == {image_id}
    path.write_bytes(b"\xff\xd8\xff\xe0 corrupt now")
    set_mtime_past(path)
    failed = ws.cycle().report.applied
    assert failed is not None and failed.failed == 1
    settings = ws.settings()
    ledger = SqlLedger(settings.ledger.url)
    ctx = LocalContext(settings.context.path)
    try:
        ledger.retry(None, 0.0)
        paths = ledger.due_paths(1e12, settings.sync.id_prefix)
        assert paths == [nfd]
        with capture_logs():
            report = Engine(settings, ledger, ctx, structlog.get_logger()).cycle(scope=paths)
    finally:
        ctx.close()
        ledger.close()
    assert report.plan.count(Kind.DELETE) == 0 and not report.plan.withheld
    assert ws.remote_ids() == {image_id}


# -- the ledger ----------------------------------------------------------------------------


def test_a_locked_ledger_is_waited_for_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another program holds the ledger locked (a backup, an sqlite3 shell): featsync
    waits and goes on once it is free, instead of stopping with "database is locked"."""
    monkeypatch.setattr(ledger_module, "BUSY_TIMEOUT_MS", 50)
    met: list[BaseException] = []
    real_busy = sqlitefiles._busy

    def counting_busy(exc: BaseException) -> bool:
        found = real_busy(exc)
        if found:
            met.append(exc)
        return found

    monkeypatch.setattr(sqlitefiles, "_busy", counting_busy)
    db = tmp_path / "l.db"
    ledger = SqlLedger(f"sqlite:///{db}")
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")

    def release_once_met_twice() -> None:
        wait_for(lambda: len(met) >= 2, 60, "featsync to meet the lock twice")
        other.execute("COMMIT")

    t = threading.Thread(target=release_once_met_twice)
    t.start()
    try:
        ledger.set_device(7)  # a write: waits for the lock, then succeeds
        assert len(met) >= 2
        assert ledger.device() == 7
    finally:
        t.join()
        other.close()
        ledger.close()


def test_a_ledger_locked_for_too_long_is_a_clear_fatal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "BUSY_TIMEOUT_MS", 20)
    monkeypatch.setattr(sqlitefiles, "BUSY_WAIT_S", 0.3)
    db = tmp_path / "l.db"
    ledger = SqlLedger(f"sqlite:///{db}")
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Fatal, match=r"locked.*still locked after"):
            ledger.set_device(7)
    finally:
        other.close()
        ledger.close()


def test_a_ledger_of_schema_1_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    SqlLedger(f"sqlite:///{db}").close()
    with sqlite3.connect(db) as conn:  # what featsync 0.x wrote
        for column in ("relpath", "failed_action", "withheld_at"):
            conn.execute(f"ALTER TABLE images DROP COLUMN {column}")
        conn.execute("DROP INDEX history_action_at")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        conn.execute(
            "INSERT INTO images (image_id, size, mtime_ns, inode, digest, version, state, "
            "remote, attempts, created_at, updated_at) "
            "VALUES ('a.jpg', 1, 1, 1, 'd', 1, 'synced', 1, 0, 0, 0)"
        )
    ledger = SqlLedger(f"sqlite:///{db}")
    try:
        assert ledger.schema_version() == SCHEMA_VERSION
        assert ledger.load()["a.jpg"].withheld_at is None
        ledger.withhold(["a.jpg"], 5.0)
        assert ledger.withheld_ids() == ["a.jpg"]
    finally:
        ledger.close()


# -- a look writes nothing ----------------------------------------------------------------


def _disk(base: Path) -> dict[str, bytes]:
    return {
        p.relative_to(base).as_posix(): p.read_bytes()
        for p in sorted(base.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_status_and_a_dry_run_create_nothing_before_the_first_sync(ws: Workspace) -> None:
    _images(ws, ["a.jpg", "b.jpg"])
    before = _disk(ws.base)
    dry = featsync("reconcile", "--dry-run", cwd=ws.base)
    assert dry.returncode == 1, dry.stderr  # it would add two images
    assert "add     a.jpg" in dry.stdout and "plan: 2 add" in dry.stdout
    status = featsync("status", cwd=ws.base)
    assert status.returncode == 1, status.stderr  # never synced: not in step
    assert "last cycle: never" in status.stdout
    assert _disk(ws.base) == before


def test_status_and_a_dry_run_leave_a_synced_ledger_and_store_as_they_were(
    ws: Workspace,
) -> None:
    _images(ws, ["a.jpg", "b.jpg"])
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    (ws.images / "a.jpg").unlink()
    set_mtime_past(ws.image("c.jpg", 9))
    before = _disk(ws.base)
    dry = featsync("reconcile", "--dry-run", cwd=ws.base)
    assert dry.returncode == 1, dry.stderr
    assert "add     c.jpg" in dry.stdout and "delete  a.jpg" in dry.stdout
    assert featsync("status", "--json", cwd=ws.base).returncode == 0
    assert _disk(ws.base) == before
    # and the real run still does what the dry run said
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    assert ws.remote_ids() == {"b.jpg", "c.jpg"}


def test_after_a_lost_ledger_images_removed_meanwhile_are_deleted(
    ws: Workspace, backend: Backend
) -> None:
    """The embedded context lists what it holds; featsync serve pages through it."""
    _images(ws, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    assert featsync("reconcile", cwd=ws.base, env=backend.env).returncode == 0
    for f in ws.base.glob("featsync-ledger.db*"):
        f.unlink()  # the ledger is lost (a new disk, a wiped state directory)
    (ws.images / "d.jpg").unlink()
    r = featsync("reconcile", cwd=ws.base, env=backend.env)
    assert r.returncode == 0, r.stderr
    assert "context_adopted" in r.stderr
    assert backend.remote() == {"a.jpg", "b.jpg", "c.jpg"}
    again = featsync("reconcile", cwd=ws.base, env=backend.env)
    assert again.returncode == 0 and '"unchanged": 3' in again.stderr


def test_the_ids_featsync_serve_holds_are_read_page_by_page(server: Server) -> None:
    from featsync.listing import held_ids
    from tests.conftest import new_context

    client = new_context(server)
    try:
        names = [f"p{n}.png" for n in range(5)]
        for n, name in enumerate(names):
            client.add_features(name, textured_bytes(n, "PNG"))
        assert held_ids(client, limit=2) == names  # pages of 2, 2 and 1
        assert held_ids(client, limit=5) == names  # a full last page, then an empty one
    finally:
        client.close()


def test_an_add_that_was_not_sent_after_all_leaves_no_may_hold_row(ws: Workspace) -> None:
    """The intent is written before an add goes to a worker; if the worker then does
    not send it (the file is still being written, a stop came first), the row goes
    back to what it was: no "may hold" that would cost a delete later."""
    _images(ws, ["new.jpg", "old.jpg"])
    ws.cycle()
    (ws.images / "old.jpg").unlink()
    assert ws.cycle().calls == {"delete": 1}
    set_mtime_past(ws.image("old.jpg", 7))  # back, with other content: an add
    settings = ws.settings()
    ledger = SqlLedger(settings.ledger.url)
    before = ledger.load()["old.jpg"]
    ctx = LocalContext(settings.context.path)
    asked: Counter[str] = Counter()

    def hold(rel: str) -> bool:  # settled for the scan; written to again before the send
        asked[rel] += 1
        return asked[rel] > 1

    try:
        with capture_logs() as logs:
            engine = Engine(settings, ledger, ctx, structlog.get_logger(), hold=hold)
            report = engine.cycle()
        assert report.applied is not None and report.applied.deferred == 1
        assert [e["event"] for e in logs if e["event"] == "image_deferred"] == ["image_deferred"]
        assert ledger.load()["old.jpg"] == before  # deleted, not held: as it was
    finally:
        ctx.close()
        ledger.close()
    (ws.images / "old.jpg").unlink()
    assert ws.cycle().calls == {}  # no delete for an add that never went


def test_moves_do_not_fill_the_delete_window(ws: Workspace) -> None:
    """Most of the folder renamed (a move: excused), then, within the hour, a few real
    deletes: they go through; the renames were no losses."""
    names = [f"r{n:02}.jpg" for n in range(10)]
    _images(ws, names)
    ws.cycle()
    (ws.images / "renamed").mkdir()
    for name in names[:8]:
        (ws.images / name).rename(ws.images / "renamed" / name)
    moved = ws.cycle()
    assert moved.calls == {"add": 8, "delete": 8} and not moved.report.plan.withheld
    for name in names[8:]:
        (ws.images / name).unlink()
    after = ws.cycle()  # 2 of 10: within the limit, the 8 moves not counted
    assert after.calls == {"delete": 2} and not after.report.plan.withheld
    ledger = ws.ledger()
    try:
        assert ledger.recent_changes(0.0)[0] == 2
    finally:
        ledger.close()


def test_an_updates_old_content_excuses_no_delete() -> None:
    """a.jpg rewritten with other content while its copy is deleted: the copy's content
    goes from the context for good, so that delete counts (it is no move)."""
    rows = {
        i: LedgerRow(i, 1, 1, n, "x", 1, State.SYNCED, True, 0, None)
        for n, i in enumerate(["a.jpg", "copy.jpg"])
    }
    changed = LocalFile("a.jpg", "a.jpg", 2, 2, 0, "y")
    snap = Snapshot("/x", RootState.OK, 1, False, {"a.jpg": changed})
    p = plan(snap, rows, Policy(max_delete_count=0, max_delete_fraction=1.0), 0.0)
    assert [a.kind for a in p.actions] == [Kind.UPDATE] and len(p.withheld) == 1


def _age_history(ws: Workspace, seconds: float) -> None:
    """Move the ledger's history back in time: what was sent lies before the window."""
    with sqlite3.connect(ws.base / "featsync-ledger.db") as conn:
        conn.execute("UPDATE history SET at = at - ?", (seconds,))


def test_renames_back_and_forth_do_not_open_the_delete_window(ws: Workspace) -> None:
    """All renamed and renamed back (moves, excused), then deletes paced a few per
    cycle: no more than the fraction limit goes, as without the renames."""
    names = [f"w{n:02}.jpg" for n in range(20)]
    _images(ws, names)
    ws.cycle()
    _age_history(ws, 7200)
    for name in names:
        (ws.images / name).rename(ws.images / f"r_{name}")
    assert ws.cycle().calls == {"add": 20, "delete": 20}
    for name in names:
        (ws.images / f"r_{name}").rename(ws.images / name)
    assert ws.cycle().calls == {"add": 20, "delete": 20}
    deleted = 0
    for burst in range(5):
        for name in names[burst * 4 : burst * 4 + 4]:
            (ws.images / name).unlink()
        deleted += ws.cycle().calls["delete"]
    assert deleted <= 10, f"{deleted} of 20 deleted"


def test_a_new_set_copied_in_before_the_old_one_goes_does_not_dilute_the_deletes(
    ws: Workspace,
) -> None:
    """A sync tool mirroring the wrong source: the new images arrive first, the old
    ones are removed after. Judged against what the context held before the window
    (20), the 20 deletes are withheld, as a swap in one cycle would be."""
    old = [f"old{n:02}.jpg" for n in range(20)]
    _images(ws, old)
    ws.cycle()
    _age_history(ws, 7200)
    _images(ws, [f"new{n:02}.jpg" for n in range(20)], 500)
    assert ws.cycle().calls == {"add": 20}
    for name in old:
        (ws.images / name).unlink()
    gone = ws.cycle()
    assert gone.calls == {} and len(gone.report.plan.withheld) == 20


def test_a_withheld_delete_of_a_failed_image_is_not_retried_every_turn(
    ws: Workspace,
) -> None:
    """A failed image whose delete is withheld is not "due" for the daemon's targeted
    cycles: it waits for its file or a confirm (a full rescan still judges it)."""
    names = [f"f{n}.jpg" for n in range(4)]
    _images(ws, names)
    ws.cycle()
    bad = ws.images / "f0.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 corrupt")
    set_mtime_past(bad)
    ws.cycle()
    for name in names:
        (ws.images / name).unlink()
    assert len(ws.cycle().report.plan.withheld) == 4
    ledger = ws.ledger()
    try:
        ledger.retry(None, 0.0)
        assert ledger.due_paths(1e12, "") == []
    finally:
        ledger.close()


def _old_ledger(ws: Workspace) -> Path:
    """The workspace's ledger, synced, then made as the previous release left it:
    schema 2, no cycles.interrupted."""
    _images(ws, ["a.jpg", "b.jpg"])
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    db = ws.base / "featsync-ledger.db"
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE cycles DROP COLUMN interrupted")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    return db


def test_after_an_upgrade_the_looks_read_an_older_ledger_and_leave_it_as_it_was(
    ws: Workspace,
) -> None:
    db = _old_ledger(ws)
    before = _disk(ws.base)
    status = featsync("status", "--json", cwd=ws.base)
    assert status.returncode == 0, status.stderr  # monitoring goes on across an upgrade
    assert json.loads(status.stdout)["counts"]["synced"] == 2
    dry = featsync("reconcile", "--dry-run", cwd=ws.base)
    assert dry.returncode == 0, dry.stderr  # the careful first step works
    hist = featsync("history", "a.jpg", cwd=ws.base)
    assert hist.returncode == 0, hist.stderr
    assert _disk(ws.base) == before  # the file is as the old release left it
    with sqlite3.connect(db) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
        assert version.fetchone()[0] == "2"
    conn.close()
    assert featsync("reconcile", cwd=ws.base).returncode == 0  # a sync upgrades it in place
    ledger = SqlLedger(f"sqlite:///{db}")
    try:
        assert ledger.schema_version() == SCHEMA_VERSION
    finally:
        ledger.close()


def test_a_look_reads_one_state_while_a_writer_changes_and_checkpoints_the_ledger(
    tmp_path: Path,
) -> None:
    """A look (a report with probes may take minutes) opened on a ledger nobody writes
    (no -wal: read without locks) must not be torn by a sync that starts meanwhile,
    writes and checkpoints into the file: it reads the state it opened."""
    db = tmp_path / "l.db"
    writer = SqlLedger(f"sqlite:///{db}")
    rows = [(f"img{n:05}.jpg", "d" * 64) for n in range(2000)]
    writer.record_intents(rows, 1.0)
    writer.close()  # a clean close: the -wal is gone
    assert not (tmp_path / "l.db-wal").exists()
    look = SqlLedger(f"sqlite:///{db}", read_only=True)
    try:
        seen = len(look.load())
        writer = SqlLedger(f"sqlite:///{db}")
        writer.record_intents([(f"new{n:05}.jpg", "e" * 64) for n in range(2000)], 2.0)
        with writer.engine.begin() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        writer.close()
        assert len(look.load()) == seen  # the state it opened, whole
        assert look.counts() == look.counts()
    finally:
        look.close()
    again = SqlLedger(f"sqlite:///{db}", read_only=True)
    try:
        assert len(again.load()) == seen + 2000  # a new look sees the new state
    finally:
        again.close()


def test_a_copy_that_a_writer_checkpointed_into_while_it_was_made_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look's copy of a ledger nobody wrote (read without locks) is made page by
    page; a sync that writes and checkpoints into the file in the middle of it must
    not leave a copy of two states: the copy is made again, of the state after."""
    db = tmp_path / "l.db"
    writer = SqlLedger(f"sqlite:///{db}")
    writer.record_intents([(f"img{n:05}.jpg", "d" * 64) for n in range(2000)], 1.0)
    writer.close()
    assert not (tmp_path / "l.db-wal").exists()
    real_connect = sqlite3.connect
    copies: list[str] = []

    class PageByPage:
        """The source connection of a copy, its backup made one page at a time with a
        writer's sync coming in after the first page of the first copy."""

        def __init__(self, conn: sqlite3.Connection, uri: str) -> None:
            self.conn, self.uri = conn, uri

        def execute(self, sql: str) -> sqlite3.Cursor:
            return self.conn.execute(sql)

        def backup(self, target: sqlite3.Connection) -> None:
            copies.append(self.uri)

            def after_a_page(_status: int, _remaining: int, _total: int) -> None:
                if len(copies) == 1 and not written:
                    written.append(True)
                    sync = SqlLedger(f"sqlite:///{db}")
                    sync.record_intents([(f"new{n:05}.jpg", "e" * 64) for n in range(2000)], 2.0)
                    with sync.engine.begin() as conn:
                        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                    sync.close()

            self.conn.backup(target, pages=1, progress=after_a_page)

        def close(self) -> None:
            self.conn.close()

    written: list[bool] = []

    def connect(database: Any, *args: Any, **kwargs: Any) -> Any:
        conn = real_connect(database, *args, **kwargs)
        is_look = isinstance(database, str) and database.startswith("file:")
        return PageByPage(conn, database) if is_look else conn

    monkeypatch.setattr(sqlite3, "connect", connect)
    look = SqlLedger(f"sqlite:///{db}", read_only=True)
    monkeypatch.undo()
    try:
        assert written and len(copies) == 2, copies  # the first copy was thrown away
        assert "immutable=1" in copies[0]
        assert len(look.load()) == 4000  # the state after the sync, whole
    finally:
        look.close()
