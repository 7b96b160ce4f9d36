"""A look (search, report, verify, history, export) reads the embedded store and the
backups while a sync may start writing them: it never answers from a torn file.

A store with no ``-wal`` beside it (no writer since the last clean close) is read
``immutable``: SQLite takes no lock and trusts the file not to change. A cron
reconcile that starts during the look and checkpoints into the file left the look
with "database disk image is malformed" on 299 of 300 reads, and an image list of
the state before. Real store files, a second real connection writing them.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from featsync.backups import BackupStore
from featsync.errors import Fatal, NotFound
from featsync.localcontext import LocalContext
from featsync.model import ImageFeatures
from featsync.sqlitefiles import LookDb

rng = np.random.default_rng(7)
DESCRIPTORS = {f"old{i:04d}": rng.integers(0, 256, (400, 61), dtype=np.uint8) for i in range(300)}
NEW = {f"new{i:04d}": rng.integers(0, 256, (400, 61), dtype=np.uint8) for i in range(300)}


def checkpoint(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


@pytest.fixture
def store(tmp_path: Path) -> str:
    path = str(tmp_path / "ctx.search")
    ctx = LocalContext(path)
    ctx.load_descriptors(DESCRIPTORS.items())
    ctx.close()
    assert not os.path.exists(path + "-wal")  # closed cleanly: a look reads it immutable
    return path


def sync_writes(path: str) -> None:
    """What a reconcile that starts now does to the store: 300 adds, 150 deletes, and
    the checkpoints that move them into the file itself."""
    writer = LocalContext(path)
    try:
        writer.load_descriptors(NEW.items())
        for image_id in list(DESCRIPTORS)[::2]:
            writer.delete_features(image_id)
        checkpoint(writer._db)  # type: ignore[arg-type]
    finally:
        writer.close()


def test_a_look_at_the_store_reads_what_a_sync_wrote_after_it_began(store: str) -> None:
    look = LocalContext(store, read_only=True)
    try:
        assert len(look.image_ids()) == 300
        first = look.find_similar(image_id="old0000", threshold=50, max_count=3)
        assert [r.image_id for r in first][:1] == ["old0000"]  # the index is loaded now
        sync_writes(store)
        ids = look.image_ids()
        assert len(ids) == 450 and "new0299" in ids and "old0000" not in ids
        for image_id in ids:  # every row whole: none "malformed", none of another state
            held = look.get_features(image_id)
            want = (NEW | DESCRIPTORS)[image_id]
            assert held.features == want.tobytes(), image_id
        with pytest.raises(NotFound):
            look.get_features("old0000")
        # The index loaded before the sync follows it: a new image is found, a
        # deleted one is never returned.
        found = look.find_similar(image_id="new0007", threshold=50, max_count=3)
        assert [r.image_id for r in found][:1] == ["new0007"]
        query = DESCRIPTORS["old0000"]
        assert all(r.image_id != "old0000" for r in look.similar(query, 0, 10))
    finally:
        look.close()
    assert sorted(os.listdir(os.path.dirname(store))) == ["ctx.search", "ctx.search.index"]


def writes_once(writer: sqlite3.Connection, fired: list[bool]) -> Callable[[], int]:
    """A progress handler that, the first time SQLite calls it in a look's statement,
    makes a sync's change to the file: 200 of 300 images deleted, checkpointed."""

    def write_in_the_middle() -> int:
        if not fired:
            fired.append(True)
            writer.execute("DELETE FROM features WHERE image_id >= 'old0100'")
            checkpoint(writer)
        return 0

    return write_in_the_middle


def test_a_statement_torn_by_a_checkpoint_in_its_middle_is_read_again(store: str) -> None:
    look = LookDb(store, 10000)
    writer = sqlite3.connect(store, isolation_level=None)
    fired: list[bool] = []
    write_in_the_middle = writes_once(writer, fired)

    try:
        assert look._main is not None
        look._main.conn.set_progress_handler(write_in_the_middle, 200)
        rows = look.execute("SELECT image_id, length(descriptors) FROM features").fetchall()
        assert fired  # the file changed while the statement ran
        assert sorted(r[0] for r in rows) == sorted(DESCRIPTORS)[:100]
        assert {r[1] for r in rows} == {400 * 61}
    finally:
        writer.close()
        look.close()


def test_a_look_sees_what_a_sync_committed_before_any_checkpoint(store: str) -> None:
    """The sync's rows are only in its -wal: the look, opened before it, reads them
    too (through SQLite's locks, once a -wal is there)."""
    look = LookDb(store, 10000)
    writer = sqlite3.connect(store, isolation_level=None)
    try:
        assert look.execute("SELECT COUNT(*) FROM features").fetchall() == [(300,)]
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute("DELETE FROM features WHERE image_id >= 'old0100'")
        assert os.path.getsize(store + "-wal") > 0  # committed, not checkpointed
        assert look.execute("SELECT COUNT(*) FROM features").fetchall() == [(100,)]
    finally:
        writer.close()
        look.close()


def test_a_look_whose_store_is_removed_or_replaced_reads_on(store: str, tmp_path: Path) -> None:
    """Removed, or replaced by another store: the look reads on from the file it holds
    open (one store, one state, whole), never half of one store and half of another;
    nothing is created at the path."""
    look = LocalContext(store, read_only=True)
    try:
        assert len(look.image_ids()) == 300
        os.rename(store, store + ".gone")
        assert len(look.image_ids()) == 300
        assert look.get_features("old0299").features_count == 400
        assert not os.path.exists(store)
        other = str(tmp_path / "other.search")
        ctx = LocalContext(other)
        ctx.load_descriptors(list(NEW.items())[:5])
        ctx.close()
        os.replace(other, store)
        assert len(look.image_ids()) == 300
        found = look.find_similar(image_id="old0001", threshold=50, max_count=3)
        assert [r.image_id for r in found][:1] == ["old0001"]
    finally:
        look.close()
    look2 = LookDb(store, 10000)  # the other store, now at the path
    try:
        os.replace(store + ".gone", store)  # replaced again, under this look
        assert look2.execute("SELECT COUNT(*) FROM features").fetchall() == [(5,)]
        os.rename(store, store + ".gone")
        assert look2.execute("SELECT COUNT(*) FROM features").fetchall() == [(5,)]
        assert not os.path.exists(store)  # an immutable open never makes the file
    finally:
        look2.close()


def test_a_store_written_and_then_replaced_under_a_look_is_said_not_read(
    store: str, tmp_path: Path
) -> None:
    """The file the look holds was written (its pages are no longer what the look
    cached) and the path is another file now: neither can be read as one state."""
    look = LookDb(store, 10000)
    try:
        assert look.execute("SELECT COUNT(*) FROM features").fetchall() == [(300,)]
        sync_writes(store)  # written, checkpointed
        other = str(tmp_path / "other.search")
        ctx = LocalContext(other)
        ctx.load_descriptors(list(NEW.items())[:5])
        ctx.close()
        os.replace(other, store)
        with pytest.raises(sqlite3.OperationalError, match="replaced by another file while"):
            look.execute("SELECT COUNT(*) FROM features")
    finally:
        look.close()


def test_looks_beside_a_first_sync_that_is_making_its_files_see_empty_ones(
    tmp_path: Path,
) -> None:
    """A first sync makes each file, then its tables one by one: a look in between
    reads an empty ledger, store and backups, not "no such table" or "no featsync
    ledger"."""
    from featsync.ledger import SqlLedger
    from featsync.schema import metadata

    half = tmp_path / "ledger.db"
    engine = sa.create_engine(f"sqlite:///{half}")
    metadata.create_all(engine)  # the tables, and no schema version yet
    engine.dispose()
    Path(tmp_path / "empty.db").write_bytes(b"")
    for made in (half, tmp_path / "empty.db"):
        ledger = SqlLedger(f"sqlite:///{made}", read_only=True)
        try:
            assert ledger.load() == {}
        finally:
            ledger.close()
    store = tmp_path / "ctx.search"
    db = sqlite3.connect(store)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.close()
    look = LocalContext(str(store), read_only=True)
    try:
        assert look.image_ids() == [] and "(none yet)" in look.identity()
    finally:
        look.close()
    (tmp_path / "backups").mkdir()
    Path(tmp_path / "backups" / "features.db").write_bytes(b"")
    backups = BackupStore(str(tmp_path / "backups"), read_only=True)
    try:
        assert backups.totals()["backups"] == 0 and list(backups.per_image()) == []
    finally:
        backups.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "backups",
        "ctx.search",
        "empty.db",
        "ledger.db",
    ]


def held(image_id: str, n: int) -> ImageFeatures:
    data = bytes(rng.integers(0, 256, n * 61, dtype=np.uint8))
    return ImageFeatures(image_id, n, 488, data)


def fill_backups(folder: str, prefix: str, count: int) -> None:
    store = BackupStore(folder)
    try:
        for i in range(count):
            store.put(f"{prefix}{i:04d}", 1, "d" * 64, "update", held(f"{prefix}{i:04d}", 300), 1.0)
        with store.tx() as db:
            checkpoint(db)
    finally:
        store.close()


def test_a_look_at_the_backups_reads_what_a_sync_kept_after_it_began(tmp_path: Path) -> None:
    folder = str(tmp_path / "backups")
    fill_backups(folder, "old", 200)
    assert not os.path.exists(os.path.join(folder, "features.db-wal"))
    look = BackupStore(folder, read_only=True)
    try:
        assert look.totals()["backups"] == 200
        fill_backups(folder, "new", 200)
        assert look.totals()["backups"] == 400
        [record] = look.records("new0150")
        features = look.features(record.id)
        assert features is not None and features.features_count == 300
        assert sum(1 for _ in look.per_image()) == 400
        with pytest.raises(Fatal, match="open only to look"):
            look.put("x", 1, None, "update", held("x", 1), 1.0)
    finally:
        look.close()


def test_an_export_and_a_listing_that_a_sync_writes_under_give_each_record_once_whole(
    tmp_path: Path,
) -> None:
    """Read a page at a time: a sync that keeps 300 more records between two pages
    (and checkpoints them into the file) neither tears a page nor repeats a record;
    every record kept throughout comes once."""
    folder = str(tmp_path / "backups")
    fill_backups(folder, "old", 300)
    look = BackupStore(folder, read_only=True)
    try:
        rows = look.stream()
        first, _ = next(rows)
        assert first.image_id == "old0000"
        fill_backups(folder, "new", 300)  # under the export, between its pages
        rest = list(rows)
        assert all(len(f.features) == 300 * 61 == f.features_count * 61 for _, f in rest)
        ids = [first.image_id] + [b.image_id for b, _ in rest]
        assert len(ids) == len(set(ids)) and set(ids) >= {f"old{i:04d}" for i in range(300)}
        listed = [p["image_id"] for p in look.per_image()]
        assert len(listed) == 600 == len(set(listed))
    finally:
        look.close()
