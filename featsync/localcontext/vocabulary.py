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
        sums = np.zeros((words, BITS), dtype=np.float32)
        counts = np.bincount(assigned, minlength=words)
        for start in range(0, n, 8192):  # unpacked bits: 512 floats a descriptor
            part = assigned[start : start + 8192]
            bits = np.unpackbits(sample[start : start + 8192], axis=1).astype(np.float32)
            members = np.zeros((words, len(part)), dtype=np.float32)
            members[part, np.arange(len(part))] = 1.0
            sums += members @ bits  # each word's members' bits summed (exact: < 2**24)
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
        c, f = fine.shape[0], fine.shape[1]
        # The tree as FAISS's own two-level search: an inverted file whose lists are
        # the coarse words and whose entries are each one's fine words (their leaf
        # numbers as IDs): one call assigns every code, a Python loop per coarse
        # word did not (1.5 ms an image, most of what an add cost).
        self._coarse = _flat(coarse)
        self._leaves = faiss.IndexBinaryIVF(self._coarse, BITS, c)
        self._leaves.is_trained = True
        self._leaves.nprobe = 1
        codes = np.ascontiguousarray(fine.reshape(-1, CODE_BYTES))
        ids = np.arange(c * f, dtype=np.int64)
        lists = np.repeat(np.arange(c, dtype=np.int64), f)
        self._leaves.add_core(  # type: ignore[attr-defined]
            len(codes), faiss.swig_ptr(codes), faiss.swig_ptr(ids), faiss.swig_ptr(lists)
        )

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
        if len(x) == 0:
            return np.zeros((0, probes), np.int32), np.zeros((0, probes), np.int64)
        distances, leaves = self._leaves.search(np.ascontiguousarray(x), probes)
        return distances, leaves


def _flat(codes: Codes) -> Any:
    flat = faiss.IndexBinaryFlat(BITS)
    flat.add(np.ascontiguousarray(codes))
    return flat
