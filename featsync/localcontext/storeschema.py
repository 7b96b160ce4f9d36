"""The embedded context's store: its tables, and the upgrade of an older one in place.

A row's slot is new on every add and update and never reused (AUTOINCREMENT), and its
digest is a hash of its descriptors: the search index files descriptors by slot and
tells, by the digest, that a slot is still the row it filed (a store put back from a
copy numbers its new rows again from where the copy stood) and which rows are exact
twins (featsync.localcontext.searchindex).
"""

from __future__ import annotations

import hashlib
import sqlite3
from typing import Any

from featsync.sqlitefiles import LookDb

FEATURES = """
CREATE TABLE IF NOT EXISTS features (
    slot INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id TEXT NOT NULL UNIQUE,
    count INTEGER NOT NULL,
    descriptors BLOB NOT NULL,
    updated_at REAL NOT NULL,
    digest BLOB
);
"""
SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tags (name TEXT PRIMARY KEY, descriptors BLOB NOT NULL);
"""
    + FEATURES
)
# 1: no slots (image_id was the key); 2: slots and digests. An older store is
# upgraded in place on open (a store of 2 made before digests gets them then).
SCHEMA_VERSION = 2
DIGEST_BYTES = 16
UPGRADE_WAIT_MS = 600_000  # another process upgrading a big store: wait for it


def digest(blob: bytes) -> bytes:
    """The digest of a row's descriptors, as stored."""
    return hashlib.blake2b(blob, digest_size=DIGEST_BYTES).digest()


def columns(db: sqlite3.Connection | LookDb) -> list[str]:
    return [str(r[1]) for r in db.execute("PRAGMA table_info(features)")]


def upgrade(db: sqlite3.Connection, busy_timeout_ms: int) -> None:
    """Bring the features table to schema 2, once: the check is made again inside the
    write transaction, so processes opening an old store together upgrade it once
    (the others wait for it, then find nothing to do)."""
    if {"slot", "digest"} <= set(columns(db)):
        return
    db.execute(f"PRAGMA busy_timeout = {UPGRADE_WAIT_MS}")
    db.execute("BEGIN IMMEDIATE")
    try:
        have = set(columns(db))
        if "slot" not in have:
            db.execute("ALTER TABLE features RENAME TO features_v1")
            db.execute(FEATURES)
            db.execute(
                "INSERT INTO features (image_id, count, descriptors, updated_at) "
                "SELECT image_id, count, descriptors, updated_at FROM features_v1 "
                "ORDER BY image_id"
            )
            db.execute("DROP TABLE features_v1")
        elif "digest" not in have:
            db.execute("ALTER TABLE features ADD COLUMN digest BLOB")
        _fill_digests(db)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    finally:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")


def _fill_digests(db: sqlite3.Connection) -> None:
    last = 0
    while True:
        rows = db.execute(
            "SELECT slot, descriptors FROM features WHERE slot > ? AND digest IS NULL "
            "ORDER BY slot LIMIT 500",
            (last,),
        ).fetchall()
        if not rows:
            return
        db.executemany(
            "UPDATE features SET digest = ? WHERE slot = ?",
            [(digest(as_bytes(blob)), slot) for slot, blob in rows],
        )
        last = int(rows[-1][0])


def as_bytes(blob: Any) -> bytes:
    """A descriptors value as bytes: a damaged row (a value of another type than the
    blob featsync wrote) reads as no descriptors rather than failing every search."""
    if isinstance(blob, bytes | bytearray | memoryview):
        return bytes(blob)
    return b""
