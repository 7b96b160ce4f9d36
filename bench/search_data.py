"""The data of bench/search.py: real AKAZE descriptors of generated images, cached, and
the synthetic background images made from them; and the exhaustive matcher's answers
in a process pool, with the recall of the index's answers against them.

Every real image is ``featsync.samples.textured_image(seed, (640, 480))``; its stored
file is that image as a JPEG (Pillow's default quality, 75), and its descriptors are
``featsync.localcontext.features.extract`` of the file's bytes, as a sync would store
them. The sets, by seed:

- collection: seeds 0 .. R-1, stored;
- donors: seeds 1,000,000 + i (2,000 by default), never stored nor queried: their
  descriptors are the raw material of the synthetic images;
- unrelated: seeds 2,000,000 + i, never stored: they must match nothing;
- queries: copies of collection images picked at random (the picks are recorded), made
  from the decoded stored JPEG, each one of ``VARIANTS`` in turn; and, reported apart,
  rotated copies (``ROTATED``);
- planted duplicates: collection images picked at random, re-encoded (the decoded
  stored JPEG saved again as JPEG quality 90), stored under a second ID.

A synthetic image (``synthetic``) is ``SYNTHETIC_DESCRIPTORS`` descriptors drawn at
random (with replacement) from all the donors' descriptors, each with
``FLIPPED_BITS`` distinct random bits of its first 486 bits flipped. AKAZE's M-LDB
descriptor has 486 bits, packed least significant bit first into 61 bytes: the first
486 bits are bytes 0-59 and the low 6 bits of byte 60, and the top 2 bits of byte 60
(always 0) stay as AKAZE leaves them. Synthetic images are background only: never
queried, never counted as a right answer.

Each set is extracted in a process pool and cached under the cache folder as one
concatenated ``(n, 61)`` uint8 array and an offsets array (``np.save``), in files
named by the set's parameters, so a second run extracts nothing; seed ranges are
cached in chunks of ``CHUNK`` images, so an interrupted extraction keeps what it did.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from featsync.localcontext import features
from featsync.samples import encode, textured_image

SIZE = (640, 480)
DESCRIPTOR_BYTES = 61
AKAZE_BITS = 486
DONOR_BASE = 1_000_000
UNRELATED_BASE = 2_000_000
CHUNK = 500
SYNTHETIC_DESCRIPTORS = 500
FLIPPED_BITS = 24
DONORS = 2000  # images whose descriptors the synthetic ones are made of
SEED = 0

Descriptors = np.ndarray[Any, np.dtype[np.uint8]]


def stored_jpeg(seed: int) -> bytes:
    """The file a collection image is stored from."""
    return encode(textured_image(seed, SIZE), "JPEG")


def stored_pixels(seed: int) -> Image.Image:
    import io

    with Image.open(io.BytesIO(stored_jpeg(seed))) as img:
        return img.convert("RGB")


def _resize70_q75(img: Image.Image) -> bytes:
    w, h = img.size
    return encode(
        img.resize((w * 7 // 10, h * 7 // 10), Image.Resampling.LANCZOS), "JPEG", quality=75
    )


def _crop80_q85(img: Image.Image) -> bytes:
    w, h = img.size
    cw, ch = w * 8 // 10, h * 8 // 10
    left, top = (w - cw) // 2, (h - ch) // 2
    return encode(img.crop((left, top, left + cw, top + ch)), "JPEG", quality=85)


def _resize50_png(img: Image.Image) -> bytes:
    w, h = img.size
    return encode(img.resize((w // 2, h // 2), Image.Resampling.LANCZOS), "PNG")


def _rotate3_q85(img: Image.Image) -> bytes:
    return encode(
        img.rotate(3.0, Image.Resampling.BICUBIC, fillcolor=(255, 255, 255)), "JPEG", quality=85
    )


def _reencode_q90(img: Image.Image) -> bytes:
    return encode(img, "JPEG", quality=90)


VARIANTS: dict[str, Callable[[Image.Image], bytes]] = {
    "resized 70% + JPEG q75": _resize70_q75,
    "centre crop 80% + JPEG q85": _crop80_q85,
    "resized 50% PNG": _resize50_png,
}
ROTATED: dict[str, Callable[[Image.Image], bytes]] = {"rotated 3 deg + JPEG q85": _rotate3_q85}
_ALL = {**VARIANTS, **ROTATED, "re-encoded JPEG q90": _reencode_q90}


def _job(task: tuple[int, str]) -> Descriptors:
    """One image's descriptors: ("", seed) for a stored file, (variant, seed) for a copy."""
    seed, variant = task
    data = stored_jpeg(seed) if not variant else _ALL[variant](stored_pixels(seed))
    return features.extract(data, f"seed {seed} {variant}".strip())


@dataclass(frozen=True)
class DescSet:
    """Images' descriptors: image i is ``flat[offsets[i]:offsets[i + 1]]``."""

    flat: Descriptors
    offsets: np.ndarray[Any, np.dtype[np.int64]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Descriptors:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[Descriptors]:
        return (self[i] for i in range(len(self)))

    @classmethod
    def of(cls, parts: Sequence[Descriptors]) -> DescSet:
        counts = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(counts)])
        flat = np.concatenate(parts) if parts else np.zeros((0, DESCRIPTOR_BYTES), np.uint8)
        return cls(np.ascontiguousarray(flat, dtype=np.uint8), offsets)

    @classmethod
    def join(cls, sets: Sequence[DescSet]) -> DescSet:
        if len(sets) == 1:
            return sets[0]
        return cls.of([d for s in sets for d in s])


class Cache:
    """Descriptor sets on disk, named by their parameters; extracts what is missing."""

    def __init__(self, folder: str, jobs: int, log: Callable[[str], None] = print) -> None:
        self.folder = folder
        self.jobs = jobs
        self.log = log
        self.extract_seconds = 0.0  # wall-clock extraction in this run
        self.extracted = 0  # images extracted in this run
        self.made: dict[str, tuple[int, float]] = {}  # key: images, seconds when extracted
        os.makedirs(folder, exist_ok=True)

    def _paths(self, key: str) -> tuple[str, str, str]:
        base = os.path.join(self.folder, key)
        return f"{base}.desc.npy", f"{base}.offsets.npy", f"{base}.json"

    def get(self, key: str, tasks: list[tuple[int, str]]) -> DescSet:
        desc_path, off_path, meta_path = self._paths(key)
        if os.path.exists(meta_path):
            with open(meta_path, encoding="utf-8") as fh:
                meta = json.load(fh)
            self.made[key] = (int(meta["images"]), float(meta["seconds"]))
            return DescSet(np.load(desc_path), np.load(off_path))
        started = time.perf_counter()
        ctx = multiprocessing.get_context("forkserver")
        with ctx.Pool(self.jobs) as pool:
            parts = pool.map(_job, tasks, chunksize=4)
        took = time.perf_counter() - started
        self.extract_seconds += took
        self.extracted += len(tasks)
        found = DescSet.of(parts)
        for path, arr in ((desc_path, found.flat), (off_path, found.offsets)):
            with open(path + ".tmp", "wb") as fh:
                np.save(fh, arr)
            os.replace(path + ".tmp", path)
        meta = {"images": len(tasks), "descriptors": int(found.offsets[-1]), "seconds": took}
        with open(meta_path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(meta, fh)
        os.replace(meta_path + ".tmp", meta_path)
        self.made[key] = (len(tasks), took)
        self.log(f"  extracted {key}: {len(tasks)} images in {took:.1f} s")
        return found

    def seeds(self, name: str, first: int, count: int) -> DescSet:
        """Stored files' descriptors of seeds first .. first+count-1, in chunks."""
        w, h = SIZE
        sets = []
        for start in range(first, first + count, CHUNK):
            stop = min(start + CHUNK, first + count)
            key = f"{name}-{w}x{h}-{start}-{stop}"
            sets.append(self.get(key, [(s, "") for s in range(start, stop)]))
        return DescSet.join(sets)

    def copies(self, name: str, picks: list[tuple[int, str]], seed: int) -> DescSet:
        """Descriptors of copies, one per (source seed, variant) pick."""
        w, h = SIZE
        key = f"{name}-{w}x{h}-n{len(picks)}-s{seed}-{_digest(picks)}"
        return self.get(key, picks)


def _digest(picks: list[tuple[int, str]]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(picks).encode()).hexdigest()[:12]


def query_picks(
    collection: int, count: int, seed: int, variants: Sequence[str]
) -> list[tuple[int, str]]:
    """`count` distinct collection images picked at random, the variants in turn."""
    rng = np.random.default_rng([seed, collection, count, len(variants)])
    chosen = rng.choice(collection, size=min(count, collection), replace=False)
    return [(int(s), variants[n % len(variants)]) for n, s in enumerate(chosen)]


def planted_picks(collection: int, count: int, seed: int) -> list[int]:
    rng = np.random.default_rng([seed, collection, count, 90])
    return sorted(
        int(s) for s in rng.choice(collection, size=min(count, collection), replace=False)
    )


def synthetic(donors: Descriptors, index: int, seed: int) -> Descriptors:
    """Synthetic image `index` (deterministic): SYNTHETIC_DESCRIPTORS donor descriptors
    drawn at random, each with FLIPPED_BITS distinct bits of its first 486 flipped."""
    rng = np.random.default_rng([seed, index, 7])
    n = SYNTHETIC_DESCRIPTORS
    picked = donors[rng.integers(0, len(donors), size=n)]
    # FLIPPED_BITS distinct positions among the first 486 bits of each row: drawn
    # with replacement, a row with a repeat drawn again (uniform over the subsets).
    where = _distinct_positions(rng, n)
    bits = np.zeros((n, 8 * DESCRIPTOR_BYTES), np.uint8)
    np.put_along_axis(bits, where, 1, axis=1)
    mask = np.packbits(bits, axis=1, bitorder="little")
    return np.bitwise_xor(picked, mask)


def _distinct_positions(rng: np.random.Generator, n: int) -> np.ndarray[Any, np.dtype[np.intp]]:
    def draw(rows: int) -> np.ndarray[Any, np.dtype[np.intp]]:
        return np.sort(rng.integers(0, AKAZE_BITS, (rows, FLIPPED_BITS), dtype=np.intp), axis=1)

    pos = draw(n)
    again = np.flatnonzero((np.diff(pos, axis=1) == 0).any(axis=1))
    while len(again):
        redo = draw(len(again))
        pos[again] = redo
        again = again[(np.diff(redo, axis=1) == 0).any(axis=1)]
    return pos


def real_id(seed: int) -> str:
    return f"real/{seed:07d}.jpg"


def copy_id(seed: int) -> str:
    return f"copy/{seed:07d}.jpg"


@dataclass(frozen=True)
class Data:
    collection: DescSet
    donors: Descriptors
    queries: DescSet
    query_picks: list[tuple[int, str]]
    rotated: DescSet
    rotated_picks: list[tuple[int, str]]
    unrelated: DescSet
    planted: DescSet
    planted_seeds: list[int]


def load_data(cache: Cache, args: argparse.Namespace) -> Data:
    r = args.collection
    picks = query_picks(r, args.queries, SEED, list(VARIANTS))
    rotated = query_picks(r, args.rotated, SEED + 1, list(ROTATED))
    planted = planted_picks(r, args.planted, SEED)
    return Data(
        collection=cache.seeds("collection", 0, r),
        donors=cache.seeds("donors", DONOR_BASE, DONORS).flat,
        queries=cache.copies("queries", picks, SEED),
        query_picks=picks,
        rotated=cache.copies("rotated", rotated, SEED + 1),
        rotated_picks=rotated,
        unrelated=cache.seeds("unrelated", UNRELATED_BASE, args.unrelated),
        planted=cache.copies("planted", [(s, "re-encoded JPEG q90") for s in planted], SEED),
        planted_seeds=planted,
    )


def items(data: Data, total: int, planted: bool) -> Iterator[tuple[str, Descriptors]]:
    """The collection (and the planted copies), then synthetic images up to `total`."""
    n = 0
    for seed in range(len(data.collection)):
        yield real_id(seed), data.collection[seed]
        n += 1
    if planted:
        for i, seed in enumerate(data.planted_seeds):
            yield copy_id(seed), data.planted[i]
            n += 1
    for i in range(total - n):
        yield f"synth/{i:07d}", synthetic(data.donors, i, SEED)


# -- the exhaustive matcher, in a process pool --------------------------------------

_SUBSET: dict[str, Descriptors] = {}


def exhaustive_init(ids: list[str], flat: Descriptors, offsets: np.ndarray[Any, Any]) -> None:
    _SUBSET.clear()
    subset = DescSet(flat, offsets)
    _SUBSET.update((image_id, subset[n]) for n, image_id in enumerate(ids))


def exhaustive_part(
    task: tuple[Descriptors, list[str], float, int],
) -> list[tuple[str, float]]:
    """``matching.rank`` of a query over a part of the subset (one task per worker)."""
    from featsync.localcontext import matching

    query, ids, threshold, max_count = task
    return matching.rank(query, {i: _SUBSET[i] for i in ids}, threshold, max_count)


def exhaustive(
    subset: dict[str, Descriptors],
    queries: list[Descriptors],
    threshold: float,
    max_count: int,
    jobs: int,
) -> list[list[tuple[str, float]]]:
    """The exhaustive matcher's answer to each query over `subset`, the subset split
    among `jobs` processes."""
    ids = sorted(subset)
    packed = DescSet.of([subset[i] for i in ids])
    parts = [ids[n::jobs] for n in range(jobs)]
    tasks = [(q, part, threshold, max_count) for q in queries for part in parts]
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(jobs, exhaustive_init, (ids, packed.flat, packed.offsets)) as pool:
        found = pool.map(exhaustive_part, tasks, chunksize=1)
    out = []
    for n in range(len(queries)):
        hits = [h for part in found[n * jobs : (n + 1) * jobs] for h in part]
        hits.sort(key=lambda t: (-t[1], t[0]))
        out.append(hits[:max_count])
    return out


def recall(
    args: argparse.Namespace,
    data: Data,
    answers: list[list[tuple[str, float]]],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Recall of the index's answers (over every image) against the exhaustive matcher
    over the first --subset collection images, for the queries of those: no other
    stored image is a copy of a query's source, so the exhaustive answer over the
    whole store would be the same."""
    k = min(args.subset, len(data.collection))
    subset = {real_id(s): data.collection[s] for s in range(k)}
    picked = [n for n, (s, _) in enumerate(data.query_picks) if s < k]
    if not picked:
        return {}
    started = time.perf_counter()
    queries = [data.queries[n] for n in picked]
    unrelated = [
        data.unrelated[n] for n in range(min(args.exhaustive_unrelated, len(data.unrelated)))
    ]
    truth = exhaustive(subset, queries, args.threshold, args.max, args.jobs)
    if unrelated:
        truth += exhaustive(subset, unrelated, 0.0, 1, args.jobs)
    took = time.perf_counter() - started
    at1 = [
        bool(truth[i]) and bool(answers[n]) and answers[n][0][0] == truth[i][0][0]
        for i, n in enumerate(picked)
        if truth[i]
    ]
    wanted = sum(len(truth[i]) for i in range(len(picked)))
    found = sum(
        len({x for x, _ in truth[i]} & {x for x, _ in answers[n]}) for i, n in enumerate(picked)
    )
    mismatched = sum(
        1
        for i, n in enumerate(picked)
        for x, s in truth[i]
        for y, t in answers[n]
        if x == y and s != t
    )
    out = {
        "recall1": (sum(at1), len(at1)),
        "recall10": (found, wanted),
        "exhaustive_s": took,
        "exhaustive_unrelated": max((s for t in truth[len(picked) :] for _, s in t), default=0.0),
        "subset": k,
    }
    say(
        f"  exhaustive matcher over {k:,} images, {len(picked)} queries + {len(unrelated)} "
        f"unrelated: {took:.0f} s ({took / len(truth):.1f} s per query, {args.jobs} processes); "
        f"recall@1 {sum(at1)}/{len(at1)}, recall@10 {found}/{wanted}, similarities differing "
        f"{mismatched}; its highest similarity to an unrelated image: "
        f"{out['exhaustive_unrelated']:.2f}"
    )
    return out
