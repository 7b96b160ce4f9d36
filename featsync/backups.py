"""Backups: the features the context held, kept before each update and delete, and
(optionally) a copy of every image file sent, kept by content.

``[backup] path`` is a folder: ``features.db`` (SQLite) has one row per record
kept, its features compressed; ``images/ab/abcdef…`` holds image copies named by
their SHA-256, one file per distinct content however many IDs or versions share it.

A backup is the record the context answered GET with just before a change (an
update, a delete, an add that found features there), labelled with the ledger's
version and content hash of what the context held by the ledger. Rows are never
overwritten: the same record under the same label is not kept twice, and any other
is kept beside the rest. So a retried update whose first try
did land adds a second row (the new features) and leaves the first (the old ones)
as it was; a change made by hand between two syncs, or a ledger lost and begun
again, adds rows rather than being taken for a version already kept. Which backup
is "version v" is decided when reading (`match`): the earliest row with that
version and that version's content hash.

Workers take backups (each before its own call), so the store has its own connection
and lock, apart from the ledger: it is never the ledger's one writer that waits on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from featsync.errors import Fatal
from featsync.model import ImageFeatures
from featsync.sqlitefiles import LookDb

SCHEMA_VERSION = 2  # 1: a development build's layout (one record per version)
_CHUNK = 1 << 20  # bytes per read when an image file is copied

_DDL = (
    """CREATE TABLE IF NOT EXISTS backups (
        id INTEGER PRIMARY KEY,
        image_id TEXT NOT NULL,
        version INTEGER NOT NULL,
        digest TEXT,
        reason TEXT NOT NULL,
        taken_at REAL NOT NULL,
        features_count INTEGER NOT NULL,
        feature_length_in_bits INTEGER NOT NULL,
        size INTEGER NOT NULL,
        features_hash TEXT NOT NULL,
        data BLOB NOT NULL,
        UNIQUE (image_id, version, digest, features_hash)
    )""",
    "CREATE INDEX IF NOT EXISTS backups_taken_at ON backups (taken_at)",
    "CREATE INDEX IF NOT EXISTS backups_image ON backups (image_id, taken_at)",
    "CREATE INDEX IF NOT EXISTS backups_digest ON backups (digest)",
    """CREATE TABLE IF NOT EXISTS kept_images (
        digest TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        kept_at REAL NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

_COLUMNS = "id, image_id, version, digest, reason, taken_at, features_count, size"


@dataclass(frozen=True, slots=True)
class Backup:
    """One kept record (without its features: see `BackupStore.features`)."""

    id: int
    image_id: str
    version: int
    digest: str | None
    reason: str
    taken_at: float
    features_count: int
    size: int  # compressed bytes

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "image_id": self.image_id,
            "version": self.version,
            "hash": self.digest,
            "reason": self.reason,
            "taken_at": self.taken_at,
            "features_count": self.features_count,
            "size": self.size,
        }


class BackupStore:
    """The backups folder. `read_only`: look only (a missing folder is an empty store)."""

    def __init__(self, folder: str, read_only: bool = False) -> None:
        self.folder = folder
        self.read_only = read_only
        self.db_path = os.path.join(folder, "features.db")
        self.images_dir = os.path.join(folder, "images")
        self._lock = threading.Lock()
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise Fatal(f"backups folder {folder!r} is not a directory")
        self._look: LookDb | None = None  # a look at a store on disk: its reads
        try:
            if read_only and os.path.exists(self.db_path):
                look = LookDb(self.db_path, 10000)  # never torn by a sync's writes
                made = look.tables()
                versioned = "meta" in made and look.execute("SELECT 1 FROM meta").fetchall()
                if versioned or {"backups", "kept_images", "meta"} <= made:
                    self._look = look  # (a damaged store's reads say what is wrong)
                    return
                look.close()  # one a first backup is making (tables, then version): empty
            if read_only:  # no store yet: an empty one
                self._db = sqlite3.connect(":memory:", check_same_thread=False)
                self._create()
                return
            os.makedirs(folder, exist_ok=True)
            self._db = sqlite3.connect(self.db_path, check_same_thread=False, timeout=10.0)
            self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # a new file: prunes free space
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._create()
        except (OSError, sqlite3.Error) as exc:
            raise Fatal(f"cannot open backups {self.db_path!r}: {exc}") from exc

    def _create(self) -> None:
        with self._db:
            for ddl in _DDL:
                self._db.execute(ddl)
            found = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'")
            row = found.fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise Fatal(
                    f"backups {self.db_path!r} have schema version {row[0]}, newer than this "
                    f"featsync understands ({SCHEMA_VERSION}); upgrade featsync"
                )
            elif int(row[0]) < SCHEMA_VERSION:
                raise Fatal(
                    f"backups {self.db_path!r} have schema version {row[0]}, the layout of "
                    "a development build of featsync: move the folder aside (export what "
                    "you need with that build first)"
                )

    def close(self) -> None:
        with self._lock:
            (self._look or self._db).close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction on the store (under its lock: workers share it)."""
        if self._look is not None:
            raise Fatal(f"backups {self.db_path!r} are open only to look")
        with self._lock:
            try:
                with self._db:
                    yield self._db
            except sqlite3.Error as exc:
                raise Fatal(f"backups {self.db_path!r}: {exc}") from exc

    # -- writing -------------------------------------------------------------------------

    def put(
        self,
        image_id: str,
        version: int,
        digest: str | None,
        reason: str,
        held: ImageFeatures,
        now: float,
    ) -> bool:
        """Keep `held`, labelled with the ledger's `version` and content `digest` of
        what the context holds; False if this very record is kept already."""
        data = zlib.compress(held.features, 6)
        fhash = hashlib.sha256(
            b"%d:%d:" % (held.features_count, held.feature_length_in_bits) + held.features
        ).hexdigest()
        with self.tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO backups (image_id, version, digest, reason, taken_at, "
                "features_count, feature_length_in_bits, size, features_hash, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    image_id,
                    version,
                    digest or "",  # not NULL: UNIQUE treats NULLs as all different
                    reason,
                    now,
                    held.features_count,
                    held.feature_length_in_bits,
                    len(data),
                    fhash,
                    data,
                ),
            )
            return cur.rowcount == 1

    def image_path(self, digest: str) -> str:
        return os.path.join(self.images_dir, digest[:2], digest)

    def keep_image(self, fd: int, size: int, digest: str, now: float) -> bool:
        """Copy the open file (`size` bytes from its start) as the image of `digest`,
        unless a copy is kept already. Written to a temporary name, hashed on the way,
        flushed, renamed: a crash leaves no half copy under a content name, and a file
        rewritten meanwhile leaves none at all (ValueError). False if already kept.

        The note comes first: a prune (which removes a copy and its note in one
        transaction) then either has removed it already, and the copy is made anew,
        or sees it as fresh and keeps it."""
        self._note_image(digest, size, now)
        path = self.image_path(digest)
        with contextlib.suppress(OSError):
            if os.stat(path).st_size == size:
                return False
        try:
            self._copy(fd, size, digest, path)
        except BaseException:
            if not os.path.exists(path):  # no copy: no note of one either
                with contextlib.suppress(Fatal), self.tx() as db:
                    db.execute("DELETE FROM kept_images WHERE digest = ?", (digest,))
            raise
        return True

    def _copy(self, fd: int, size: int, digest: str, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            h = hashlib.sha256()
            offset = 0
            while offset < size:
                chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
                if not chunk:
                    raise ValueError(f"the file ended after {offset} of {size} bytes")
                h.update(chunk)
                os.write(out, chunk)
                offset += len(chunk)
            if h.hexdigest() != digest:
                raise ValueError("the file changed while it was copied")
            os.fsync(out)
        except BaseException:
            os.close(out)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(out)
        os.replace(tmp, path)

    def _note_image(self, digest: str, size: int, now: float) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO kept_images VALUES (?, ?, ?) "
                "ON CONFLICT (digest) DO UPDATE SET kept_at = excluded.kept_at, "
                "size = excluded.size",
                (digest, size, now),
            )

    # -- reading -------------------------------------------------------------------------

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one read, whole (a look reads again what a sync began writing
        under it)."""
        if self._look is None:
            with self.tx() as db:
                return db.execute(sql, params).fetchall()
        with self._lock:
            try:
                return self._look.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise Fatal(f"backups {self.db_path!r}: {exc}") from exc

    def records(self, image_id: str) -> list[Backup]:
        """Every record kept for one image ID, oldest first."""
        rows = self.read(
            f"SELECT {_COLUMNS} FROM backups WHERE image_id = ? "  # noqa: S608
            "ORDER BY taken_at, id",
            (image_id,),
        )
        return [_backup(r) for r in rows]

    def features(self, backup_id: int) -> ImageFeatures | None:
        rows = self.read(
            "SELECT image_id, features_count, feature_length_in_bits, data FROM backups "
            "WHERE id = ?",
            (backup_id,),
        )
        if not rows:
            return None
        row = rows[0]
        return ImageFeatures(row[0], int(row[1]), int(row[2]), zlib.decompress(row[3]))

    def kept_images(self, digests: Iterable[str]) -> set[str]:
        """Those of `digests` whose image copy is kept."""
        wanted = [d for d in set(digests) if d]
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = _marks(chunk)
            found.update(
                r[0]
                for r in self.read(
                    f"SELECT digest FROM kept_images WHERE digest IN ({marks})",  # noqa: S608
                    chunk,
                )
            )
        return {d for d in found if os.path.exists(self.image_path(d))}

    def cursor(self, sql: str, params: Sequence[Any] = ()) -> Iterator[tuple[Any, ...]]:
        """The rows of one query, fetched a few at a time (the prune: not while workers
        write; a look reads them whole)."""
        if self._look is not None:
            yield from self.read(sql, params)
            return
        cur = self._db.execute(sql, params)
        try:
            while batch := cur.fetchmany(500):
                yield from batch
        finally:
            cur.close()

    def stream(
        self, since: float | None = None, image_ids: Sequence[str] = ()
    ) -> Iterator[tuple[Backup, ImageFeatures]]:
        """Every kept version (of `image_ids`, taken at or after `since`), by image ID
        and version, one at a time: memory stays flat however many there are. Read a
        page at a time (see _pages): beside a sync, every record kept throughout comes
        once and whole."""
        if not image_ids:
            yield from self._stream(since, None)
            return
        ids = sorted(set(image_ids))
        for start in range(0, len(ids), 500):
            yield from self._stream(since, ids[start : start + 500])

    def _stream(
        self, since: float | None, ids: list[str] | None
    ) -> Iterator[tuple[Backup, ImageFeatures]]:
        where = ["taken_at >= ?"]
        params: list[Any] = [since if since is not None else float("-inf")]
        if ids is not None:
            where.append(f"image_id IN ({_marks(ids)})")
            params.extend(ids)
        rows = self._pages(
            f"SELECT {_COLUMNS}, feature_length_in_bits, data FROM backups",  # noqa: S608
            where,
            params,
            order=("image_id", "taken_at", "id"),
            key=lambda r: (r[1], r[5], r[0]),
            size=100,  # features: some 20 KB a record
        )
        for *head, bits, data in rows:
            b = _backup(head)
            held = zlib.decompress(data)
            yield b, ImageFeatures(b.image_id, b.features_count, bits, held)

    def per_image(self, image_ids: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        """Per image ID (all, or those given): the versions kept, the newest backup's
        time, the bytes; streamed, by image ID, a page at a time (see _pages)."""
        ids = sorted(set(image_ids))
        groups: list[list[str] | None] = [ids[i : i + 500] for i in range(0, len(ids), 500)]
        for chunk in groups or [None]:
            rows = self._pages(
                "SELECT image_id, GROUP_CONCAT(version), MAX(taken_at), SUM(size), COUNT(*) "
                "FROM backups",
                [] if chunk is None else [f"image_id IN ({_marks(chunk)})"],
                chunk or [],
                order=("image_id",),
                key=lambda r: (r[0],),
                size=500,
                group=" GROUP BY image_id",
            )
            for r in rows:
                yield {
                    "image_id": r[0],
                    "versions": sorted({int(v) for v in str(r[1]).split(",")}),
                    "records": r[4],
                    "newest_at": r[2],
                    "size": r[3],
                }

    def _pages(
        self,
        select: str,
        where: list[str],
        params: Sequence[Any],
        order: tuple[str, ...],
        key: Callable[[Any], tuple[Any, ...]],
        size: int,
        group: str = "",
    ) -> Iterator[Any]:
        """The rows of `select` (`where`, `group`) in `order`, `size` at a time: each
        page one read, of the rows after the last one's `key` (the columns of `order`,
        an index's). Each page is of one state (a look reads it again if a sync wrote
        under it); between pages a sync may write, and a row that was there throughout
        still comes once, whole. Memory stays flat however many rows there are."""
        after: tuple[Any, ...] = ()
        while True:
            clauses, args = list(where), list(params)
            if after:
                clauses.append(f"({', '.join(order)}) > ({_marks(after)})")
                args.extend(after)
            sql = select + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
            rows = self.read(f"{sql}{group} ORDER BY {', '.join(order)} LIMIT {int(size)}", args)
            yield from rows
            if len(rows) < size:
                return
            after = tuple(key(rows[-1]))

    def totals(self) -> dict[str, int]:
        """The whole store: records and bytes, image copies and bytes."""
        (n, size, images), *_ = self.read(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), COUNT(DISTINCT image_id) FROM backups"
        )
        (copies, copy_bytes), *_ = self.read(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM kept_images"
        )
        return {
            "backups": n,
            "backup_bytes": size,
            "image_ids": images,
            "image_copies": copies,
            "image_bytes": copy_bytes,
        }


def _backup(row: Sequence[Any]) -> Backup:
    b = Backup(*row)
    return b if b.digest else dataclasses.replace(b, digest=None)


def _marks(values: Sequence[Any]) -> str:
    """SQL placeholders for `values` (only "?" marks reach the SQL text: S608 below is
    about f-strings that hold nothing else)."""
    return ",".join("?" * len(values))
