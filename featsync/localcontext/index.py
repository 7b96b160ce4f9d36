"""The descriptor index: which stored images hold descriptors near a query's.

An inverted file over binary descriptors (FAISS ``IndexBinaryIVF``): a vocabulary tree
of "visual words" (featsync.localcontext.vocabulary: k-majority clustering of a sample
of the stored descriptors, seconds), each stored descriptor filed under its nearest
word, a query's descriptor compared only with those filed under its ``NPROBE``
nearest words. Each
stored image has a *slot* (the store's row number, new on every add or update, never
reused); the index files descriptors by slot. A query's descriptors vote for the
slots that hold one of their nearest neighbours; the best-voted slots are the
candidates the exact matcher then scores (featsync.localcontext.matching).

Adds are appended (no retraining); a removed slot is dropped from the answers at once
and purged from the lists in one pass once removed entries are an eighth of them. The
vocabulary is sized for the collection it was built from; when the collection has
grown ``GROWTH`` times, a new one is built (featsync.localcontext.searchindex does
that in the background). Codes are descriptors padded to 64 bytes
(featsync.localcontext.codes).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import struct
import zlib
from collections.abc import Iterable
from typing import Any, BinaryIO

import numpy as np

from featsync.localcontext.codes import BITS, CODE_BYTES, Codes, faiss, pad
from featsync.localcontext.features import DESCRIPTOR_BYTES
from featsync.localcontext.storeschema import DIGEST_BYTES
from featsync.localcontext.storeschema import digest as row_digest
from featsync.localcontext.vocabulary import Tree

Descriptors = Codes
Slots = np.ndarray[Any, np.dtype[np.int64]]

NPROBE = 2  # words searched per query descriptor
GROWTH = 8  # a new vocabulary when the collection has grown this many times
# ... and never for less than this many descriptors (~160 images): a small collection
# is searched fast with any vocabulary, and a first sync into an index loaded on an
# empty store would otherwise rebuild it at 1, 8, 60 and 500 images (measured through
# `featsync serve`: 5-8 s more of its CPU per 1,000 images, 1.15x the sync's time).
MIN_BUILT_FOR = 1 << 16
MIN_WORDS, MAX_WORDS = 16, 8192
SAMPLE_PER_WORD = 32  # vocabulary training sample: this many descriptors per word
WEAK = 32  # descriptors: an image with fewer can hardly collect votes, but scores high
FORMAT = 6
_MAGIC = b"FSIDX006"
_TRAILER = struct.Struct("<Q8s")  # length of the metadata, magic


def words_for(descriptors: int) -> int:
    """Vocabulary size for a collection of this many descriptors: about 4 * sqrt(n),
    a power of two, so that a query's cost (words compared + entries scanned) stays
    near its minimum as the collection grows."""
    want = 4.0 * float(np.sqrt(max(1, descriptors)))
    words = 1 << int(np.log2(want))
    return max(MIN_WORDS, min(MAX_WORDS, words))


class DescriptorIndex:
    """Stored descriptors filed by slot, for candidate retrieval.

    Not thread-safe: its owner (searchindex.Searcher) serializes calls.
    """

    def __init__(
        self,
        ivf: Any,
        tree: Tree,
        counts: dict[int, int],
        built_for: int,
        digests: dict[int, bytes] | None = None,
        filed: set[int] | None = None,
    ) -> None:
        self._ivf = ivf
        self._ivf.nprobe = NPROBE
        self.tree = tree
        self.counts = counts  # live slot -> descriptors held
        self.built_for = built_for  # descriptors the vocabulary was sized for
        self.dead: dict[int, int] = {}  # removed slots still in the lists -> entries
        self.weak = {s for s, n in counts.items() if 0 < n < WEAK}  # slots of weak images
        self.filed = set(counts) if filed is None else filed  # slots whose entries are in
        # Exact twins (the same descriptors under several IDs: one file copied): a
        # query's nearest neighbours tie among them, and only a few would get votes.
        self.digests: dict[int, bytes] = digests or {}
        self.twins: dict[bytes, set[int]] = {}
        for slot, digest in self.digests.items():
            self.twins.setdefault(digest, set()).add(slot)

    @classmethod
    def build(cls, sample: Descriptors, expected: int) -> DescriptorIndex:
        """An empty index whose vocabulary comes from `sample` ((n, 61) descriptors),
        sized for a collection of `expected` descriptors."""
        if len(sample) == 0:
            sample = np.zeros((1, DESCRIPTOR_BYTES), dtype=np.uint8)
        tree = Tree.build(pad(sample), words_for(expected))
        return cls(_ivf(tree), tree, {}, max(MIN_BUILT_FOR, expected))

    # -- upkeep --------------------------------------------------------------

    @property
    def entries(self) -> int:
        return int(self._ivf.ntotal)

    @property
    def words(self) -> int:
        return int(self._ivf.nlist)

    def live_entries(self) -> int:
        return self.entries - sum(self.dead.values())

    def holds(self, slot: int) -> bool:
        return slot in self.counts

    def add(self, items: Iterable[tuple[int, Descriptors]]) -> None:
        """Take each (slot, descriptors); a slot is added once (slots are never reused).
        An exact twin of a slot already filed is only known as its twin: filed, it
        would take the nearest-neighbour places from every other image."""
        slots: list[Slots] = []
        codes: list[Descriptors] = []
        for slot, desc in items:
            if slot in self.counts or slot in self.dead:
                continue
            self.counts[slot] = len(desc)
            digest = _digest(desc)
            self.digests[slot] = digest
            twins = self.twins.setdefault(digest, set())
            has_filed = any(t in self.filed for t in twins)
            twins.add(slot)
            if 0 < len(desc) < WEAK:
                self.weak.add(slot)
            if not has_filed:
                self.filed.add(slot)
                if len(desc):
                    slots.append(np.full(len(desc), slot, dtype=np.int64))
                    codes.append(pad(desc))
        if codes:
            self._file(np.concatenate(codes), np.concatenate(slots))

    def _file(self, x: Codes, ids: Slots) -> None:
        """Each code into the list of its nearest word (the tree assigns it)."""
        _, leaves = self.tree.assign(x, 1)
        lists = np.ascontiguousarray(leaves[:, 0])
        self._ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))

    def remove(self, slots: Iterable[int]) -> list[int]:
        """Drop slots from the answers now; purge their entries when they are many.
        Returns the twins to file in place of a filed slot removed (the caller reads
        their descriptors and gives them to `add_filed`)."""
        orphans: list[int] = []
        for slot in slots:
            self.weak.discard(slot)
            held = self.counts.pop(slot, None)
            filed = slot in self.filed
            self.filed.discard(slot)
            if filed and held:
                self.dead[slot] = held  # entries to purge
            digest = self.digests.pop(slot, None)
            if digest is not None:
                twins = self.twins[digest]
                twins.discard(slot)
                if not twins:
                    del self.twins[digest]
                elif filed and not any(t in self.filed for t in twins):
                    orphans.append(min(twins))
        # A twin about to be filed would share its neighbours' places with the removed
        # one's identical entries (and lose every vote to them): purged first.
        if self.dead and (orphans or sum(self.dead.values()) * 8 >= max(1, self.entries)):
            self.purge()
        return [o for o in dict.fromkeys(orphans) if o in self.counts and o not in self.filed]

    def add_filed(self, items: Iterable[tuple[int, Descriptors]]) -> None:
        """File the descriptors of twins `remove` named (known slots, not yet filed)."""
        for slot, desc in items:
            if slot in self.counts and slot not in self.filed and slot not in self.dead:
                self.filed.add(slot)
                if len(desc):
                    self._file(pad(desc), np.full(len(desc), slot, dtype=np.int64))

    def purge(self) -> None:
        if self.dead:
            gone = np.fromiter(self.dead, dtype=np.int64, count=len(self.dead))
            self._ivf.remove_ids(faiss.IDSelectorBatch(gone))
            self.dead.clear()

    def twins_of(self, slot: int) -> set[int]:
        """The live slots holding exactly the descriptors `slot` holds (itself included)."""
        digest = self.digests.get(slot)
        return set(self.twins[digest]) if digest is not None else set()

    def needs_new_vocabulary(self) -> bool:
        return self.live_entries() > GROWTH * self.built_for and (
            words_for(self.live_entries()) > self.words
        )

    # -- queries -------------------------------------------------------------

    def votes(self, query: Descriptors, neighbours: int, max_distance: int) -> dict[int, int]:
        """Slot -> how many of the query's descriptors have it among their
        `neighbours` nearest (within `max_distance` bits): each descriptor votes once
        for a slot."""
        _, slots, votes = self.votes_many([query], neighbours, max_distance)
        return dict(zip(slots.tolist(), votes.tolist(), strict=True))

    def _search(self, x: Codes, neighbours: int, probes: int) -> tuple[Any, Any]:
        self._ivf.nprobe = probes
        near, leaves = self.tree.assign(x, probes)
        distances, labels = self._ivf.search_preassigned(x, neighbours, leaves, near)
        return distances, labels

    def votes_many(
        self,
        queries: list[Descriptors],
        neighbours: int,
        max_distance: int,
        probes: int = NPROBE,
    ) -> tuple[Slots, Slots, Slots]:
        """`votes` for several queries in one search, as three arrays: the query's
        number, the slot, its votes (live slots only; grouped by query)."""
        sizes = np.array([len(q) for q in queries], dtype=np.int64)
        empty = np.zeros(0, dtype=np.int64)
        if sizes.sum() == 0 or self.entries == 0:
            return empty, empty, empty
        distances, labels = self._search(pad(np.concatenate(queries)), neighbours, probes)
        n = len(labels)
        rows = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], labels.shape)
        keep = (labels >= 0) & (distances <= max_distance)
        # one vote per (descriptor, slot): a slot may hold several of its neighbours
        pairs = np.unique(labels[keep].astype(np.int64) * n + rows[keep])
        if len(pairs) == 0:
            return empty, empty, empty
        slot, row = pairs // n, pairs % n
        owner = np.repeat(np.arange(len(queries), dtype=np.int64), sizes)[row]
        base = int(slot.max()) + 1
        keys, votes = np.unique(owner * base + slot, return_counts=True)
        query, slot = keys // base, keys % base
        if self.dead:
            live = ~np.isin(slot, np.fromiter(self.dead, dtype=np.int64, count=len(self.dead)))
            query, slot, votes = query[live], slot[live], votes[live]
        return query, slot, votes.astype(np.int64)

    def nbytes(self) -> int:
        """Memory the index holds: each entry's code and slot, and the vocabulary."""
        return self.entries * (CODE_BYTES + 8) + (self.words + len(self.tree.coarse)) * CODE_BYTES

    # -- a file beside the store ----------------------------------------------

    def save(self, path: str, store_id: str) -> None:
        """Write the index to `path` atomically (a temporary file renamed over it):
        the FAISS index, then its metadata (the slots it holds, a CRC-32 of the FAISS
        part) and a trailer."""
        self.purge()
        _remove_stale_temporaries(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            faiss.write_index_binary(self._ivf, tmp)
            crc, size = _crc(tmp, None)
            header = {
                "format": FORMAT,
                "store_id": store_id,
                "built_for": self.built_for,
                "crc": crc,
                "faiss_bytes": size,
            }
            slots = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            meta = io.BytesIO()
            np.savez(
                meta,
                header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                coarse=self.tree.coarse,
                fine=self.tree.fine,
                slots=slots,
                counts=np.fromiter(self.counts.values(), dtype=np.int64, count=len(slots)),
                digests=np.frombuffer(
                    b"".join(self.digests[s] for s in self.counts), dtype=np.uint8
                ).reshape(-1, _DIGEST),
                filed=np.fromiter((s in self.filed for s in self.counts), bool, len(slots)),
                ntotal=np.array([self.entries], dtype=np.int64),
            )
            with open(tmp, "ab") as fh:
                blob = meta.getvalue()
                fh.write(blob)
                fh.write(_TRAILER.pack(len(blob), _MAGIC))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str, store_id: str) -> tuple[DescriptorIndex | None, str]:
        """The index saved at `path` for this store; or None and why not: there is
        none, or it is another store's, another format's, not a regular file, or
        damaged in any way (the caller rebuilds: the file is only a cache)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, "no index file"
        except OSError as exc:
            return None, f"cannot open the index file: {exc.strerror}"
        try:
            with open(fd, "rb", closefd=False) as fh:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return None, "the index file is not a regular file"  # never waited on
                return cls._load(fh, fd, store_id)
        except Exception as exc:  # damage can make any reader raise anything
            return None, f"the index file is damaged ({type(exc).__name__})"
        finally:
            os.close(fd)

    @classmethod
    def _load(cls, fh: BinaryIO, fd: int, store_id: str) -> tuple[DescriptorIndex | None, str]:
        damaged = "the index file is damaged"
        size = fh.seek(0, os.SEEK_END)
        if size < _TRAILER.size:
            return None, damaged
        fh.seek(size - _TRAILER.size)
        length, magic = _TRAILER.unpack(fh.read(_TRAILER.size))
        if magic != _MAGIC or length > size - _TRAILER.size:
            return None, damaged
        fh.seek(size - _TRAILER.size - length)
        meta = np.load(io.BytesIO(fh.read(length)), allow_pickle=False)
        header = json.loads(bytes(meta["header"]).decode())
        if header.get("format") != FORMAT:
            return None, f"the index file is of format {header.get('format')}, not {FORMAT}"
        if header.get("store_id") != store_id:
            return None, "the index file is of another store"
        faiss_bytes = int(header["faiss_bytes"])
        if faiss_bytes + length + _TRAILER.size != size or _crc(fh, faiss_bytes)[0] != int(
            header["crc"]
        ):
            return None, damaged + " (its checksum)"
        # the open file itself (the path may have been replaced since)
        ivf = faiss.read_index_binary(f"/proc/self/fd/{fd}")
        if int(ivf.ntotal) != int(meta["ntotal"][0]) or not isinstance(ivf, faiss.IndexBinaryIVF):
            return None, damaged
        tree = Tree(meta["coarse"], meta["fine"])
        slots = meta["slots"].tolist()
        raw, flags = meta["digests"], meta["filed"]
        if (
            tree.leaves != int(ivf.nlist)
            or raw.shape != (len(slots), _DIGEST)
            or flags.shape != (len(slots),)
        ):
            return None, damaged
        counts = dict(zip(slots, meta["counts"].tolist(), strict=True))
        digests = {s: bytes(d) for s, d in zip(slots, raw, strict=True)}
        filed = {s for s, f in zip(slots, flags.tolist(), strict=True) if f}
        return cls(ivf, tree, counts, int(header["built_for"]), digests, filed), ""


def _crc(source: str | BinaryIO, length: int | None) -> tuple[int, int]:
    """CRC-32 of a file's first `length` bytes (all of it: None), and how many."""
    fh = open(source, "rb") if isinstance(source, str) else source  # noqa: SIM115
    try:
        fh.seek(0)
        crc, done = 0, 0
        while length is None or done < length:
            want = 1 << 22 if length is None else min(1 << 22, length - done)
            chunk = fh.read(want)
            if not chunk:
                break
            crc, done = zlib.crc32(chunk, crc), done + len(chunk)
        return crc, done
    finally:
        if isinstance(source, str):
            fh.close()


def _remove_stale_temporaries(path: str) -> None:
    """Temporary files of saves whose process is gone (killed in the middle)."""
    folder, base = os.path.split(os.path.abspath(path))
    prefix = base + ".tmp-"
    try:
        names = [n for n in os.listdir(folder) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix) :]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still there (saving, perhaps)
        except ProcessLookupError:
            pass
        except OSError:
            continue  # another user's process: alive
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, name))


_DIGEST = DIGEST_BYTES


def _digest(desc: Descriptors) -> bytes:
    return row_digest(np.ascontiguousarray(desc).tobytes())  # as the store computes it


def _ivf(tree: Tree) -> Any:
    """An inverted file with a list per leaf of the tree (the tree assigns; the flat
    quantizer of its leaves is what FAISS keeps, and saves, with the lists)."""
    quantizer = faiss.IndexBinaryFlat(BITS)
    quantizer.add(np.ascontiguousarray(tree.fine.reshape(-1, CODE_BYTES)))
    ivf = faiss.IndexBinaryIVF(quantizer, BITS, tree.leaves)
    ivf.is_trained = True  # the vocabulary is ours: nothing for FAISS to train
    return ivf
