"""Backups: the features the context held, kept before each update and delete, and
(optionally) a copy of every image file sent, kept by content.

``[backup] path`` is a folder: ``features.db`` (SQLite) has one row per backed-up
version, its features compressed; ``images/ab/abcdef…`` holds image copies named by
their SHA-256, one file per distinct content however many IDs or versions share it.

A backup of version *v* is the record the context answered GET with just before the
change that made version *v + 1* (an update, or the delete). The first backup of a
version wins: a retried update whose first try did land must not overwrite the old
features with the new ones under the old version's number.

Workers take backups (each before its own call), so the store has its own connection
and lock, apart from the ledger: it is never the ledger's one writer that waits on it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from featsync.errors import Fatal, NotFound, Transient
from featsync.model import ImageFeatures, SearchContext
from featsync.sqlitefiles import read_only_uri

SCHEMA_VERSION = 1
_CHUNK = 1 << 20  # bytes per read when an image file is copied
_RECENT_COPY_S = 3600.0  # a copy this young is never pruned (its send may be under way)
FULL_PRUNE_EVERY_S = 3600.0  # a cycle's own prune looks at every image at most this often

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
        data BLOB NOT NULL,
        UNIQUE (image_id, version)
    )""",
    "CREATE INDEX IF NOT EXISTS backups_taken_at ON backups (taken_at)",
    "CREATE INDEX IF NOT EXISTS backups_digest ON backups (digest)",
    """CREATE TABLE IF NOT EXISTS kept_images (
        digest TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        kept_at REAL NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

_COLUMNS = "image_id, version, digest, reason, taken_at, features_count, size"


class BackupNotTaken(Transient):
    """The features could not be backed up: the change they guard waits."""


@dataclass(frozen=True, slots=True)
class Backup:
    """One kept version (without its features: see `BackupStore.features`)."""

    image_id: str
    version: int
    digest: str | None
    reason: str
    taken_at: float
    features_count: int
    size: int  # compressed bytes

    def as_json(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "version": self.version,
            "hash": self.digest,
            "reason": self.reason,
            "taken_at": self.taken_at,
            "features_count": self.features_count,
            "size": self.size,
        }


@dataclass(slots=True)
class Pruned:
    """What one prune removed, by rule."""

    versions: int = 0  # beyond keep_versions of their image
    gone: int = 0  # of images deleted more than keep_deleted_days ago
    size: int = 0  # the oldest, while everything kept was over max_size
    images: int = 0  # image copies no kept version or current image refers to
    freed: int = 0  # bytes
    over_cap: int = 0  # bytes still over max_size after pruning all it may

    def any(self) -> bool:
        return bool(self.versions or self.gone or self.size or self.images)


class BackupStore:
    """The backups folder. `read_only`: look only (a missing folder is an empty store)."""

    def __init__(self, folder: str, read_only: bool = False) -> None:
        self.folder = folder
        self.read_only = read_only
        self.db_path = os.path.join(folder, "features.db")
        self.images_dir = os.path.join(folder, "images")
        self._lock = threading.Lock()
        try:
            if read_only:
                uri = (
                    read_only_uri(self.db_path)
                    if os.path.exists(self.db_path)
                    else "file::memory:?mode=memory"
                )
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
                if not os.path.exists(self.db_path):
                    self._create()
                return
            os.makedirs(folder, exist_ok=True)
            self._db = sqlite3.connect(self.db_path, check_same_thread=False, timeout=10.0)
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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
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
        """Keep `held` as version `version` of `image_id`; False if that version was
        kept already (the first backup of a version wins)."""
        data = zlib.compress(held.features, 6)
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO backups (image_id, version, digest, reason, taken_at, "
                "features_count, feature_length_in_bits, size, data) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    image_id,
                    version,
                    digest or None,
                    reason,
                    now,
                    held.features_count,
                    held.feature_length_in_bits,
                    len(data),
                    data,
                ),
            )
            return cur.rowcount == 1

    def image_path(self, digest: str) -> str:
        return os.path.join(self.images_dir, digest[:2], digest)

    def keep_image(self, fd: int, size: int, digest: str, now: float) -> bool:
        """Copy the open file (`size` bytes from its start) as the image of `digest`,
        unless a copy is kept already. Written to a temporary name, flushed, renamed:
        a crash leaves no half copy under a content name. False if already kept."""
        path = self.image_path(digest)
        if os.path.exists(path):
            self._note_image(digest, size, now)
            return False
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            offset = 0
            while offset < size:
                chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
                if not chunk:
                    raise OSError(f"the file ended after {offset} of {size} bytes")
                os.write(out, chunk)
                offset += len(chunk)
            os.fsync(out)
        except BaseException:
            os.close(out)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(out)
        os.replace(tmp, path)
        self._note_image(digest, size, now)
        return True

    def _note_image(self, digest: str, size: int, now: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO kept_images VALUES (?, ?, ?) "
                "ON CONFLICT (digest) DO UPDATE SET kept_at = excluded.kept_at",
                (digest, size, now),
            )

    # -- reading -------------------------------------------------------------------------

    def versions(self, image_id: str) -> list[Backup]:
        """The kept versions of one image ID, oldest first."""
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM backups WHERE image_id = ? ORDER BY version",  # noqa: S608
                (image_id,),
            ).fetchall()
        return [Backup(*r) for r in rows]

    def features(self, image_id: str, version: int) -> ImageFeatures | None:
        with self._tx() as db:
            row = db.execute(
                "SELECT features_count, feature_length_in_bits, data FROM backups "
                "WHERE image_id = ? AND version = ?",
                (image_id, version),
            ).fetchone()
        if row is None:
            return None
        return ImageFeatures(image_id, int(row[0]), int(row[1]), zlib.decompress(row[2]))

    def kept_images(self, digests: Iterable[str]) -> set[str]:
        """Those of `digests` whose image copy is kept."""
        wanted = [d for d in set(digests) if d]
        found: set[str] = set()
        with self._tx() as db:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = _marks(chunk)
                found.update(
                    r[0]
                    for r in db.execute(
                        f"SELECT digest FROM kept_images WHERE digest IN ({marks})",  # noqa: S608
                        chunk,
                    )
                )
        return {d for d in found if os.path.exists(self.image_path(d))}

    def stream(
        self, since: float | None = None, image_ids: Sequence[str] = ()
    ) -> Iterator[tuple[Backup, ImageFeatures]]:
        """Every kept version (of `image_ids`, taken at or after `since`), by image ID
        and version, one at a time: memory stays flat however many there are. A look,
        not for a store that workers write to at the same time."""
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
        cur = self._db.execute(
            f"SELECT {_COLUMNS}, feature_length_in_bits, data FROM backups "  # noqa: S608
            f"WHERE {' AND '.join(where)} ORDER BY image_id, version",
            params,
        )
        try:
            while batch := cur.fetchmany(100):
                for *head, bits, data in batch:
                    b = Backup(*head)
                    held = zlib.decompress(data)
                    yield b, ImageFeatures(b.image_id, b.features_count, bits, held)
        finally:
            cur.close()

    def summary(self, image_ids: Sequence[str] = ()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per image ID: versions kept, newest backup, bytes; and the totals."""
        ids = sorted(set(image_ids))
        groups: list[list[str] | None] = [ids[i : i + 500] for i in range(0, len(ids), 500)]
        rows: list[Any] = []
        with self._tx() as db:
            for chunk in groups or [None]:
                where = "" if chunk is None else f"WHERE image_id IN ({_marks(chunk)})"
                rows += db.execute(
                    "SELECT image_id, GROUP_CONCAT(version), MAX(taken_at), SUM(size) "  # noqa: S608
                    f"FROM backups {where} GROUP BY image_id ORDER BY image_id",
                    chunk or [],
                ).fetchall()
            n, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM backups").fetchone()
            copies, copy_bytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM kept_images"
            ).fetchone()
        per_image = [
            {
                "image_id": r[0],
                "versions": sorted(int(v) for v in str(r[1]).split(",")),
                "newest_at": r[2],
                "size": r[3],
            }
            for r in rows
        ]
        totals = {
            "backups": n,
            "backup_bytes": size,
            "image_copies": copies,
            "image_bytes": copy_bytes,
            "images": len(per_image) if not image_ids else None,
        }
        return per_image, totals

    # -- retention -----------------------------------------------------------------------

    def prune(
        self,
        keep_versions: int,
        keep_deleted_days: float,
        max_size: int,
        held: Callable[[Sequence[str]], set[str]],
        current_digests: Callable[[], set[str]],
        now: float,
        touched: Sequence[str] | None = None,
    ) -> Pruned:
        """Apply the retention rules: at most `keep_versions` per image; nothing of an
        image gone (not `held` by the ledger) for more than `keep_deleted_days`; the
        oldest backups beyond `max_size` bytes in all; image copies that no kept backup
        and no current image refer to. `touched`: only these images' versions (a
        cycle's quick prune; the other rules wait for a full one)."""
        out = Pruned()
        with self._tx() as db:
            out.versions, freed = _prune_versions(db, keep_versions, touched)
            out.freed += freed
        if touched is not None:
            return out
        cutoff = now - keep_deleted_days * 86400
        with self._tx() as db:
            stale = [
                r[0]
                for r in db.execute(
                    "SELECT image_id FROM backups GROUP BY image_id HAVING MAX(taken_at) < ?",
                    (cutoff,),
                )
            ]
        alive = held(stale) if stale else set()
        gone = [i for i in stale if i not in alive]
        with self._tx() as db:
            for start in range(0, len(gone), 500):
                chunk = gone[start : start + 500]
                marks = _marks(chunk)
                row = db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM backups "  # noqa: S608
                    f"WHERE image_id IN ({marks})",
                    chunk,
                ).fetchone()
                db.execute(f"DELETE FROM backups WHERE image_id IN ({marks})", chunk)  # noqa: S608
                out.gone += row[0]
                out.freed += row[1]
        self._prune_images(current_digests(), now, out)
        self._prune_size(max_size, out)
        if out.size:
            self._prune_images(current_digests(), now, out)
        with self._tx() as db:
            db.execute(
                "INSERT INTO meta VALUES ('full_prune_at', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(now),),
            )
        return out

    def full_prune_due(self, now: float) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'full_prune_at'").fetchone()
        return row is None or now - float(row[0]) >= FULL_PRUNE_EVERY_S

    def _prune_size(self, max_size: int, out: Pruned) -> None:
        with self._tx() as db:
            (backups,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM backups").fetchone()
            (copies,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM kept_images").fetchone()
            over = backups + copies - max_size
            if over <= 0:
                return
            # The oldest first, until enough bytes are freed (a running sum).
            victims = db.execute(
                "SELECT id, size, digest FROM backups ORDER BY taken_at, id"
            ).fetchall()
            ids: list[int] = []
            freed = 0
            for backup_id, size, _digest in victims:
                if freed >= over:
                    break
                ids.append(backup_id)
                freed += size
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                db.execute(f"DELETE FROM backups WHERE id IN ({_marks(chunk)})", chunk)  # noqa: S608
            out.size += len(ids)
            out.freed += freed
            out.over_cap = max(0, over - freed)

    def _prune_images(self, current: set[str], now: float, out: Pruned) -> None:
        with self._tx() as db:
            referenced = {r[0] for r in db.execute("SELECT DISTINCT digest FROM backups")}
            kept = db.execute("SELECT digest, size, kept_at FROM kept_images").fetchall()
        dropped: list[str] = []
        for digest, size, kept_at in kept:
            if digest in referenced or digest in current or now - kept_at < _RECENT_COPY_S:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.image_path(digest))
            dropped.append(digest)
            out.freed += size
        with self._tx() as db:
            db.executemany("DELETE FROM kept_images WHERE digest = ?", [(d,) for d in dropped])
        out.images += len(dropped)
        if dropped and out.over_cap:
            out.over_cap = max(0, out.over_cap - sum(s for d, s, _ in kept if d in dropped))


def _marks(values: Sequence[Any]) -> str:
    """SQL placeholders for `values` (only "?" marks reach the SQL text: S608 below is
    about f-strings that hold nothing else)."""
    return ",".join("?" * len(values))


def _prune_versions(
    db: sqlite3.Connection, keep: int, touched: Sequence[str] | None
) -> tuple[int, int]:
    """Versions beyond the newest `keep` of each image (of `touched` only, if given)."""
    rank = (
        "SELECT id, size, ROW_NUMBER() OVER (PARTITION BY image_id ORDER BY version DESC) AS n "
        "FROM backups"
    )
    params: list[Any] = []
    if touched is not None:
        if not touched:
            return 0, 0
        rank += f" WHERE image_id IN ({_marks(touched)})"
        params.extend(touched)
    victims = db.execute(f"SELECT id, size FROM ({rank}) WHERE n > ?", [*params, keep]).fetchall()  # noqa: S608
    for start in range(0, len(victims), 500):
        chunk = [v[0] for v in victims[start : start + 500]]
        db.execute(f"DELETE FROM backups WHERE id IN ({_marks(chunk)})", chunk)  # noqa: S608
    return len(victims), sum(v[1] for v in victims)


def log_pruned(log: Any, pruned: Pruned, max_size: int) -> None:
    if pruned.any():
        log.info(
            "backups_pruned",
            versions=pruned.versions,
            gone=pruned.gone,
            over_size=pruned.size,
            image_copies=pruned.images,
            freed_bytes=pruned.freed,
        )
    if pruned.over_cap:
        log.warning(
            "backups_over_size",
            over_bytes=pruned.over_cap,
            max_size=max_size,
            reason="the image copies of the current images alone are over [backup] max_size",
        )


# -- taking a backup (a worker, before its call) ------------------------------------------


@dataclass(frozen=True, slots=True)
class Backups:
    """What apply's workers need: the store, the context, the rules."""

    store: BackupStore
    required: bool
    images: bool
    clock: Callable[[], float] = time.time

    def before(
        self, ctx: SearchContext, image_id: str, version: int, digest: str | None, reason: str
    ) -> str:
        """GET what the context holds for `image_id` and keep it, before `reason` (an
        update or a delete) replaces it. Returns what happened, for the log: "kept",
        "kept already" or "skipped: why" (when not required). Raises NotFound when the
        context holds nothing (nothing to keep), BackupNotTaken when a backup was
        required and could not be taken."""
        try:
            held = ctx.get_features(image_id)
        except NotFound:
            raise
        except Transient as exc:
            return self._not_taken(f"GET features failed: {exc}")
        try:
            kept = self.store.put(image_id, version, digest, reason, held, self.clock())
        except Fatal as exc:  # the store cannot be written (disk full, ...)
            return self._not_taken(str(exc))
        return "kept" if kept else "kept already"

    def keep_image(self, fd: int, size: int, digest: str) -> str | None:
        """A copy of the file about to be sent, if `images` is on."""
        if not self.images or digest.startswith("unhashed:"):
            return None
        try:
            self.store.keep_image(fd, size, digest, self.clock())
        except (OSError, Fatal) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            return self._not_taken(f"image copy not kept: {why}")
        return None

    def _not_taken(self, why: str) -> str:
        if self.required:
            raise BackupNotTaken(
                f"features backup not taken ({why}); the change waits, as "
                "[backup] required = true asks"
            )
        return f"skipped: {why}"
