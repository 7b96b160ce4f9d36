"""A two-level vocabulary tree of binary "visual words" (in the style of DBoW2).

The index files each descriptor under its nearest word. Finding the nearest of 8,192
words by comparing with each costs 8,192 Hamming distances a descriptor: 15 minutes
for the 50 million descriptors of 100,000 images on one core. A tree finds it with
64 + 128: the nearest of up to 64 coarse words, then the nearest of that coarse
word's fine words. Both levels are k-majority clusterings (Hamming k-means: a
centroid's bit is the majority of its members' bits) of a sample of the stored
descriptors.

Leaves are numbered ``coarse * fine + j``: the index's list numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from featsync.localcontext.codes import BITS, CODE_BYTES, Codes, faiss

ITERATIONS = 4  # k-majority passes
MAX_COARSE = 64
MIN_FINE = 16


def kmajority(sample: Codes, words: int, seed: int = 0) -> Codes:
    """`words` centroids of the (n, 64) sample (fewer members than words: some
    centroids repeat, and their lists stay empty)."""
    rng = np.random.default_rng(seed)
    n = len(sample)
    centroids = sample[rng.choice(n, words, replace=n < words)].copy()
    for _ in range(ITERATIONS):
        flat = faiss.IndexBinaryFlat(BITS)
        flat.add(centroids)
        _, nearest = flat.search(sample, 1)
        assigned = nearest[:, 0]
        sums = np.zeros((words, BITS), dtype=np.uint32)
        counts = np.bincount(assigned, minlength=words)
        for start in range(0, n, 65536):  # unpacked bits: 512 bytes a descriptor
            part = assigned[start : start + 65536]
            order = np.argsort(part, kind="stable")
            bits = np.unpackbits(sample[start : start + 65536][order], axis=1)
            keys, first = np.unique(part[order], return_index=True)
            sums[keys] += np.add.reduceat(bits, first, axis=0, dtype=np.uint32)
        used = counts > 0
        majority = sums[used] * 2 > counts[used, None]
        centroids[used] = np.packbits(majority.astype(np.uint8), axis=1)
    return centroids


def shape_for(words: int) -> tuple[int, int]:
    """(coarse, fine) words per level for about `words` leaves."""
    coarse = min(MAX_COARSE, max(1, words // MIN_FINE))
    return coarse, max(1, words // coarse)


class Tree:
    """Coarse words (c, 64) and each one's fine words (c, f, 64)."""

    def __init__(self, coarse: Codes, fine: Codes) -> None:
        self.coarse, self.fine = coarse, fine
        self._coarse = _flat(coarse)
        self._fine = [_flat(fine[c]) for c in range(len(coarse))]

    @property
    def leaves(self) -> int:
        return int(self.fine.shape[0] * self.fine.shape[1])

    @classmethod
    def build(cls, sample: Codes, words: int) -> Tree:
        c, f = shape_for(words)
        coarse = kmajority(sample, c)
        _, nearest = _flat(coarse).search(sample, 1)
        fine = np.zeros((c, f, CODE_BYTES), dtype=np.uint8)
        for cell in range(c):
            members = sample[nearest[:, 0] == cell]
            fine[cell] = kmajority(members if len(members) else coarse[cell : cell + 1], f)
        return cls(coarse, fine)

    def assign(self, x: Codes, probes: int) -> tuple[Any, Any]:
        """The `probes` nearest leaves of each code, under its nearest coarse word:
        (distances (n, probes) int32, leaves (n, probes) int64); -1 where a coarse
        word has fewer fine words than `probes`."""
        n = len(x)
        f = self.fine.shape[1]
        k = min(probes, f)
        leaves = np.full((n, probes), -1, dtype=np.int64)
        distances = np.full((n, probes), np.iinfo(np.int32).max, dtype=np.int32)
        if n == 0:
            return distances, leaves
        _, nearest = self._coarse.search(x, 1)
        cells = nearest[:, 0]
        order = np.argsort(cells, kind="stable")
        keys, first = np.unique(cells[order], return_index=True)
        bounds = [*first.tolist(), n]
        for cell, lo, hi in zip(keys.tolist(), bounds[:-1], bounds[1:], strict=True):
            rows = order[lo:hi]
            d, j = self._fine[cell].search(x[rows], k)
            leaves[rows, :k] = cell * f + j
            distances[rows, :k] = d
        return distances, leaves


def _flat(codes: Codes) -> Any:
    flat = faiss.IndexBinaryFlat(BITS)
    flat.add(np.ascontiguousarray(codes))
    return flat
