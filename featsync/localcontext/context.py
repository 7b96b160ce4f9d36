"""LocalContext: the embedded search context over its own SQLite store.

Implements the ``SearchContext`` port with the Aspose semantics featsync relies on:
add refuses an ID that is there (``AlreadyExists``), update and delete refuse one that
is not (``NotFound``), an image that cannot be decoded is ``ItemRejected``. Feature
extraction runs in the extractor's worker processes (a crash there is one image's
rejection) and outside the store's lock, so calls extract in parallel.

Searches (find similar, duplicates, tags) take their candidates from the search index
(featsync.localcontext.searchindex: loaded on the first search, kept in step after)
and score them with the exact matcher (featsync.localcontext.matching), so a score
means what it always did; only which images are scored changed.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

from featsync.errors import AlreadyExists, Fatal, ItemRejected, NotFound
from featsync.localcontext.extractor import Extractor, default_workers
from featsync.localcontext.storeschema import SCHEMA, SCHEMA_VERSION, columns, digest, upgrade
from featsync.model import ImageData, ImageFeatures, SearchResult
from featsync.sqlitefiles import LookDb

if TYPE_CHECKING:
    from featsync.localcontext import matching
    from featsync.localcontext.searchindex import IndexInfo, Searcher, StoreReader

# The extractor, the matcher and the index (numpy, Pillow, OpenCV, FAISS) are imported
# where they are used: a no-change reconcile never extracts or matches, and these
# imports would be most of its start-up time.


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
        self._db: sqlite3.Connection | LookDb
        if read_only:
            self._open_read_only(path)
            return
        try:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db = db
            db.execute("PRAGMA busy_timeout = 10000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise Fatal(
                    f"search context store {path!r} has schema version {row[0]}, newer than "
                    f"this featsync understands ({SCHEMA_VERSION})"
                )
            upgrade(db, 10000)
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            # The store's own random ID, made once: a ledger records which context it
            # mirrors, and a new or replaced store is not the one it knew.
            db.execute("INSERT OR IGNORE INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex,))
            self._store_id = str(
                db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
            )
        except (sqlite3.Error, OSError) as exc:
            raise Fatal(f"cannot open search context store {path!r}: {exc}") from exc
        self._searcher = self._make_searcher(writable=True)

    def _make_searcher(self, writable: bool) -> Searcher:
        from featsync.localcontext.searchindex import Searcher, StoreReader

        have = columns(self._db)
        slot = "slot" if "slot" in have else "rowid"  # schema 1, read in place
        reader = StoreReader(self._db, self._lock, slot, digests="digest" in have)
        on_disk = os.path.exists(self.path) and slot == "slot"

        def own_reader() -> StoreReader:
            db = LookDb(self.path, 10000)
            return StoreReader(db, threading.Lock(), slot, digests="digest" in have)

        rebuild_reader = own_reader if on_disk else None
        return Searcher(
            self.path,
            self._store_id,
            reader,
            saves=on_disk,
            quiet=not writable,
            open_reader=rebuild_reader,
        )

    def _open_read_only(self, path: str) -> None:
        """Look only (a dry run): create nothing; a missing store is an empty one that
        no ledger can have mirrored yet."""
        self._store_id = "(none yet)"
        row = None
        try:
            look = LookDb(path, 10000) if os.path.exists(path) else None  # never torn
            made = set() if look is None else look.tables()
            if look is not None and "meta" in made:
                row = look.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
            if look is not None and (row is not None or {"features", "meta", "tags"} <= made):
                self._db = look  # a store (a damaged one's reads say what is wrong)
            else:  # none, or one a first sync is making (its tables, then its ID)
                if look is not None:
                    look.close()
                memory = sqlite3.connect(":memory:", check_same_thread=False)
                memory.executescript(SCHEMA)
                self._db = memory
        except (sqlite3.Error, OSError) as exc:
            raise Fatal(f"cannot open search context store {path!r}: {exc}") from exc
        if row is not None:
            self._store_id = str(row[0])
        self._searcher = self._make_searcher(writable=False)

    def identity(self) -> str:
        return f"local store {self._store_id} ({self.path})"

    def close(self) -> None:
        self._searcher.close()
        with self._lock:
            self._db.close()
        if self._owns_extractor:
            self._extractor.close()

    def _extract(self, image: ImageData, name: str) -> matching.Descriptors:
        desc: matching.Descriptors = self._extractor.extract(image, name)
        return desc

    # -- features by image ID -------------------------------------------------

    def _slot_of(self, image_id: str) -> int | None:
        row = self._db.execute(
            "SELECT slot FROM features WHERE image_id = ?", (image_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def _store(self, image_id: str, desc: matching.Descriptors, must_exist: bool) -> int:
        with self._lock:
            try:
                old = self._slot_of(image_id)
                if must_exist and old is None:
                    raise NotFound(f"features for image {image_id!r} not found")
                if not must_exist and old is not None:
                    raise AlreadyExists(f"features for image {image_id!r} already exist")
                # REPLACE deletes the old row and inserts one with a new slot.
                blob = desc.tobytes()
                cur = self._db.execute(
                    "INSERT OR REPLACE INTO features "
                    "(image_id, count, descriptors, updated_at, digest) VALUES (?, ?, ?, ?, ?)",
                    (image_id, len(desc), blob, time.time(), digest(blob)),
                )
                new = int(cur.lastrowid or 0)
            except sqlite3.Error as exc:
                raise Fatal(f"search context store {self.path!r}: {exc}") from exc
        self._searcher.stored(old, new, desc)
        return len(desc)

    def add_features(self, image_id: str, image: ImageData) -> int:
        _check_id(image_id)
        return self._store(image_id, self._extract(image, image_id), must_exist=False)

    def update_features(self, image_id: str, image: ImageData) -> int:
        _check_id(image_id)
        return self._store(image_id, self._extract(image, image_id), must_exist=True)

    def load_descriptors(self, items: Iterable[tuple[str, matching.Descriptors]]) -> int:
        """Add precomputed descriptors under new image IDs, many to a transaction (the
        benchmarks and tests fill big stores with it; an ID already there is refused
        with AlreadyExists and what came before it in its batch is not stored)."""
        added = 0
        batch: list[tuple[str, matching.Descriptors]] = []
        for item in items:
            batch.append(item)
            if len(batch) == 500:
                added += self._load_batch(batch)
                batch = []
        return added + (self._load_batch(batch) if batch else 0)

    def _load_batch(self, batch: list[tuple[str, matching.Descriptors]]) -> int:
        slots: list[int] = []
        now = time.time()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for image_id, desc in batch:
                        _check_id(image_id)
                        if self._slot_of(image_id) is not None:
                            raise AlreadyExists(f"features for image {image_id!r} already exist")
                        blob = desc.tobytes()
                        cur = self._db.execute(
                            "INSERT INTO features "
                            "(image_id, count, descriptors, updated_at, digest) "
                            "VALUES (?, ?, ?, ?, ?)",
                            (image_id, len(desc), blob, now, digest(blob)),
                        )
                        slots.append(int(cur.lastrowid or 0))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise Fatal(f"search context store {self.path!r}: {exc}") from exc
        for slot, (_, desc) in zip(slots, batch, strict=True):
            self._searcher.stored(None, slot, desc)
        return len(batch)

    def delete_features(self, image_id: str) -> None:
        with self._lock:
            try:
                old = self._slot_of(image_id)
                self._db.execute("DELETE FROM features WHERE image_id = ?", (image_id,))
            except sqlite3.Error as exc:
                raise Fatal(f"search context store {self.path!r}: {exc}") from exc
        if old is None:
            raise NotFound(f"features for image {image_id!r} not found")
        self._searcher.deleted(old)

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

    def _stored(self, image_id: str) -> matching.Descriptors:
        from featsync.localcontext.searchindex import as_descriptors

        with self._lock:
            row = self._db.execute(
                "SELECT descriptors FROM features WHERE image_id = ?", (image_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"features for image {image_id!r} not found")
        return as_descriptors(row[0])

    def similar(
        self, query: matching.Descriptors, threshold: float, max_count: int
    ) -> list[SearchResult]:
        """Stored images similar to a query's descriptors (no extraction)."""
        from featsync.localcontext import searches

        hits = searches.similar(self._searcher, self._searcher.reader, query, threshold, max_count)
        return [SearchResult(i, s) for i, s in hits]

    def find_similar(
        self,
        *,
        image: bytes | None = None,
        image_id: str | None = None,
        threshold: float,
        max_count: int,
    ) -> list[SearchResult]:
        if image is not None:
            query = self._extract(image, image_id or "<uploaded image>")
        elif image_id is not None:
            query = self._stored(image_id)
        else:
            raise ItemRejected("find_similar needs an image or an image ID")
        return self.similar(query, threshold, max_count)

    def find_duplicates(self, threshold: float) -> list[list[SearchResult]]:
        from featsync.localcontext import matching, searches

        pairs = searches.duplicate_pairs(self._searcher, self._searcher.reader, threshold)

        def score(a: str, b: str) -> float:
            try:
                return matching.similarity(self._stored(a), self._stored(b))
            except NotFound:
                return -1.0  # deleted while the groups were made: left out below

        out: list[list[SearchResult]] = []
        for group in matching.groups(pairs, threshold, score):
            members = [SearchResult(i, s) for i, s in group if s >= 0]
            if len(members) > 1:
                out.append(members)
        return out

    def compare(self, image_id: str, other: str | None = None, image: bytes | None = None) -> float:
        """Similarity of a stored image to another stored one or to uploaded bytes."""
        from featsync.localcontext import matching

        first = self._stored(image_id)
        if other is not None:
            return matching.similarity(first, self._stored(other))
        if image is None:
            raise ItemRejected("compare needs a second image ID or image data")
        return matching.similarity(first, self._extract(image, "<uploaded image>"))

    def index_info(self) -> IndexInfo:
        """The search index's state and size (loads it if it is not yet)."""
        return self._searcher.info()

    def wait_index_rebuilt(self, timeout: float) -> bool:
        return self._searcher.wait_rebuilt(timeout)

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
        from featsync.localcontext.searchindex import as_descriptors

        with self._lock:
            rows = self._db.execute("SELECT name, descriptors FROM tags").fetchall()
        found = {name: as_descriptors(blob) for name, blob in rows if name in tags}
        missing = [t for t in tags if t not in found]
        if missing:
            raise NotFound(f"no tag named {missing[0]!r}")
        best: dict[str, float] = {}
        for desc in found.values():
            for hit in self.similar(desc, threshold, max_count):
                best[hit.image_id] = max(hit.similarity, best.get(hit.image_id, 0.0))
        hits = sorted(best.items(), key=lambda t: (-t[1], t[0]))[: max(0, max_count)]
        return [SearchResult(i, s) for i, s in hits]


def _check_id(image_id: str) -> None:
    if not image_id:
        raise ItemRejected("an image ID must not be empty")
