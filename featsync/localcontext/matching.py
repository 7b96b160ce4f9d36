"""Similarity of two sets of AKAZE descriptors on Aspose's 0-100 scale, and duplicate groups.

Similarity is the share of *mutual* best matches (Hamming distance, Lowe's ratio
test in both directions) among the smaller set's descriptors. It is symmetric, 100
for an image against itself, high for a resized or re-encoded copy, and near 0 for
an unrelated image.

The nearest two neighbours are found by FAISS's exhaustive binary search (popcount
over 64-bit words); ``reference_similarity`` computes the same value with OpenCV's
brute-force matcher, which is what the tests hold it to. A best match passes the
ratio test only when it is strictly nearer than the second, so the two agree exactly:
which of two equally near neighbours a library returns never decides a match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from featsync.localcontext.codes import BITS, faiss, pad

Descriptors = np.ndarray[Any, np.dtype[np.uint8]]

RATIO = 0.8


def _best(query: Descriptors, train: Descriptors) -> np.ndarray[Any, np.dtype[np.int64]]:
    """For each query descriptor, its nearest train descriptor's index if that one
    passes the ratio test (or is the only one), else -1."""
    flat = faiss.IndexBinaryFlat(BITS)
    flat.add(pad(train))
    if len(train) == 1:
        _, labels = flat.search(pad(query), 1)
        return np.asarray(labels[:, 0], dtype=np.int64)
    distances, labels = flat.search(pad(query), 2)
    passes = distances[:, 0] < RATIO * distances[:, 1]
    return np.where(passes, labels[:, 0], -1).astype(np.int64)


def similarity(a: Descriptors, b: Descriptors) -> float:
    """Percent of mutual best matches among min(len(a), len(b)) descriptors."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    ab = _best(a, b)
    ba = _best(b, a)
    matched = ab >= 0
    mutual = int(np.count_nonzero(ba[ab[matched]] == np.flatnonzero(matched)))
    return round(100.0 * mutual / min(len(a), len(b)), 2)


def reference_similarity(a: Descriptors, b: Descriptors) -> float:
    """`similarity` by OpenCV's brute-force matcher (slower; the tests compare the two)."""
    import cv2

    if len(a) == 0 or len(b) == 0:
        return 0.0
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)

    def best(query: Descriptors, train: Descriptors) -> dict[int, int]:
        out: dict[int, int] = {}
        for pair in matcher.knnMatch(query, train, k=2):
            if len(pair) == 2:
                if pair[0].distance < RATIO * pair[1].distance:
                    out[pair[0].queryIdx] = pair[0].trainIdx
            elif len(pair) == 1:
                out[pair[0].queryIdx] = pair[0].trainIdx
        return out

    ab, ba = best(a, b), best(b, a)
    mutual = sum(1 for i, j in ab.items() if ba.get(j) == i)
    return round(100.0 * mutual / min(len(a), len(b)), 2)


def rank(
    query: Descriptors, candidates: Mapping[str, Descriptors], threshold: float, max_count: int
) -> list[tuple[str, float]]:
    """Candidates at or above `threshold`, most similar first (ties by ID), at most
    `max_count`. Over every candidate given: the exhaustive matcher, which the indexed
    search is measured against (bench/search.py) and uses to re-rank its candidates."""
    scored = [(image_id, similarity(query, d)) for image_id, d in candidates.items()]
    hits = [(i, s) for i, s in scored if s >= threshold]
    hits.sort(key=lambda t: (-t[1], t[0]))
    return hits[: max(0, max_count)]


def groups(
    pairs: Iterable[tuple[str, str, float]],
    threshold: float,
    score: Callable[[str, str], float],
) -> list[list[tuple[str, float]]]:
    """Groups of images linked by similarity >= threshold (connected components of
    the scored pairs given), groups in the order of their first image's ID.

    Each member carries its similarity to the group's first image (ID order), the
    way Aspose's tutorial describes the groups; `score(first, member)` gives it where
    the pair was not among those scored.
    """
    parent: dict[str, str] = {}
    known: dict[tuple[str, str], float] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, s in pairs:
        a, b = min(a, b), max(a, b)
        known[(a, b)] = s
        if s >= threshold and a != b:
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    members: dict[str, list[str]] = {}
    for x in sorted(parent):
        members.setdefault(find(x), []).append(x)
    out: list[list[tuple[str, float]]] = []
    for root in sorted(members):
        group = members[root]
        if len(group) < 2:
            continue
        first = group[0]
        scored = [(first, 100.0)]
        for m in group[1:]:
            found = known.get((first, m))
            scored.append((m, found if found is not None else score(first, m)))
        out.append(scored)
    return out


def duplicate_groups(
    entries: Mapping[str, Descriptors], threshold: float
) -> list[list[tuple[str, float]]]:
    """Every pair scored (O(n^2) matchings): the exhaustive reference for small sets."""
    ids = sorted(entries)
    pairs = [
        (a, b, similarity(entries[a], entries[b])) for n, a in enumerate(ids) for b in ids[n + 1 :]
    ]
    return groups(pairs, threshold, lambda a, b: similarity(entries[a], entries[b]))
