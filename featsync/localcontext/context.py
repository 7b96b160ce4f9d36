"""LocalContext: the embedded search context over its own SQLite store.

Implements the ``SearchContext`` port with the Aspose semantics featsync relies on:
add refuses an ID that is there (``AlreadyExists``), update and delete refuse one that
is not (``NotFound``), an image that cannot be decoded is ``ItemRejected``. Feature
extraction runs in the extractor's worker processes (a crash there is one image's
rejection) and outside the store's lock, so calls extract in parallel.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from featsync.errors import AlreadyExists, Fatal, ItemRejected, NotFound
from featsync.localcontext.extractor import Extractor, default_workers
from featsync.model import ImageData, ImageFeatures, SearchResult
from featsync.sqlitefiles import read_only_uri

if TYPE_CHECKING:
    from featsync.localcontext import matching

# The extractor and the matcher (numpy, Pillow, OpenCV) are imported where they are
# used: a no-change reconcile never extracts or matches, and these imports would be
# most of its start-up time.

_SCHEMA = """
CREATE TABLE IF NOT EXISTS features (
    image_id TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    descriptors BLOB NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tags (name TEXT PRIMARY KEY, descriptors BLOB NOT NULL);
"""
SCHEMA_VERSION = 1


class LocalContext:
    """An embedded search context stored in one SQLite file.

    `extractor` runs feature extraction; without one, the context starts its own
    (a worker per CPU, up to 4). The context stops the extractor on close if it
    started it, or if told it owns it.
    """

    def __init__(
        self,
        path: str,
        extractor: Extractor | None = None,
        owns_extractor: bool = False,
        read_only: bool = False,
    ) -> None:
        self.path = path
        self._owns_extractor = extractor is None or owns_extractor
        self._extractor = extractor or Extractor(default_workers(4))
        self._lock = threading.Lock()
        # Descriptors of every entry, loaded on the first search and kept in step after.
        self._cache: dict[str, matching.Descriptors] | None = None
        if read_only:
            self._open_read_only(path)
            return
        try:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 10000")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._db.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise Fatal(
                    f"search context store {path!r} has schema version {row[0]}, newer than "
                    f"this featsync understands ({SCHEMA_VERSION})"
                )
            # The store's own random ID, made once: a ledger records which context it
            # mirrors, and a new or replaced store is not the one it knew.
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,)
            )
            self._store_id = str(
                self._db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
            )
        except (sqlite3.Error, OSError) as exc:
            raise Fatal(f"cannot open search context store {path!r}: {exc}") from exc

    def _open_read_only(self, path: str) -> None:
        """Look only (a dry run): create nothing; a missing store is an empty one that
        no ledger can have mirrored yet."""
        self._store_id = "(none yet)"
        try:
            if not os.path.exists(path):
                self._db = sqlite3.connect(":memory:", check_same_thread=False)
                self._db.executescript(_SCHEMA)
                return
            self._db = sqlite3.connect(
                read_only_uri(path), uri=True, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA busy_timeout = 10000")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise Fatal(f"cannot open search context store {path!r}: {exc}") from exc
        if row is not None:
            self._store_id = str(row[0])

    def identity(self) -> str:
        return f"local store {self._store_id} ({self.path})"

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._owns_extractor:
            self._extractor.close()

    def _extract(self, image: ImageData, name: str) -> matching.Descriptors:
        desc: matching.Descriptors = self._extractor.extract(image, name)
        return desc

    # -- features by image ID -------------------------------------------------

    def _exists(self, image_id: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM features WHERE image_id = ?", (image_id,)).fetchone()
            is not None
        )

    def _store(self, image_id: str, desc: matching.Descriptors, must_exist: bool) -> int:
        with self._lock:
            try:
                exists = self._exists(image_id)
                if must_exist and not exists:
                    raise NotFound(f"features for image {image_id!r} not found")
                if not must_exist and exists:
                    raise AlreadyExists(f"features for image {image_id!r} already exist")
                self._db.execute(
                    "INSERT OR REPLACE INTO features VALUES (?, ?, ?, ?)",
                    (image_id, len(desc), desc.tobytes(), time.time()),
                )
            except sqlite3.Error as exc:
                raise Fatal(f"search context store {self.path!r}: {exc}") from exc
            if self._cache is not None:
                self._cache[image_id] = desc
        return len(desc)

    def add_features(self, image_id: str, image: ImageData) -> int:
        _check_id(image_id)
        return self._store(image_id, self._extract(image, image_id), must_exist=False)

    def update_features(self, image_id: str, image: ImageData) -> int:
        _check_id(image_id)
        return self._store(image_id, self._extract(image, image_id), must_exist=True)

    def delete_features(self, image_id: str) -> None:
        with self._lock:
            try:
                gone = self._db.execute("DELETE FROM features WHERE image_id = ?", (image_id,))
            except sqlite3.Error as exc:
                raise Fatal(f"search context store {self.path!r}: {exc}") from exc
            if self._cache is not None:
                self._cache.pop(image_id, None)
        if gone.rowcount == 0:
            raise NotFound(f"features for image {image_id!r} not found")

    def get_features(self, image_id: str) -> ImageFeatures:
        from featsync.localcontext import features

        with self._lock:
            row = self._db.execute(
                "SELECT count, descriptors FROM features WHERE image_id = ?", (image_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"features for image {image_id!r} not found")
        return ImageFeatures(image_id, int(row[0]), features.FEATURE_LENGTH_BITS, bytes(row[1]))

    def image_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT image_id FROM features ORDER BY 1")]

    def image_id_page(self, after: str, until: str | None, limit: int) -> list[str]:
        """Up to `limit` image IDs in order, each after `after` (and up to `until`): the
        IDs a context holds, a page at a time (`verify` looks for orphans with it)."""
        sql = "SELECT image_id FROM features WHERE image_id > ?"
        args: tuple[object, ...] = (after,)
        if until is not None:
            sql, args = sql + " AND image_id <= ?", (after, until)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY image_id LIMIT ?", (*args, limit))
            return [r[0] for r in rows]

    # -- searches -------------------------------------------------------------

    def _entries(self) -> dict[str, matching.Descriptors]:
        with self._lock:
            if self._cache is None:
                cache: dict[str, matching.Descriptors] = {}
                rows = self._db.execute("SELECT image_id, descriptors FROM features")
                for image_id, blob in rows:
                    cache[image_id] = _descriptors(blob)
                self._cache = cache
            return dict(self._cache)

    def find_similar(
        self,
        *,
        image: bytes | None = None,
        image_id: str | None = None,
        threshold: float,
        max_count: int,
    ) -> list[SearchResult]:
        from featsync.localcontext import matching

        entries = self._entries()
        if image is not None:
            query = self._extract(image, image_id or "<uploaded image>")
        elif image_id is not None:
            if image_id not in entries:
                raise NotFound(f"features for image {image_id!r} not found")
            query = entries[image_id]
        else:
            raise ItemRejected("find_similar needs an image or an image ID")
        hits = matching.rank(query, entries, threshold, max_count)
        return [SearchResult(i, s) for i, s in hits]

    def find_duplicates(self, threshold: float) -> list[list[SearchResult]]:
        from featsync.localcontext import matching

        groups = matching.duplicate_groups(self._entries(), threshold)
        return [[SearchResult(i, s) for i, s in g] for g in groups]

    def compare(self, image_id: str, other: str | None = None, image: bytes | None = None) -> float:
        """Similarity of a stored image to another stored one or to uploaded bytes."""
        from featsync.localcontext import matching

        entries = self._entries()
        if image_id not in entries:
            raise NotFound(f"features for image {image_id!r} not found")
        if other is not None:
            if other not in entries:
                raise NotFound(f"features for image {other!r} not found")
            return matching.similarity(entries[image_id], entries[other])
        if image is None:
            raise ItemRejected("compare needs a second image ID or image data")
        return matching.similarity(entries[image_id], self._extract(image, "<uploaded image>"))

    # -- tags and extraction without storing (served by `featsync serve`) -----------

    def extract(self, image_id: str, image: bytes) -> ImageFeatures:
        """Features of an image, in the Aspose shape, without adding them."""
        from featsync.localcontext import features

        desc = self._extract(image, image_id)
        return ImageFeatures(image_id, len(desc), features.FEATURE_LENGTH_BITS, desc.tobytes())

    def add_tag(self, name: str, image: bytes) -> None:
        """Name a reference image; find_by_tags finds what looks like it."""
        if not name:
            raise ItemRejected("a tag name must not be empty")
        desc = self._extract(image, f"tag {name!r}")
        with self._lock:
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO tags VALUES (?, ?)", (name, desc.tobytes())
                )
            except sqlite3.Error as exc:
                raise Fatal(f"search context store {self.path!r}: {exc}") from exc

    def find_by_tags(self, tags: list[str], threshold: float, max_count: int) -> list[SearchResult]:
        """Images similar to any of the tags' reference images, most similar first."""
        from featsync.localcontext import matching

        with self._lock:
            rows = self._db.execute("SELECT name, descriptors FROM tags").fetchall()
        found = {name: _descriptors(blob) for name, blob in rows if name in tags}
        missing = [t for t in tags if t not in found]
        if missing:
            raise NotFound(f"no tag named {missing[0]!r}")
        entries = self._entries()
        best: dict[str, float] = {}
        for desc in found.values():
            for image_id, score in matching.rank(desc, entries, threshold, len(entries)):
                best[image_id] = max(score, best.get(image_id, 0.0))
        hits = sorted(best.items(), key=lambda t: (-t[1], t[0]))[: max(0, max_count)]
        return [SearchResult(i, s) for i, s in hits]


def _descriptors(blob: Any) -> matching.Descriptors:
    import numpy as np

    from featsync.localcontext import features

    return np.frombuffer(bytes(blob), dtype=np.uint8).reshape(-1, features.DESCRIPTOR_BYTES)


def _check_id(image_id: str) -> None:
    if not image_id:
        raise ItemRejected("an image ID must not be empty")
