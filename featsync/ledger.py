"""The ledger: what the search context has acknowledged, image by image (SQLAlchemy Core).

Tables: ``images`` (one row per image ID), ``history`` (one row per applied change),
``cycles`` (one row per reconcile cycle) and ``meta`` (schema version, the root's
device id). SQLite runs in WAL mode with the busy timeout set first; the engine has
one writer (the thread that applies a plan) and short write transactions, one per
outcome, so a crash loses at most the outcome of the calls still in flight.

Core rows, not ORM objects: a rescan loads the whole ledger, and at 100,000 images
ORM identity-mapped objects cost about five times as much.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from featsync import ledger_open, quickcache
from featsync.errors import Fatal
from featsync.ledger_memory import LedgerMemory
from featsync.ledger_open import BUSY_TIMEOUT_MS
from featsync.ledger_reports import LedgerReports
from featsync.ledger_retries import LedgerRetries
from featsync.ledger_review import LedgerReview
from featsync.ledger_writes import LedgerWrites
from featsync.model import LedgerRow, QuickKey, State
from featsync.schema import (
    GENERATION_TRIGGERS,
    ROW_COLUMNS,
    SCHEMA_VERSION,
    images,
    meta,
    metadata,
    quick_cache,
)
from featsync.sqlitefiles import (
    waits_when_locked,
)

_IN_CHUNK = 500  # image IDs per IN (...) query, well below any database's parameter limit


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # busy_timeout first: switching to WAL itself needs the lock.
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.close()


class SqlLedger(LedgerMemory, LedgerReports, LedgerReview, LedgerRetries, LedgerWrites):
    """The ledger over any SQLAlchemy URL; SQLite (WAL) by default."""

    engine: Engine

    def __init__(self, url: str, read_only: bool = False) -> None:
        self.url = url
        if read_only:
            engine = ledger_open.read_only(url, self._where())
            if engine is not None:
                self.engine = engine
                self.caches_quick_keys = False  # a look never writes the cache
                self._compile()
                return
        try:
            self.engine = ledger_open.create_engine(url)
            self.caches_quick_keys = self.engine.dialect.name == "sqlite"
            if self.engine.dialect.name == "sqlite":
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            with self.engine.begin() as conn:
                metadata.create_all(conn)
                found = conn.execute(
                    sa.select(meta.c.value).where(meta.c.key == "schema_version")
                ).scalar()
                if found is None:
                    conn.execute(
                        meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION))
                    )
                elif int(found) > SCHEMA_VERSION:
                    raise Fatal(
                        f"ledger {self._where()} has schema version {found}, newer than this "
                        f"featsync understands ({SCHEMA_VERSION}); upgrade featsync"
                    )
                elif int(found) < SCHEMA_VERSION:
                    ledger_open.upgrade(conn)
                # added within version 2: a ledger made before it gets it here
                conn.exec_driver_sql(
                    "CREATE INDEX IF NOT EXISTS ix_images_digest ON images (digest)"
                )
                if self.caches_quick_keys:
                    if self._generation(conn) is None:
                        conn.execute(meta.insert().values(key="generation", value="0"))
                    for ddl in GENERATION_TRIGGERS:
                        conn.exec_driver_sql(ddl)
        except sa.exc.SQLAlchemyError as exc:
            raise Fatal(f"cannot open ledger {self._where()}: {_reason(exc)}") from exc
        self._compile()

    def _compile(self) -> None:
        # The hot queries, compiled once for this database to plain SQL (no parameters)
        # that _fetch runs on the DB-API cursor.
        every_row = sa.select(*ROW_COLUMNS)
        self._rows_sql = self._sql(every_row)
        self._failed_sql = self._sql(every_row.where(images.c.state == State.FAILED.value))
        self._quick_sql = self._sql(
            sa.select(
                images.c.image_id,
                images.c.size,
                sa.func.nullif(images.c.mtime_ns, 0),
                images.c.inode,
            ).where(images.c.state == State.SYNCED.value)
        )
        self._cached_sql = self._sql(
            sa.select(quick_cache.c.data).where(
                quick_cache.c.id == 1,
                quick_cache.c.generation
                == sa.select(sa.cast(meta.c.value, sa.Integer))
                .where(meta.c.key == "generation")
                .scalar_subquery(),
            )
        )

    def _sql(self, stmt: sa.Select[Any]) -> str:
        return str(
            stmt.compile(dialect=self.engine.dialect, compile_kwargs={"literal_binds": True})
        )

    def _where(self) -> str:
        return ledger_open.shown_url(self.url)

    def where(self) -> str:
        """The ledger's URL for a message (any password hidden)."""
        return self._where()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise Fatal(f"ledger {self._where()}: {_reason(exc)}") from exc

    def close(self) -> None:
        self.engine.dispose()

    # -- reads ---------------------------------------------------------------

    def load(self) -> dict[str, LedgerRow]:
        """Every image row (status, tests and tools; a cycle loads less, see below)."""
        return self._rows(self._rows_sql)

    @waits_when_locked
    def quick_keys(self, write_cache: bool = True) -> set[QuickKey]:
        """(image ID, size, mtime_ns, inode) of every synced image.

        This is all a no-change rescan needs from the ledger. It comes from the quick
        cache while that is current (one row; about half the cost), else from one bulk
        query of four columns as plain tuples straight from the DB-API cursor (per-file
        queries are 3-19x slower, SQLAlchemy Row objects cost more than the query at
        100,000 rows), and then the cache is written anew (unless `write_cache` is
        false: a dry run writes nothing). An mtime of 0 (recorded while the file was
        too fresh to trust) comes back as None, which no stat equals.
        """
        if not self.caches_quick_keys:
            return set(self._fetch(self._quick_sql))
        cached = self._fetch(self._cached_sql)
        if cached:
            keys = quickcache.decode(cached[0][0])
            if keys is not None:
                return keys
        if not write_cache:
            return set(self._fetch(self._quick_sql))
        with self._tx() as conn:
            before = self._generation(conn)
        rows = self._fetch(self._quick_sql)
        data = quickcache.encode(rows)
        with self._tx() as conn:
            # Only if nothing changed meanwhile: then `rows` are the rows of `before`.
            if data is not None and before is not None and self._generation(conn) == before:
                conn.execute(quick_cache.delete())
                conn.execute(quick_cache.insert().values(id=1, generation=before, data=data))
        return set(rows)

    @staticmethod
    def _generation(conn: Connection) -> int | None:
        value = conn.execute(sa.select(meta.c.value).where(meta.c.key == "generation")).scalar()
        return None if value is None else int(value)

    @waits_when_locked
    def rows_for(self, image_ids: Iterable[str]) -> dict[str, LedgerRow]:
        """The rows of these image IDs (those that have one), plus every failed row."""
        rows = self._rows(self._failed_sql)
        ids = sorted(set(image_ids).difference(rows))
        make = LedgerRow._make
        with self._tx() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                found = conn.execute(sa.select(*ROW_COLUMNS).where(images.c.image_id.in_(chunk)))
                rows.update((r[0], make(r)) for r in found)
        return rows

    @waits_when_locked
    def rows_in_scope(
        self, image_ids: Iterable[str], prefixes: Iterable[str]
    ) -> dict[str, LedgerRow]:
        """The rows of these image IDs and of every ID under these prefixes (each ends
        with "/"; "" is everything): exactly the rows a targeted cycle may judge."""
        ids = sorted(set(image_ids))
        make = LedgerRow._make
        rows: dict[str, LedgerRow] = {}
        with self._tx() as conn:
            for prefix in sorted(set(prefixes)):
                q = sa.select(*ROW_COLUMNS)
                if prefix:
                    # a range on the primary key: "a/" <= id < "a0" ("0" follows "/")
                    q = q.where(
                        images.c.image_id >= prefix,
                        images.c.image_id < prefix[:-1] + chr(ord(prefix[-1]) + 1),
                    )
                rows.update((r[0], make(r)) for r in conn.execute(q))
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                found = conn.execute(sa.select(*ROW_COLUMNS).where(images.c.image_id.in_(chunk)))
                rows.update((r[0], make(r)) for r in found)
        return rows

    @waits_when_locked
    def held_count(self) -> int:
        """How many image IDs the context holds features for (by the ledger)."""
        with self._tx() as conn:
            n = conn.execute(
                sa.select(sa.func.count()).select_from(images).where(images.c.remote.is_(True))
            ).scalar()
        return int(n or 0)

    def _rows(self, sql: str) -> dict[str, LedgerRow]:
        make = LedgerRow._make
        return {r[0]: make(r) for r in self._fetch(sql)}

    @waits_when_locked
    def _fetch(self, sql: str) -> list[Any]:
        """Plain tuples from the DB-API cursor, for a query without parameters."""
        with self._tx() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(sql)
                rows = list(cursor.fetchall())
            except self.engine.dialect.loaded_dbapi.Error as exc:
                raise Fatal(f"ledger {self._where()}: {type(exc).__name__}: {exc}") from exc
            finally:
                cursor.close()
        return rows

    @waits_when_locked
    def _meta(self, key: str) -> str | None:
        with self._tx() as conn:
            value: str | None = conn.execute(
                sa.select(meta.c.value).where(meta.c.key == key)
            ).scalar()
            return value

    @waits_when_locked
    def _set_meta(self, key: str, value: str) -> None:
        with self._tx() as conn:
            conn.execute(meta.delete().where(meta.c.key == key))
            conn.execute(meta.insert().values(key=key, value=value))

    def schema_version(self) -> int:
        return int(self._meta("schema_version") or 0)

    def device(self) -> int | None:
        value = self._meta("root_device")
        return int(value) if value is not None else None

    def set_device(self, device: int) -> None:
        self._set_meta("root_device", str(device))


_reason = ledger_open.reason
