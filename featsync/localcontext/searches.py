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

from typing import Any

import numpy as np

from featsync.localcontext import matching
from featsync.localcontext.index import WEAK, DescriptorIndex, Descriptors
from featsync.localcontext.searchindex import Row, Searcher, StoreReader

CANDIDATES = 32  # scored exactly: at least this many, and twice what is asked for
NEIGHBOURS = 4  # each query descriptor votes for the images holding its 4 nearest
MAX_DISTANCE = 128  # bits (of 486): a neighbour further away is no evidence
DUPLICATE_QUERY = 128  # descriptors an image queries with, looking for its duplicates
DUPLICATE_NEIGHBOURS = 4  # 20 copies of one image still give each other ~25 votes of 128
DUPLICATE_PROBES = 1  # a near-copy's descriptor is filed under the same word
DUPLICATE_CANDIDATES = 8  # scored per image
DUPLICATE_BATCH = 64  # images queried in one index search


Tally = dict[int, tuple[int, int]]  # slot -> (votes, descriptors it holds)


def _candidates(tally: Tally, query_len: int, n: int, floor: int, fraction: float) -> list[int]:
    """The `n` best-voted slots with at least `floor` votes, and the weak images
    (under WEAK descriptors) that at least `fraction` of what they could get voted
    for, up to `n` of them, best share first. A similarity is counted against the
    smaller image: a weak image can score 100 with the few votes it can get, which
    the best-voted alone would miss (the exhaustive matcher does not)."""
    strong = sorted((-v, s) for s, (v, _) in tally.items() if v >= floor)
    weak = sorted(
        (-v / min(query_len, c), s)
        for s, (v, c) in tally.items()
        if 0 < c < WEAK and v / min(query_len, c) >= fraction
    )
    picked = dict.fromkeys(s for _, s in strong[:n])
    picked.update(dict.fromkeys(s for _, s in weak[:n]))
    return list(picked)


def _tally(index: DescriptorIndex, votes: dict[int, int]) -> Tally:
    return {s: (v, index.counts[s]) for s, v in votes.items()}


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

    def vote(index: DescriptorIndex) -> Tally:
        return _tally(index, index.votes(query, NEIGHBOURS, MAX_DISTANCE))

    tally: Tally = searcher.search(vote)
    fraction = 0.5 * threshold / 100.0
    rows = reader.rows(_candidates(tally, len(query), max(CANDIDATES, 2 * max_count), 1, fraction))
    score = {slot: matching.similarity(query, desc) for slot, _, desc in rows}
    ids = {slot: image_id for slot, image_id, _ in rows}
    hit = [slot for slot, s in score.items() if s >= threshold]

    def twins(index: DescriptorIndex) -> dict[int, set[int]]:
        return {slot: index.twins_of(slot) - ids.keys() for slot in hit}

    # An exact twin of a hit scores what it scores (the same descriptors).
    for slot, others in searcher.search(twins).items():
        for other, image_id in reader.ids(sorted(others)).items():
            score[other], ids[other] = score[slot], image_id
    hits = [(ids[slot], s) for slot, s in score.items() if s >= threshold]
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

    def survey(index: DescriptorIndex) -> tuple[list[int], list[list[int]]]:
        groups = [sorted(t) for t in index.twins.values() if len(t) > 1]
        return sorted(index.counts), groups

    slots, twin_groups = searcher.search(survey)
    scored: dict[tuple[int, int], tuple[str, str, float]] = {}
    # Exact twins pair with each other (their nearest neighbours tie among them):
    # the first of each group with the rest, at the score of the image with itself.
    for group in twin_groups:
        rows = reader.rows(group[:1])
        ids = reader.ids(group)
        if rows and group[0] in ids:
            itself = matching.similarity(rows[0][2], rows[0][2])
            for other in group[1:]:
                if other in ids:
                    scored[_key(group[0], other)] = (ids[group[0]], ids[other], itself)
    share = 0.5 * threshold / 100.0
    for start in range(0, len(slots), DUPLICATE_BATCH):
        batch = reader.rows(slots[start : start + DUPLICATE_BATCH])
        queries = [_subsample(desc, DUPLICATE_QUERY) for _, _, desc in batch]
        lengths = np.array([len(q) for q in queries], dtype=np.int64)
        # a weak image's few descriptors: each vote counts
        least = np.where(lengths < WEAK, 1, 3)
        floors = np.maximum(least, np.ceil(0.1 * threshold / 100.0 * lengths)).astype(np.int64)

        def vote(index: DescriptorIndex, queries: list[Descriptors] = queries) -> Any:
            query, slot, votes = index.votes_many(
                queries, DUPLICATE_NEIGHBOURS, MAX_DISTANCE, DUPLICATE_PROBES
            )
            weak = np.fromiter(index.weak, dtype=np.int64, count=len(index.weak))
            is_weak = np.isin(slot, weak)
            counts = {s: index.counts[s] for s in set(slot[is_weak].tolist())}
            return query, slot, votes, is_weak, counts

        query, slot, votes, is_weak, counts = searcher.search(vote)
        own = np.array([row[0] for row in batch], dtype=np.int64)
        other = slot != own[query]
        strong = other & (votes >= floors[query])
        tallies: list[Tally] = [{} for _ in batch]
        for q, s, v in _rows(query, slot, votes, strong):
            tallies[q][s] = (v, WEAK)
        for q, s, v in _rows(query, slot, votes, other & is_weak & ~strong):
            if v / min(int(lengths[q]), counts[s]) >= share:
                tallies[q][s] = (v, counts[s])
        wanted: dict[int, list[int]] = {}
        for (me, _, _), length, tally in zip(batch, lengths.tolist(), tallies, strict=True):
            best = _candidates(tally, length, DUPLICATE_CANDIDATES, 1, share)
            wanted[me] = [c for c in best if _key(me, c) not in scored]
        known: dict[int, Row] = {row[0]: row for row in batch}
        missing = sorted({c for cs in wanted.values() for c in cs if c not in known})
        known.update((row[0], row) for row in reader.rows(missing))
        for me, candidates in wanted.items():
            a = known[me]
            for c in candidates:
                if _key(me, c) in scored or c not in known:
                    continue  # scored from the other side, or gone from the store
                b = known[c]
                scored[_key(me, c)] = (a[1], b[1], matching.similarity(a[2], b[2]))
    return list(scored.values())


def _rows(query: Any, slot: Any, votes: Any, mask: Any) -> Any:
    return zip(query[mask].tolist(), slot[mask].tolist(), votes[mask].tolist(), strict=True)


def _key(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a < b else (b, a)
