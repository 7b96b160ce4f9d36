"""The ledger's tables (SQLAlchemy Core), apart from the code that reads and writes them.

``images`` has one row per image ID, ``history`` one per applied change, ``cycles``
one per cycle, ``meta`` holds the schema version, the root's device id, the
generation the quick cache is checked against, and the retry request counter.
"""

from __future__ import annotations

import sqlalchemy as sa

# 2: images.relpath, failed_action, withheld_at; indexes on history (action, at) and
# images (digest). 3: cycles.interrupted
SCHEMA_VERSION = 3

metadata = sa.MetaData()

images = sa.Table(
    "images",
    metadata,
    sa.Column("image_id", sa.Text, primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("mtime_ns", sa.BigInteger, nullable=False),
    sa.Column("inode", sa.BigInteger, nullable=False),
    sa.Column("digest", sa.Text, nullable=False, index=True),  # the delete guard's moves
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("state", sa.Text, nullable=False, index=True),
    sa.Column("remote", sa.Boolean, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float),
    sa.Column("features_count", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("error_kind", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("synced_at", sa.Float),
    # The file's path relative to the root as found on disk (NFD names stay NFD): the
    # daemon looks at a failed image again by this path, never by one rebuilt from its ID.
    sa.Column("relpath", sa.Text),
    sa.Column("failed_action", sa.Text),  # the kind of the action that failed last
    # Set while the image's delete is withheld by the delete guard: it stays withheld,
    # cycle after cycle, until the file comes back or an operator confirms deletes.
    sa.Column("withheld_at", sa.Float),
)

# Columns added after schema version 1, added in place to an older ledger.
ADDED_COLUMNS = (
    ("images", "relpath", "TEXT"),
    ("images", "failed_action", "TEXT"),
    ("images", "withheld_at", "FLOAT"),
    ("cycles", "interrupted", "BOOLEAN"),
)

history = sa.Table(
    "history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("image_id", sa.Text, nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("digest", sa.Text),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("features_count", sa.Integer),
    sa.Column("at", sa.Float, nullable=False),
    sa.Index("history_action_at", "action", "at"),  # deletes in the last hour (delete guard)
)

cycles = sa.Table(
    "cycles",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=False),
    sa.Column("complete", sa.Boolean, nullable=False),
    sa.Column("added", sa.Integer, nullable=False),
    sa.Column("updated", sa.Integer, nullable=False),
    sa.Column("deleted", sa.Integer, nullable=False),
    sa.Column("unchanged", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    sa.Column("withheld_deletes", sa.Integer, nullable=False),
    sa.Column("duration_ms", sa.Float, nullable=False),
    # a stop (SIGINT, SIGTERM) was asked for during the cycle; NULL: recorded before
    # featsync kept this
    sa.Column("interrupted", sa.Boolean),
)

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# The quick-check keys of the synced images, encoded (featsync.quickcache), valid while
# meta's "generation" equals the one they were made at. SQLite only: triggers move the
# generation in the same transaction as any change to `images`, whichever code (or
# person with a SQL shell) makes it, so a stale cache cannot be read.
quick_cache = sa.Table(
    "quick_cache",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

BUMP = "BEGIN UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'; END"
GENERATION_TRIGGERS = (
    "CREATE TRIGGER IF NOT EXISTS images_insert_moves_generation AFTER INSERT ON images " + BUMP,
    "CREATE TRIGGER IF NOT EXISTS images_update_moves_generation AFTER UPDATE ON images " + BUMP,
    "CREATE TRIGGER IF NOT EXISTS images_delete_moves_generation AFTER DELETE ON images " + BUMP,
)

ROW_COLUMNS = (
    images.c.image_id,
    images.c.size,
    images.c.mtime_ns,
    images.c.inode,
    images.c.digest,
    images.c.version,
    images.c.state,
    images.c.remote,
    images.c.attempts,
    images.c.next_attempt_at,
    images.c.failed_action,
    images.c.withheld_at,
)
