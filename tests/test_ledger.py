"""The ledger on a real SQLite file: WAL, schema version, outcomes and history."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from featsync import quickcache
from featsync.errors import Fatal
from featsync.ledger import SqlLedger
from featsync.model import Action, Kind, LocalFile, Outcome, State


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


def outcome(
    kind: Kind,
    done: Kind | None,
    version: int = 0,
    error: str | None = None,
    digest: str | None = "h1",
) -> Outcome:
    f = LocalFile("a.jpg", "a.jpg", 3, 4, 5, digest or "h1")
    return Outcome(
        Action(kind, "a.jpg", f, version),
        done,
        digest,
        3,
        4,
        5,
        10 if done else None,
        error,
        "rejected" if error else None,
        1.0,
    )


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    ledger = SqlLedger(url(tmp_path))
    try:
        with ledger.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
    finally:
        ledger.close()


def test_a_newer_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    SqlLedger(url(tmp_path)).close()
    db = sqlite3.connect(tmp_path / "ledger.db")
    db.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(Fatal, match="schema version 7, newer than this featsync understands"):
        SqlLedger(url(tmp_path))


def test_a_file_that_is_not_a_database_is_a_fatal_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "ledger.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(Fatal, match=r"ledger\.db"):
        SqlLedger(url(tmp_path))


def test_outcomes_move_the_version_and_write_history(tmp_path: Path) -> None:
    ledger = SqlLedger(url(tmp_path))
    try:
        ledger.record(outcome(Kind.ADD, None, error="bad pixels"), 100.0, 130.0)
        row = ledger.load()["a.jpg"]
        assert (row.state, row.version, row.attempts, row.remote) == (State.FAILED, 0, 1, False)
        assert row.next_attempt_at == 130.0 and row.digest == "h1"
        assert ledger.failures()[0]["error"] == "bad pixels"
        again = outcome(Kind.ADD, None, error="bad pixels")
        again = again._replace(action=again.action._replace(attempts=1))
        ledger.record(again, 140.0, 290.0)
        assert ledger.load()["a.jpg"].attempts == 2
        # a transient error is no fault of the image: no try counted, no wait
        flaky = again._replace(error="503", error_kind="transient")
        flaky = flaky._replace(action=flaky.action._replace(attempts=2))
        ledger.record(flaky, 150.0, None)
        row = ledger.load()["a.jpg"]
        assert (row.attempts, row.next_attempt_at) == (2, None)
        assert ledger.failed_due(150.0) == (["a.jpg"], None)

        ledger.record(outcome(Kind.ADD, Kind.ADD), 200.0, None)
        ledger.record(outcome(Kind.UPDATE, Kind.UPDATE, version=1, digest="h2"), 300.0, None)
        ledger.record(outcome(Kind.DELETE, Kind.DELETE, version=2), 400.0, None)
        row = ledger.load()["a.jpg"]
        assert (row.state, row.version, row.remote, row.attempts) == (State.DELETED, 3, False, 0)
        hist = ledger.history_of("a.jpg")
        assert [(h["action"], h["version"], h["digest"]) for h in hist] == [
            ("add", 1, "h1"),
            ("update", 2, "h2"),
            ("delete", 3, "h2"),  # the content that went
        ]
        assert ledger.failures() == []
        assert ledger.counts() == {"synced": 0, "failed": 0, "deleted": 1}
    finally:
        ledger.close()


def test_the_root_device_is_remembered(tmp_path: Path) -> None:
    ledger = SqlLedger(url(tmp_path))
    try:
        assert ledger.device() is None
        ledger.set_device(2049)
        ledger.set_device(2050)
        assert ledger.device() == 2050
    finally:
        ledger.close()


def test_a_cycle_loads_quick_keys_and_only_the_rows_it_needs(tmp_path: Path) -> None:
    ledger = SqlLedger(url(tmp_path))
    try:
        for n, (image_id, mtime) in enumerate([("a.jpg", 4), ("fresh.jpg", 0), ("b.jpg", 9)]):
            f = LocalFile(image_id, image_id, 3, mtime, n, "h")
            out = Outcome(
                Action(Kind.ADD, image_id, f, 0), Kind.ADD, "h", 3, mtime, n, 1, None, None, 1
            )
            ledger.record(out, 100.0, None)
        ledger.record(outcome(Kind.DELETE, Kind.DELETE, version=1), 110.0, None)  # a.jpg
        failed = Outcome(
            Action(Kind.ADD, "bad.jpg", None, 0), None, None, 0, 0, 0, None, "x", "rejected", 1
        )
        ledger.record(failed, 120.0, 150.0)
        # a.jpg is deleted; an mtime of 0 (too fresh to trust) comes back as None
        assert ledger.quick_keys() == {("fresh.jpg", 3, None, 1), ("b.jpg", 3, 9, 2)}
        assert set(ledger.rows_for([])) == {"bad.jpg"}  # failed rows come along always
        assert set(ledger.rows_for(["a.jpg", "nope.jpg"])) == {"a.jpg", "bad.jpg"}
        many = ledger.rows_for([f"x{n}.jpg" for n in range(1200)] + ["b.jpg"])  # several chunks
        assert set(many) == {"b.jpg", "bad.jpg"} and many["b.jpg"].mtime_ns == 9
    finally:
        ledger.close()


def test_quick_keys_encoding_round_trips_and_refuses_damage() -> None:
    keys = {
        ("a.jpg", 3, 4, 5),
        ("caf\u00e9/\u65e5\u672c.png", 2**40, None, 2**62),
        ("b c", 0, -7, 1),
    }
    data = quickcache.encode(sorted(keys, key=str))
    assert data is not None and quickcache.decode(data) == keys
    assert quickcache.decode(quickcache.encode([]) or b"") == set()
    assert quickcache.decode(data[:-1]) is None
    assert quickcache.decode(b"XXXX" + data[4:]) is None
    assert quickcache.decode(b"") is None
    assert quickcache.encode([("big.jpg", 2**64, 1, 1)]) is None  # beyond int64: no cache


def test_the_quick_cache_never_outlives_a_change_to_the_rows(tmp_path: Path) -> None:
    ledger = SqlLedger(url(tmp_path))
    try:
        f = LocalFile("a.jpg", "a.jpg", 3, 4, 5, "h")
        ledger.record(
            Outcome(Action(Kind.ADD, "a.jpg", f, 0), Kind.ADD, "h", 3, 4, 5, 1, None, None, 1),
            1.0,
            None,
        )
        assert ledger.quick_keys() == {("a.jpg", 3, 4, 5)}  # from the rows; cache written
        db = sqlite3.connect(tmp_path / "ledger.db")
        assert db.execute("SELECT count(*) FROM quick_cache").fetchone() == (1,)
        assert ledger.quick_keys() == {("a.jpg", 3, 4, 5)}  # from the cache
        # Another writer (a second process, a person with a SQL shell) changes a row:
        db.execute("UPDATE images SET mtime_ns = 9 WHERE image_id = 'a.jpg'")
        db.commit()
        assert ledger.quick_keys() == {("a.jpg", 3, 9, 5)}
        db.execute("DELETE FROM images")
        db.commit()
        assert ledger.quick_keys() == set()
        db.close()
    finally:
        ledger.close()


def test_scope_rows_waits_and_retries(tmp_path: Path) -> None:
    ledger = SqlLedger(url(tmp_path))
    try:
        for image_id in ["a/1.jpg", "a/2.jpg", "a0.jpg", "a.jpg", "ab/3.jpg", "b/a/4.jpg"]:
            o = outcome(Kind.ADD, Kind.ADD)
            o = o._replace(action=o.action._replace(image_id=image_id))
            ledger.record(o, 1.0, None)
        # "a/" holds a/1 and a/2 and nothing that only starts with "a"
        assert sorted(ledger.rows_in_scope([], ["a/"])) == ["a/1.jpg", "a/2.jpg"]
        assert sorted(ledger.rows_in_scope(["a.jpg", "zz.jpg"], ["b/"])) == ["a.jpg", "b/a/4.jpg"]
        assert len(ledger.rows_in_scope([], [""])) == 6
        assert ledger.held_count() == 6

        for image_id, wait in [("a/1.jpg", 100.0), ("a/2.jpg", 500.0)]:
            o = outcome(Kind.UPDATE, None, error="bad pixels")
            ledger.record(o._replace(action=o.action._replace(image_id=image_id)), 10.0, wait)
        assert ledger.failed_due(50.0) == ([], 100.0)
        assert ledger.failed_due(100.0) == (["a/1.jpg"], 500.0)
        assert ledger.retry(["a/2.jpg", "a.jpg"], 60.0) == ["a/2.jpg"]  # a.jpg is not failed
        assert ledger.failed_due(60.0) == (["a/2.jpg"], 100.0)
        assert ledger.retry(None, 61.0) == ["a/1.jpg", "a/2.jpg"]
        assert ledger.failed_due(61.0) == (["a/1.jpg", "a/2.jpg"], None)
    finally:
        ledger.close()


def test_an_unreadable_file_waits_longer_each_time(tmp_path: Path) -> None:
    ledger = SqlLedger(url(tmp_path))
    try:
        for now in (100.0, 200.0, 300.0):
            ledger.record_unreadable([("x.jpg", "Permission denied")], now, lambda n: 30.0 * n)
        row = ledger.load()["x.jpg"]
        assert (row.state, row.attempts, row.next_attempt_at) == (State.FAILED, 3, 390.0)
        assert ledger.failed_due(389.0) == ([], 390.0)
        assert ledger.failures()[0]["error"] == "Permission denied"
    finally:
        ledger.close()
