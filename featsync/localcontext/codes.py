"""Descriptors as FAISS codes, and FAISS itself, set up for featsync.

AKAZE descriptors are 61 bytes; FAISS compares 64-byte codes in eight machine words,
so they are zero-padded to 64 (Hamming distances unchanged). Every featsync module
that uses FAISS takes it from here, so that it is set up before its first use.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from featsync.localcontext.features import DESCRIPTOR_BYTES

# OpenMP threads that wait by spinning take the CPU from everything else on a busy
# machine (measured with two other processes busy: building a 66,000-descriptor index
# took 7.7 s spinning, 0.33 s passive). The variable is read when FAISS loads OpenMP,
# just below. And one thread: featsync's searches are small (waking a second thread
# for each cost more than it saved: a search's p50 138 ms on a busy machine), and
# `featsync serve` answers several at once on its own threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss

faiss.omp_set_num_threads(1)

Codes = np.ndarray[Any, np.dtype[np.uint8]]

CODE_BYTES = 64  # descriptors padded to 512 bits
BITS = CODE_BYTES * 8


def pad(desc: Codes) -> Codes:
    """(n, 61) AKAZE descriptors as (n, 64), zero-padded (distances unchanged)."""
    out = np.zeros((len(desc), CODE_BYTES), dtype=np.uint8)
    out[:, :DESCRIPTOR_BYTES] = desc
    return out


__all__ = ["BITS", "CODE_BYTES", "Codes", "faiss", "pad"]
