"""Backups against what a careless or hostile operator (and a crash) does: changes by
hand, a lost ledger, a size cap smaller than the folder, a missing ledger at prune, a
backups folder that cannot be opened, odd restore targets, pipes and symlinks."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from featsync.backups import BackupStore
from featsync.localcontext import LocalContext
from featsync.model import ImageFeatures
from featsync.samples import textured_bytes
from tests.conftest import Workspace, set_mtime_past
from tests.test_backups import _backups, _records, _write
from tests.test_cli import featsync, json_lines


def _sync(ws: Workspace, expect: int = 0) -> subprocess.CompletedProcess[str]:
    r = featsync("reconcile", cwd=ws.base)
    assert r.returncode == expect, r.stderr[-2000:]
    return r


def _held(ws: Workspace, image_id: str) -> ImageFeatures:
    ctx = ws.context()
    try:
        return ctx.get_features(image_id)
    finally:
        ctx.close()


def test_changes_by_hand_and_a_lost_ledger_keep_every_record_under_its_own_label(
    ws: Workspace,
) -> None:
    ws.write_config(sync={"folder": "images"}, backup={"keep_versions": 10})
    _write(ws, "x.jpg", 1)
    _write(ws, "keep.jpg", 2)
    _sync(ws)
    original = _held(ws, "x.jpg")
    for n, seed in enumerate((3, 4)):
        other = ws.base / f"other{n}.jpg"
        other.write_bytes(textured_bytes(seed, "JPEG"))
        r = featsync("features", "update", "x.jpg", "--file", str(other), cwd=ws.base)
        assert r.returncode == 0 and "kept" in r.stdout and "already" not in r.stdout, r
    by_hand = _held(ws, "x.jpg")  # the second hand update's features
    _write(ws, "x.jpg", 5)
    _sync(ws)
    records = [f for _, f in _records(ws, "x.jpg")]
    assert len(records) == 3 and records[0] == original and records[2] == by_hand
    assert _backups(ws, "x.jpg") == {1: original}  # v1's backup is v1's record
    # A lost ledger: a new lineage whose version numbers start again.
    for p in ws.base.glob("featsync-ledger.db*"):
        p.unlink()
    _sync(ws)  # adopts what the context holds; x.jpg is sent again ("already there")
    v1_new = _held(ws, "x.jpg")
    _write(ws, "x.jpg", 6)
    _sync(ws)
    assert _backups(ws, "x.jpg")[1] == v1_new  # not the old lineage's v1
    assert len(_records(ws, "x.jpg")) == 5  # ... and the old records are all still there
    history = json.loads(featsync("history", "x.jpg", "--json", cwd=ws.base).stdout)
    assert history["other_backups"], history


def test_the_size_cap_never_spends_features_backups_on_copies_of_current_images(
    ws: Workspace,
) -> None:
    for n in range(3):
        _write(ws, f"c{n}.jpg", 10 + n)
    ws.write_config(sync={"folder": "images"}, backup={"images": True})
    _sync(ws)
    _write(ws, "c0.jpg", 20)
    _sync(ws)
    folder = Path(ws.settings().backup.path)
    db = sqlite3.connect(str(folder / "features.db"))
    (records,) = db.execute("SELECT SUM(size) FROM backups").fetchone()
    old_copy = db.execute(
        "SELECT k.size FROM kept_images k JOIN backups b ON b.digest = k.digest"
    ).fetchone()[0]
    (copies,) = db.execute("SELECT SUM(size) FROM kept_images").fetchone()
    with db:  # as if the copies were made long ago (a fresh copy is never pruned)
        db.execute("UPDATE kept_images SET kept_at = kept_at - 7200")
    db.close()
    cap = records + old_copy + 512
    assert records + copies > cap  # the folder's copies alone would break the cap
    ws.write_config(sync={"folder": "images"}, backup={"images": True, "max_size": cap})
    r = featsync("backup", "prune", cwd=ws.base)
    assert r.returncode == 0 and "0 over max_size" in r.stdout, r.stdout
    assert sorted(_backups(ws, "c0.jpg")) == [1]
    # Below what the backups need, the oldest go, with the copy only they kept.
    ws.write_config(sync={"folder": "images"}, backup={"images": True, "max_size": 1024})
    r = featsync("backup", "prune", cwd=ws.base)
    assert "1 over max_size, 1 image copies" in r.stdout, r.stdout
    assert _backups(ws, "c0.jpg") == {}
    current = {p.name for p in (folder / "images").rglob("*") if p.is_file()}
    assert len(current) == 3  # the copies of what the context holds stay


def test_prune_refuses_without_the_ledger_that_says_what_is_gone(ws: Workspace) -> None:
    _write(ws, "a.jpg", 1)
    _write(ws, "b.jpg", 2)
    _sync(ws)
    _write(ws, "a.jpg", 3)
    _sync(ws)
    (ws.base / "featsync-ledger.db").rename(ws.base / "elsewhere.db")
    for p in ws.base.glob("featsync-ledger.db-*"):
        p.unlink()
    r = featsync("backup", "prune", cwd=ws.base)
    assert r.returncode == 2 and "holds no images" in r.stderr and "not pruned" in r.stderr
    (ws.base / "elsewhere.db").rename(ws.base / "featsync-ledger.db")
    assert sorted(_backups(ws, "a.jpg")) == [1]


@pytest.mark.parametrize("required", [True, False])
def test_a_backups_folder_that_cannot_be_opened(ws: Workspace, required: bool) -> None:
    """Only what needs a backup waits (required), or everything goes, logged (not). The
    waits are no outage: more of them than the worker's breaker allows (3) stop no add
    queued behind them (the adds go first, and the deletes after every send)."""
    for n in range(5):
        _write(ws, f"u{n}.jpg", n)
    _write(ws, "d.jpg", 10)
    _write(ws, "k.jpg", 11)
    _sync(ws)
    (ws.base / "notadir").write_text("a file where the backups folder should be")
    ws.write_config(
        sync={"folder": "images", "concurrency": 1},
        backup={"path": "notadir/backups", "required": required},
    )
    for n in range(5):
        _write(ws, f"u{n}.jpg", 20 + n)
    (ws.images / "d.jpg").unlink()
    _write(ws, "zz-new.jpg", 30)  # sorted after the updates: sent after five failed
    r = _sync(ws, expect=1 if required else 0)
    events = json_lines(r.stderr)
    assert [e for e in events if e["event"] == "backups_unavailable"]
    assert not [e for e in events if e["event"] == "worker_backoff"], r.stderr[-3000:]
    done = {e["image_id"]: e["event"] for e in events if e["event"].startswith("image_")}
    if required:
        assert done["zz-new.jpg"] == "image_added"
        assert {done[f"u{n}.jpg"] for n in range(5)} == {"image_failed"}
        assert done["d.jpg"] == "image_failed"
        assert ws.remote_ids() >= {"d.jpg", "zz-new.jpg"}
    else:
        assert done["u0.jpg"] == "image_updated" and done["d.jpg"] == "image_deleted"
        skipped = [e for e in events if e["event"] == "backup_skipped"]
        assert len(skipped) == 6 and "not a directory" in skipped[0]["reason"].lower()


def test_retention_never_lets_a_later_record_take_a_versions_label(ws: Workspace) -> None:
    """A change by hand, then a sync: two records under v1's label. Pruning to
    keep_versions keeps the first (v1's backup), not just the newest by time."""
    _write(ws, "x.jpg", 1)
    _write(ws, "keep.jpg", 2)
    _sync(ws)
    original = _held(ws, "x.jpg")
    other = ws.base / "other.jpg"
    other.write_bytes(textured_bytes(3, "JPEG"))
    assert (
        featsync("features", "update", "x.jpg", "--file", str(other), cwd=ws.base).returncode == 0
    )
    for seed in (4, 5, 6):
        _write(ws, "x.jpg", seed)
        _sync(ws)
    assert _backups(ws, "x.jpg")[1] == original
    r = featsync("features", "get", "x.jpg", "--version", "1", cwd=ws.base)
    assert json.loads(r.stdout) == original.as_json()


def test_backups_of_ids_the_ledger_does_not_know_are_kept_unless_asked(ws: Workspace) -> None:
    """A lost ledger: IDs it does not know yet are no evidence of anything gone."""
    _write(ws, "a.jpg", 1)
    _write(ws, "b.jpg", 2)
    _write(ws, "c.jpg", 3)
    _sync(ws)
    _write(ws, "a.jpg", 4)
    _write(ws, "b.jpg", 5)
    _sync(ws)
    (ws.images / "b.jpg").unlink()  # gone while the ledger is lost too
    db = sqlite3.connect(str(Path(ws.settings().backup.path) / "features.db"))
    with db:
        db.execute("UPDATE backups SET taken_at = taken_at - 200 * 86400")
        db.execute("DELETE FROM meta WHERE key = 'full_prune_at'")
    db.close()
    for p in ws.base.glob("featsync-ledger.db*"):
        p.unlink()
    for p in ws.base.glob("featsync-context.db*"):
        p.unlink()
    _write(ws, "a.jpg", 6)
    _sync(ws)  # a new ledger: a full prune runs after its cycle
    assert sorted(_backups(ws, "a.jpg")) == [] and len(_records(ws, "a.jpg")) == 1
    assert len(_records(ws, "b.jpg")) == 1  # unknown to the new ledger: kept
    r = featsync("backup", "prune", cwd=ws.base)
    assert r.returncode == 0 and len(_records(ws, "b.jpg")) == 1
    r = featsync("backup", "prune", "--unknown", cwd=ws.base)
    assert r.returncode == 0 and _records(ws, "b.jpg") == [], r.stdout


def test_features_diff_of_records_of_other_lengths_or_empty() -> None:
    from featsync.lifecycle import compare
    from featsync.model import ImageFeatures

    wide = ImageFeatures("x", 2, 488, bytes(122))
    narrow = ImageFeatures("x", 1, 256, bytes(32))
    empty = ImageFeatures("x", 0, 488, b"")
    report = compare(wide, narrow, similar=True)
    assert report["similarity"] is None and report["identical"] is False
    assert compare(empty, wide, similar=True)["share_unchanged"] is None


def test_a_stop_during_the_backup_sends_no_update(ws: Workspace) -> None:
    import structlog

    from featsync.engine import Engine
    from featsync.ledger import SqlLedger

    _write(ws, "s.jpg", 1)
    _write(ws, "t.jpg", 2)
    _sync(ws)
    before = _held(ws, "s.jpg")
    _write(ws, "s.jpg", 3)
    stop = [False]

    class StopOnGet:
        def __init__(self, inner: LocalContext) -> None:
            self.inner = inner

        def get_features(self, image_id: str) -> object:
            stop[0] = True  # SIGTERM arrives while the backup GET is under way
            return self.inner.get_features(image_id)

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    settings = ws.settings()
    ledger = SqlLedger(settings.ledger.url)
    ctx = StopOnGet(LocalContext(settings.context.path))
    try:
        report = Engine(settings, ledger, ctx, structlog.get_logger(), stop=lambda: stop[0]).cycle()  # type: ignore[arg-type]
    finally:
        ctx.inner.close()
        ledger.close()
    assert report.applied is not None and report.applied.updated == 0
    assert report.applied.not_sent == 1
    assert _held(ws, "s.jpg") == before  # backed up, and not replaced after the stop
    assert _sync(ws).returncode == 0 and _held(ws, "s.jpg") != before


def test_restore_refuses_targets_that_are_not_regular_files(ws: Workspace) -> None:
    _write(ws, "r.jpg", 1)
    _write(ws, "s.jpg", 2)
    ws.write_config(sync={"folder": "images"}, backup={"images": True})
    _sync(ws)
    _write(ws, "r.jpg", 3)
    _sync(ws)
    fifo = ws.base / "fifo.jpg"
    os.mkfifo(fifo)
    (ws.base / "adir").mkdir()
    (ws.base / "dangling.jpg").symlink_to(ws.base / "nowhere.jpg")
    for target, kind in [
        (fifo, "is a FIFO"),
        (ws.base / "adir", "is a directory"),
        (ws.base / "dangling.jpg", "is a symbolic link"),
    ]:
        for force in ((), ("--force",)):
            r = featsync("restore", "r.jpg", "--to", str(target), *force, cwd=ws.base)
            assert r.returncode == 1 and kind in r.stderr, (target, r.stderr)
            assert "Traceback" not in r.stderr
    outside = ws.base / "out" / "r-v1.jpg"
    r = featsync("restore", "r.jpg", "--to", str(outside), cwd=ws.base)
    assert r.returncode == 0 and "will not send it" in r.stdout, r
    assert outside.read_bytes() == textured_bytes(1, "JPEG")
    # a replaced file keeps its mode
    target = ws.images / "r.jpg"
    target.chmod(0o640)
    assert featsync("restore", "r.jpg", "--force", cwd=ws.base).returncode == 0
    assert (target.stat().st_mode & 0o777) == 0o640
    assert target.read_bytes() == textured_bytes(1, "JPEG")


def test_export_writes_through_a_symlink_and_stops_quietly_at_a_closed_pipe(
    ws: Workspace,
) -> None:
    for n in range(30):
        _write(ws, f"e{n:02d}.jpg", n)
    _sync(ws)
    for n in range(30):
        _write(ws, f"e{n:02d}.jpg", 100 + n)
    _sync(ws)
    real = ws.base / "real.jsonl"
    real.write_text("")
    link = ws.base / "link.jsonl"
    link.symlink_to(real)
    r = featsync("backup", "export", "--out", str(link), cwd=ws.base)
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and len(real.read_text().splitlines()) == 30
    private = ws.base / "private.jsonl"
    private.write_text("")
    private.chmod(0o600)
    r = featsync("backup", "export", "--out", str(private), cwd=ws.base)
    assert r.returncode == 0, r.stderr
    assert len(private.read_text().splitlines()) == 30
    assert (private.stat().st_mode & 0o777) == 0o600  # replaced, its mode kept
    env = {k: v for k, v in os.environ.items() if k != "FEATSYNC_CONFIG"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "featsync", "backup", "export"],
        cwd=ws.base,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(10)  # one line's start, then the reader goes away
    proc.stdout.close()
    rc = proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert rc == 128 + signal.SIGPIPE and "Traceback" not in err, (rc, err)
    listed = featsync("backup", "list", "e01.jpg", "e02.jpg", "nosuch.jpg", cwd=ws.base)
    assert listed.stdout.splitlines()[-1].startswith("2 backup(s) of 2 of the 3 image ID(s)")


def test_an_image_copy_of_a_file_rewritten_while_copied_is_not_kept(tmp_path: Path) -> None:
    src = tmp_path / "a.jpg"
    src.write_bytes(textured_bytes(1, "JPEG"))
    store = BackupStore(str(tmp_path / "backups"))
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="changed while it was copied"):
            store.keep_image(fd, src.stat().st_size, "0" * 64, 1.0)  # not its hash
    finally:
        os.close(fd)
        store.close()
    assert not [p for p in (tmp_path / "backups" / "images").rglob("*") if p.is_file()]


def test_an_id_typed_in_nfd_is_the_nfc_image(ws: Workspace) -> None:
    import unicodedata

    name = unicodedata.normalize("NFC", "café.jpg")
    path = ws.image(name, 1)
    set_mtime_past(path)
    _sync(ws)
    r = featsync("history", unicodedata.normalize("NFD", name), cwd=ws.base)
    assert r.returncode == 0 and "add" in r.stdout, r.stderr
