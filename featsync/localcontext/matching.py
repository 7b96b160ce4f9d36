"""Similarity of two sets of AKAZE descriptors on Aspose's 0-100 scale, and duplicate groups.

Similarity is the share of *mutual* best matches (Hamming distance, Lowe's ratio
test in both directions) among the smaller set's descriptors. It is symmetric, 100
for an image against itself, high for a resized or re-encoded copy, and near 0 for
an unrelated image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

Descriptors = np.ndarray[Any, np.dtype[np.uint8]]

RATIO = 0.8


def _matcher() -> Any:
    import cv2

    return cv2.BFMatcher(cv2.NORM_HAMMING)


def _best(matcher: Any, query: Descriptors, train: Descriptors) -> dict[int, int]:
    out: dict[int, int] = {}
    for pair in matcher.knnMatch(query, train, k=2):
        if len(pair) == 2:
            if pair[0].distance < RATIO * pair[1].distance:
                out[pair[0].queryIdx] = pair[0].trainIdx
        elif len(pair) == 1:
            out[pair[0].queryIdx] = pair[0].trainIdx
    return out


def similarity(a: Descriptors, b: Descriptors) -> float:
    """Percent of mutual best matches among min(len(a), len(b)) descriptors."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    matcher = _matcher()
    ab = _best(matcher, a, b)
    ba = _best(matcher, b, a)
    mutual = sum(1 for i, j in ab.items() if ba.get(j) == i)
    return round(100.0 * mutual / min(len(a), len(b)), 2)


def rank(
    query: Descriptors, candidates: Mapping[str, Descriptors], threshold: float, max_count: int
) -> list[tuple[str, float]]:
    """Candidates at or above `threshold`, most similar first, at most `max_count`."""
    scored = [(image_id, similarity(query, d)) for image_id, d in candidates.items()]
    hits = [(i, s) for i, s in scored if s >= threshold]
    hits.sort(key=lambda t: (-t[1], t[0]))
    return hits[: max(0, max_count)]


def duplicate_groups(
    entries: Mapping[str, Descriptors], threshold: float
) -> list[list[tuple[str, float]]]:
    """Groups of images linked by similarity >= threshold (connected components).

    Each member carries its similarity to the group's first image (ID order), the
    way Aspose's tutorial describes the groups. Pairwise: O(n^2) matchings.
    """
    ids = sorted(entries)
    parent = {i: i for i in ids}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    scores: dict[tuple[str, str], float] = {}
    for n, a in enumerate(ids):
        for b in ids[n + 1 :]:
            s = similarity(entries[a], entries[b])
            scores[(a, b)] = s
            if s >= threshold:
                parent[find(b)] = find(a)
    groups: dict[str, list[str]] = {}
    for i in ids:
        groups.setdefault(find(i), []).append(i)
    out: list[list[tuple[str, float]]] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0]
        out.append([(first, 100.0)] + [(m, scores[(first, m)]) for m in members[1:]])
    return out
