"""The embedded context's search index, kept in step with its store.

The store (SQLite) is the truth; the index (featsync.localcontext.index) is derived
from it and can always be rebuilt from it. Every stored image has a slot, new on every
add and update and never reused, so the index only has to know which slots it holds:
bringing it up to date is a comparison of slot sets (slots the store no longer has
are removed, slots it does not hold yet are added), whoever changed the store.

- The index is loaded on the first search (a sync that only adds never pays for it),
  from ``<store>.index`` if that file is this store's, else built from the store;
  then it is brought up to date with the store.
- While loaded, it follows this process's adds, updates and deletes as they happen,
  and another process's (a sync beside `featsync serve`, say) before each search:
  SQLite's ``data_version`` tells when another connection changed the store.
- When the collection has grown ``GROWTH`` times past what its vocabulary was sized
  for, a new index is built in a background thread while the old one keeps answering.
- On close (and after a rebuild) it is saved when the file is missing or behind by
  more than ``STALE`` of its images, atomically; a crash costs only the catch-up of
  what changed since the last save. Looks (a read-only context: `featsync search`,
  `report --probe`) save it too: the file is a cache beside the store, not the store,
  and without it every look would build the index anew. A look that may not write
  there says so at debug level only. A store of schema 1 read in place (its slots
  are row numbers an upgrade renumbers) is never saved.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypedDict

import numpy as np

from featsync import logs
from featsync.localcontext.index import (
    SAMPLE_PER_WORD,
    DescriptorIndex,
    Descriptors,
    words_for,
)
from featsync.localcontext.storeschema import as_bytes
from featsync.sqlitefiles import LookDb, data_version

STALE = 0.01  # save when more than this share of images changed since the file
STALE_MIN = 256  # ... and at least this many
BATCH = 256  # images read from the store at a time

Row = tuple[int, str, Descriptors]  # slot, image ID, descriptors


def as_descriptors(blob: Any) -> Descriptors:
    from featsync.localcontext.features import DESCRIPTOR_BYTES

    data = as_bytes(blob)
    whole = len(data) - len(data) % DESCRIPTOR_BYTES  # a damaged row's tail is dropped
    return np.frombuffer(data[:whole], dtype=np.uint8).reshape(-1, DESCRIPTOR_BYTES)


class IndexInfo(TypedDict):
    state: str  # "ready", or "rebuilding" (a new vocabulary is being built)
    source: str  # "file" (loaded from its file) or "built" (from the store)
    images: int
    descriptors: int  # live entries
    entries: int  # entries in the lists, removed ones not yet purged included
    lists: int  # words of the vocabulary
    built_for: int  # descriptors the vocabulary was sized for
    bytes: int  # memory of the entries and the vocabulary
    rebuilds: int
    file: str


class StoreReader:
    """Reads of the store the index needs, over one SQLite connection and its lock."""

    def __init__(
        self,
        db: sqlite3.Connection | LookDb,
        lock: threading.Lock,
        slot: str = "slot",
        digests: bool = True,
    ) -> None:
        self.db, self.lock = db, lock
        self.digests = digests  # the store has a digest column
        if slot not in ("slot", "rowid"):
            raise ValueError(f"not a slot column: {slot!r}")
        self.slot = slot  # the slot column (a store of schema 1 read in place: rowid)

    def counts(self) -> dict[int, int]:
        with self.lock:
            sql = f"SELECT {self.slot}, count FROM features"  # noqa: S608 (a known column)
            return dict(self.db.execute(sql).fetchall())

    def fingerprints(self) -> dict[int, tuple[int, bytes | None]]:
        """Slot -> (descriptors, digest): what tells that a slot is still the row the
        index filed (the digest None where the store has none)."""
        digest = "digest" if self.digests else "NULL"
        sql = f"SELECT {self.slot}, count, {digest} FROM features"  # noqa: S608 (known)
        with self.lock:
            rows = self.db.execute(sql).fetchall()
        return {int(s): (int(n), None if d is None else bytes(d)) for s, n, d in rows}

    def _by_slot(self, columns: str, slots: list[int]) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for start in range(0, len(slots), 500):
            part = slots[start : start + 500]
            marks = ",".join("?" * len(part))
            sql = (
                f"SELECT {self.slot}, {columns} FROM features "  # noqa: S608
                f"WHERE {self.slot} IN ({marks})"  # known columns, and marks
            )
            with self.lock:
                out.extend(self.db.execute(sql, part).fetchall())
        return out

    def rows(self, slots: list[int]) -> list[Row]:
        found = self._by_slot("image_id, descriptors", slots)
        return [(int(s), str(i), as_descriptors(b)) for s, i, b in found]

    def ids(self, slots: list[int]) -> dict[int, str]:
        """Slot -> image ID, for the slots the store holds (no descriptors read)."""
        return {int(s): str(i) for s, i in self._by_slot("image_id", slots)}

    def batches(self, slots: list[int]) -> Iterator[list[Row]]:
        for start in range(0, len(slots), BATCH):
            yield self.rows(slots[start : start + BATCH])

    def data_version(self) -> int:
        with self.lock:
            return data_version(self.db)


class Stopped(Exception):
    """The context closed while a background rebuild was running."""


def build(
    reader: StoreReader,
    counts: dict[int, int],
    stop: threading.Event | None = None,
    seed: int = 0,
) -> DescriptorIndex:
    """A new index of the slots in `counts`: the vocabulary from a random sample of
    their descriptors (whole images, about SAMPLE_PER_WORD per word), then every slot.
    `stop` set: raises Stopped between batches."""
    total = sum(counts.values())
    words = words_for(total)
    rng = np.random.default_rng(seed)
    slots = sorted(counts)
    order = rng.permutation(len(slots)).tolist()
    wanted, picked, got = words * SAMPLE_PER_WORD, [], 0
    for n in order:
        if got >= wanted:
            break
        picked.append(slots[n])
        got += counts[slots[n]]
    sample = [d for _, _, d in reader.rows(picked)]
    index = DescriptorIndex.build(
        np.concatenate(sample) if sample else np.zeros((0, 61), np.uint8), total
    )
    for rows in reader.batches(slots):
        if stop is not None and stop.is_set():
            raise Stopped
        index.add((s, d) for s, _, d in rows)
    return index


class Searcher:
    """The index of one store: loaded on first use, kept in step, saved by writers."""

    def __init__(
        self,
        store_path: str,
        store_id: str,
        reader: StoreReader,
        saves: bool,
        quiet: bool,
        open_reader: Callable[[], StoreReader] | None,
    ) -> None:
        self.path = store_path + ".index"
        self.store_id = store_id
        self.reader = reader
        self.saves = saves  # False: slots that an upgrade renumbers (schema 1)
        self.quiet = quiet  # a look: a file it cannot write is no news
        self._open_reader = open_reader  # a connection of its own, for the rebuild thread
        self._lock = threading.Lock()  # the index, once loaded
        self._load_lock = threading.Lock()  # one loader at a time (not under _lock)
        # While the index loads, this process's changes wait here (an add never waits
        # for a load): applied once it is in place. None: not loading.
        self._pending_lock = threading.Lock()
        self._pending: list[tuple[int | None, int | None, Descriptors | None]] | None = None
        self._index: DescriptorIndex | None = None
        self._retry_at = 0  # live entries a failed background rebuild waits for
        self._seen_version = -1
        self._unsaved = 0
        self._must_save = False
        self._rebuild: threading.Thread | None = None
        self._stop = threading.Event()
        self.rebuilds = 0
        self.source = ""  # "file": loaded from its file; "built": built from the store

    # -- following the store ----------------------------------------------------

    def stored(self, old: int | None, new: int, desc: Descriptors) -> None:
        """This process stored `desc` as slot `new` (replacing slot `old`)."""
        self._follow(old, new, desc)

    def deleted(self, old: int) -> None:
        self._follow(old, None, None)

    def _follow(self, old: int | None, new: int | None, desc: Descriptors | None) -> None:
        with self._pending_lock:
            if self._pending is not None:
                self._pending.append((old, new, desc))
                return
        with self._lock:
            if self._index is not None:
                self._apply(self._index, old, new, desc)
                self._maybe_grow()

    def _apply(
        self, index: DescriptorIndex, old: int | None, new: int | None, desc: Descriptors | None
    ) -> None:
        if old is not None:
            self._file_orphans(index, index.remove([old]))
        # Two writes of one image ID in two threads can report out of order: a slot the
        # store no longer holds is not filed (results are read from the store anyway).
        if new is not None and desc is not None and self.reader.ids([new]):
            index.add([(new, desc)])
        self._unsaved += 1

    def _file_orphans(self, index: DescriptorIndex, orphans: list[int]) -> None:
        if orphans:
            index.add_filed((s, d) for s, _, d in self.reader.rows(orphans))

    def _catch_up(self, index: DescriptorIndex) -> int:
        """Bring `index` to the store's slots; how many slots changed."""
        prints = self.reader.fingerprints()
        gone = [s for s in index.counts if s not in prints]
        # A slot whose count or digest differs is not the row the index filed (a store
        # put back from a copy numbers its new rows again from where the copy stood).
        changed = [
            s
            for s, (n, d) in prints.items()
            if s in index.counts
            and (index.counts[s] != n or (d is not None and index.digests.get(s) != d))
        ]
        self._file_orphans(index, index.remove(gone + changed))
        if changed:
            index.purge()  # so that the changed slots can be filed again
        new = [s for s in prints if not index.holds(s)]
        for rows in self.reader.batches(new):
            index.add((s, d) for s, _, d in rows)
        return len(gone) + len(new)  # a changed slot counts in both

    def _load(self) -> None:
        """Load the index (or build it) outside the lock that adds and searches take:
        a first search at 100,000 images takes a minute, and this process's adds go on
        meanwhile (their changes are applied when it is in place). A vocabulary the
        collection has outgrown GROWTH times is built anew here (a look, such as
        `featsync search`, ends before a background rebuild would)."""
        with self._load_lock:
            if self._index is not None:
                return
            with self._pending_lock:
                self._pending = []
            try:
                started = time.monotonic()
                version = self.reader.data_version()
                index, why = DescriptorIndex.load(self.path, self.store_id)
                caught_up = 0
                if index is not None:
                    caught_up = self._catch_up(index)
                    if index.needs_new_vocabulary():
                        index, why = None, "the collection has outgrown its vocabulary"
                source = "file" if index is not None else "built"
                if index is None:
                    index = build(self.reader, self.reader.counts())
            except BaseException:
                with self._pending_lock:
                    self._pending = None
                raise
            with self._lock:
                with self._pending_lock:
                    pending, self._pending = self._pending or [], None
                for old, new, desc in pending:
                    self._apply(index, old, new, desc)
                self._index, self._seen_version, self.source = index, version, source
                self._unsaved = caught_up + len(pending)
                self._must_save = source == "built"  # missing, damaged, outgrown, another's
            logs.get().info(
                "index_loaded",
                store=self.path[: -len(".index")],
                source=source,
                **({"why": why} if source == "built" else {}),
                images=len(index.counts),
                caught_up=caught_up,
                seconds=round(time.monotonic() - started, 2),
            )

    def ready(self) -> DescriptorIndex:
        """The index, up to date with the store. Call with the lock held, after _load."""
        assert self._index is not None
        version = self.reader.data_version()
        if version != self._seen_version:
            self._unsaved += self._catch_up(self._index)
            self._seen_version = version
            self._maybe_grow()
        return self._index

    def search(self, fn: Callable[[DescriptorIndex], Any]) -> Any:
        """`fn(index)` with the index up to date, under the lock."""
        if self._index is None:
            self._load()
        with self._lock:
            return fn(self.ready())

    # -- a new vocabulary, in the background --------------------------------------

    def _maybe_grow(self) -> None:
        index = self._index
        if (
            index is None
            or self._open_reader is None
            or self._rebuild is not None
            or index.live_entries() < self._retry_at
            or not index.needs_new_vocabulary()
        ):
            return
        self._rebuild = threading.Thread(
            target=self._rebuild_run, name="featsync-index-rebuild", daemon=True
        )
        self._rebuild.start()

    def _rebuild_run(self) -> None:
        assert self._open_reader is not None
        started = time.monotonic()
        try:
            reader = self._open_reader()
            try:
                fresh = build(reader, reader.counts(), self._stop)
            finally:
                reader.db.close()
            with self._lock:
                version = self.reader.data_version()  # before: a change after it is seen
                self._catch_up(fresh)
                self._index = fresh
                self._seen_version = version
                self.rebuilds += 1
                self._must_save = True
                if self.saves:
                    self._save_locked()
                images, words = len(fresh.counts), fresh.words
            logs.get().info(
                "index_rebuilt",
                store=self.path[: -len(".index")],
                images=images,
                lists=words,
                seconds=round(time.monotonic() - started, 2),
            )
        except Stopped:
            pass  # closing: the index it would replace is saved instead
        except Exception as exc:  # sqlite3.Error, OSError, MemoryError, a FAISS error...
            # The old index goes on answering; tried again once the collection has
            # grown by half again (not on every add).
            with self._lock:
                if self._index is not None:
                    self._retry_at = self._index.live_entries() * 3 // 2
            logs.get().warning(
                "index_rebuild_failed",
                store=self.path[: -len(".index")],
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            with self._lock:
                self._rebuild = None

    def wait_rebuilt(self, timeout: float) -> bool:
        """Wait for a background rebuild to end (tests, benchmarks); True if none runs."""
        thread = self._rebuild
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    # -- the file --------------------------------------------------------------

    def _save_locked(self) -> None:
        """Save; a failure (a full disk, a read-only folder) is logged, not raised: the
        file only saves time, and the next load catches up from an older one or builds."""
        if self._index is None:
            return
        try:
            self._index.save(self.path, self.store_id)
            self._unsaved = 0
            self._must_save = False
        except (OSError, RuntimeError) as exc:
            log = logs.get()
            (log.debug if self.quiet else log.warning)(
                "index_save_failed", file=self.path, error=str(exc)
            )

    def close(self) -> None:
        """Save the index if this process may write and the file is behind (a rebuild
        running is stopped first: the index it replaces is saved instead)."""
        self._stop.set()
        thread = self._rebuild
        if thread is not None:
            thread.join()
        with self._lock:
            index = self._index
            if index is None or not self.saves:
                return
            if self._must_save or self._unsaved > max(STALE_MIN, STALE * len(index.counts)):
                self._save_locked()

    def info(self) -> IndexInfo:
        if self._index is None:
            self._load()
        with self._lock:
            index = self.ready()
            return IndexInfo(
                **{
                    "state": "rebuilding" if self._rebuild is not None else "ready",
                    "source": self.source,
                    "images": len(index.counts),
                    "descriptors": index.live_entries(),
                    "entries": index.entries,
                    "lists": index.words,
                    "built_for": index.built_for,
                    "bytes": index.nbytes(),
                    "rebuilds": self.rebuilds,
                    "file": self.path,
                }
            )
