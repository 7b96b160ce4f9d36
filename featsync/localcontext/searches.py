"""Find similar and find duplicates over the index: candidates by votes, scores exact.

A query's descriptors vote (featsync.localcontext.index) for the stored images holding
their nearest neighbours; the best-voted candidates are read from the store and scored
by the exact matcher (featsync.localcontext.matching), so a similarity is the one the
exhaustive matcher gives and a threshold keeps its meaning. What the index can miss is
an image that few of the query's descriptors point to, which is an image far below any
useful threshold (bench/search.py measures the recall against the exhaustive matcher).
Results are always read back from the store: an image deleted a moment ago is never
returned, whatever the index still holds.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from featsync.localcontext import matching
from featsync.localcontext.index import DescriptorIndex, Descriptors
from featsync.localcontext.searchindex import Row, Searcher, StoreReader

CANDIDATES = 32  # scored exactly: at least this many, and twice what is asked for
NEIGHBOURS = 4  # each query descriptor votes for the images holding its 4 nearest
MAX_DISTANCE = 128  # bits (of 486): a neighbour further away is no evidence
DUPLICATE_QUERY = 128  # descriptors an image queries with, looking for its duplicates
DUPLICATE_NEIGHBOURS = 8  # a group of up to 8 copies gets each one's vote
DUPLICATE_CANDIDATES = 8  # scored per image
DUPLICATE_BATCH = 64  # images queried in one index search


def _top(votes: dict[int, int], n: int, floor: int = 1) -> list[int]:
    best = sorted(((v, s) for s, v in votes.items() if v >= floor), key=lambda t: (-t[0], t[1]))
    return [s for _, s in best[:n]]


def similar(
    searcher: Searcher,
    reader: StoreReader,
    query: Descriptors,
    threshold: float,
    max_count: int,
) -> list[tuple[str, float]]:
    """Stored images at or above `threshold` similarity to `query`, most similar first
    (ties by ID), at most `max_count`."""
    if max_count <= 0 or len(query) == 0:
        return []

    def vote(index: DescriptorIndex) -> dict[int, int]:
        return index.votes(query, NEIGHBOURS, MAX_DISTANCE)

    votes: dict[int, int] = searcher.search(vote)
    rows = reader.rows(_top(votes, max(CANDIDATES, 2 * max_count)))
    scored = [(image_id, matching.similarity(query, desc)) for _, image_id, desc in rows]
    hits = [(i, s) for i, s in scored if s >= threshold]
    hits.sort(key=lambda t: (-t[1], t[0]))
    return hits[:max_count]


def _subsample(desc: Descriptors, n: int) -> Descriptors:
    if len(desc) <= n:
        return desc
    return desc[np.linspace(0, len(desc) - 1, n).astype(np.int64)]


def duplicate_pairs(
    searcher: Searcher, reader: StoreReader, threshold: float
) -> list[tuple[str, str, float]]:
    """Each stored image queried once (a sample of its descriptors), its best-voted
    candidates scored exactly: the pairs scored, each once."""
    slots: list[int] = sorted(searcher.search(lambda index: list(index.counts)))
    scored: dict[tuple[int, int], tuple[str, str, float]] = {}
    for start in range(0, len(slots), DUPLICATE_BATCH):
        batch = reader.rows(slots[start : start + DUPLICATE_BATCH])
        queries = [_subsample(desc, DUPLICATE_QUERY) for _, _, desc in batch]

        def vote(index: DescriptorIndex, queries: list[Descriptors] = queries) -> Any:
            return index.votes_many(queries, DUPLICATE_NEIGHBOURS, MAX_DISTANCE)

        votes: list[dict[int, int]] = searcher.search(vote)
        wanted: dict[int, list[int]] = {}
        for (slot, _, _), query, tally in zip(batch, queries, votes, strict=True):
            floor = max(3, math.ceil(0.1 * threshold / 100.0 * len(query)))
            tally.pop(slot, None)
            best = _top(tally, DUPLICATE_CANDIDATES, floor)
            wanted[slot] = [c for c in best if _key(slot, c) not in scored]
        known: dict[int, Row] = {row[0]: row for row in batch}
        missing = sorted({c for cs in wanted.values() for c in cs if c not in known})
        known.update((row[0], row) for row in reader.rows(missing))
        for slot, candidates in wanted.items():
            a = known[slot]
            for c in candidates:
                if _key(slot, c) in scored or c not in known:
                    continue  # scored from the other side, or gone from the store
                b = known[c]
                scored[_key(slot, c)] = (a[1], b[1], matching.similarity(a[2], b[2]))
    return list(scored.values())


def _key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)
