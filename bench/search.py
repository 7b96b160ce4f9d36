"""Indexed search in the embedded context at scale (issue 13), against the exhaustive matcher.

The data (bench/search_data.py says exactly how it is made; cached under --cache, so
a second run extracts nothing): real AKAZE descriptors of --collection generated
640x480 textured JPEGs (10,000 by default), the rest of the --images (100,000)
synthesised from the real descriptors of 2,000 other images (each synthetic image:
500 donor descriptors drawn at random, each with 24 random bits of its first 486
flipped; background only, never queried nor counted as an answer), --queries copies
of collection images (resized 70% + JPEG q75, centre crop 80% + JPEG q85, resized
50% PNG, in turn; rotated 3 degrees + JPEG q85 apart), --unrelated images of seeds
never stored, and --planted collection images stored a second time re-encoded (JPEG
q90). Then, in the same run:

- find-similar over --images: the first search (which builds the index from the
  store), every query's time (descriptors given: extraction excluded, and timed
  apart), whether its source image comes first, the highest similarity an unrelated
  image reaches; recall@1 and @10 against the exhaustive matcher
  (``matching.rank``) over the first --subset collection images, for the queries of
  those; close (which saves the index), then a new process (a restart) opens the store:
  its first search (the index loaded from its file), the same answers, its peak RSS;
- find-duplicates over --dup-images (the collection, the planted copies, synthetic
  images): the index's build, then the call's seconds, and every planted pair in one
  group; the exhaustive similarity of each planted pair beside the threshold;
- the index's memory per image (``index_info()["bytes"]``) and this process's peak
  RSS (which holds the benchmark's own arrays too);
- the sync: the first sync of --sync-images textured 640x480 JPEGs by
  ``featsync reconcile`` against ``featsync serve``, into a fresh context whose index
  was loaded by one findSimilar call before the sync and into one never searched,
  alternating, --sync-runs each; then the embedded reconcile and its first search.

Targets (issue 13): p50 <= 50 ms, p95 <= 150 ms, recall >= 0.99, no unrelated image at
or above the threshold, duplicates <= 60 s with every planted pair found, <= 40 KB of
index per image, the sync with the index loaded <= 1.10x the sync without.

    python -m bench.search [--images 100000] [--collection 10000] [--queries 300]
        [--unrelated 100] [--planted 100] [--subset 2000] [--dup-images 20000]
        [--sync-images 1000] [--sync-runs 3] [--jobs 2] [--cache DIR] [--dir DIR --keep]
        [--parts similar duplicates sync]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from bench import search_data as sd
from bench.search_data import Data, DescSet, copy_id, items, load_data, real_id
from bench.search_sync import sync_part, sync_rows
from featsync.localcontext.context import LocalContext

P50_MS, P95_MS, RECALL, DUP_S, KB_PER_IMAGE, SYNC_RATIO = 50.0, 150.0, 0.99, 60.0, 40.0, 1.10


def say(text: str = "") -> None:
    print(text, flush=True)


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: getrusage's ru_maxrss in a child started by
    fork and exec starts from its parent's)."""
    return _status_mb("VmHWM")


def filled(path: str, data: Data, total: int, planted: bool, key: str) -> float | None:
    """A store at `path` holding `total` images: reused when an earlier run with --keep
    left one made of the same data (None), else made anew (its load's seconds). The
    index file is removed either way: the first search builds it."""
    marker = path + ".complete"
    if os.path.exists(path + ".index"):
        os.remove(path + ".index")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as fh:
            if fh.read() == key:
                return None
    for suffix in ("", "-wal", "-shm", ".complete"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    ctx = LocalContext(path)
    try:
        started = time.perf_counter()
        added = ctx.load_descriptors(items(data, total, planted))
        took = time.perf_counter() - started
    finally:
        ctx.close()
    assert added == total, (added, total)
    if os.path.exists(path + ".index"):
        os.remove(path + ".index")
    with open(marker, "w", encoding="utf-8") as fh:
        fh.write(key)
    return took


def percentiles(ms: list[float]) -> tuple[float, float, float]:
    a = np.asarray(ms)
    return float(np.percentile(a, 50)), float(np.percentile(a, 95)), float(a.max())


def timed_answers(
    ctx: LocalContext, queries: DescSet, threshold: float, max_count: int
) -> tuple[list[float], list[list[tuple[str, float]]]]:
    ms, answers = [], []
    for q in queries:
        started = time.perf_counter()
        found = ctx.similar(q, threshold, max_count)
        ms.append((time.perf_counter() - started) * 1000)
        answers.append([(r.image_id, r.similarity) for r in found])
    return ms, answers


def query_extraction_ms(picks: list[tuple[int, str]], count: int) -> float:
    """Median time to extract a query copy's descriptors in this process (warm)."""
    from featsync.localcontext import features

    made = [sd.VARIANTS[v](sd.stored_pixels(s)) for s, v in picks[: count + 1]]
    features.extract(made[0], "warm-up")
    ms = []
    for data in made[1:]:
        started = time.perf_counter()
        features.extract(data, "query")
        ms.append((time.perf_counter() - started) * 1000)
    return float(np.median(ms))


def similar_part(args: argparse.Namespace, data: Data, base: str) -> dict[str, Any]:
    n, thr, top = args.images, args.threshold, args.max
    path = os.path.join(base, f"search-{n}.store")
    key = f"similar {n} {args.collection} {sd.DONORS} {sd.SEED}"
    say(
        f"\n== find-similar over {n:,} images ({len(data.collection):,} real, threshold {thr:g}, "
        f"max {top})"
    )
    loaded = filled(path, data, n, planted=False, key=key)
    if loaded is None:
        say("  store: reused from an earlier run (--keep)")
    else:
        say(f"  store: {n:,} images loaded by load_descriptors in {loaded:.1f} s")
    out: dict[str, Any] = {"store_bytes": os.path.getsize(path)}
    rss_before = rss_mb()
    ctx = LocalContext(path)
    started = time.perf_counter()
    ctx.similar(data.queries[0], thr, top)
    out["build_s"] = time.perf_counter() - started
    info = ctx.index_info()
    out["info"] = info
    out["rss_index_mb"] = rss_mb() - rss_before
    say(
        f"  first search, index built from the store: {out['build_s']:.1f} s; "
        f"RSS +{out['rss_index_mb']:.0f} MiB; index_info: {info}"
    )
    ms, answers = timed_answers(ctx, data.queries, thr, top)
    out["ms"] = percentiles(ms)
    truth = [real_id(s) for s, _ in data.query_picks]
    first = [bool(a) and a[0][0] == t for a, t in zip(answers, truth, strict=True)]
    out["first"] = (sum(first), len(first))
    say(
        f"  {len(ms)} queries: p50 {out['ms'][0]:.1f} ms, p95 {out['ms'][1]:.1f} ms, max "
        f"{out['ms'][2]:.1f} ms; source image first: {sum(first)}/{len(first)}"
    )
    for variant in sd.VARIANTS:
        got = [f for f, (_, v) in zip(first, data.query_picks, strict=True) if v == variant]
        sims = [
            a[0][1]
            for a, (_, v) in zip(answers, data.query_picks, strict=True)
            if a and v == variant
        ]
        say(
            f"    {variant}: first {sum(got)}/{len(got)}, its similarity min "
            f"{min(sims, default=0):.1f}"
        )
    rms, rot = timed_answers(ctx, data.rotated, thr, top)
    rtruth = [real_id(s) for s, _ in data.rotated_picks]
    out["rotated"] = (
        sum(bool(a) and a[0][0] == t for a, t in zip(rot, rtruth, strict=True)),
        len(rot),
    )
    if rot:
        say(
            f"  {len(rot)} rotated copies ({next(iter(sd.ROTATED))}): source first "
            f"{out['rotated'][0]}/{len(rot)}, p50 {percentiles(rms)[0]:.1f} ms"
        )
    _, unrel = timed_answers(ctx, data.unrelated, 0.0, top)
    out["unrelated_max"] = max((s for a in unrel for _, s in a), default=0.0)
    say(
        f"  {len(unrel)} unrelated images, threshold 0: the highest similarity any stored "
        f"image reaches: {out['unrelated_max']:.2f}"
    )
    out["extract_ms"] = query_extraction_ms(data.query_picks, 20)
    say(f"  a query's extraction (this process, median of 20): {out['extract_ms']:.0f} ms")
    out.update(sd.recall(args, data, answers, say))
    out["peak_rss_mb"] = peak_rss_mb()
    started = time.perf_counter()
    ctx.close()
    out["close_s"] = time.perf_counter() - started
    out["index_file_bytes"] = (
        os.path.getsize(path + ".index") if os.path.exists(path + ".index") else 0
    )
    del ctx
    restarted = restart(path, data.queries, thr, top, base)
    out.update(restarted)
    again = restarted["answers"]
    same = sum(a == b for a, b in zip(answers, again, strict=True))
    out["same_after_restart"] = (same, len(answers))
    say(
        f"  close (saves the index, {out['index_file_bytes'] / 1e6:.0f} MB): "
        f"{out['close_s']:.1f} s; a new process opened it, its first search "
        f"({out['reload_source']}): {out['reload_s']:.2f} s; same answers {same}/{len(answers)}; "
        f"that process's RSS {out['rss_start_mb']:.0f} MiB before it, "
        f"peak {out['reload_peak_mb']:.0f} MiB"
    )
    return out


def restart(
    path: str, queries: DescSet, threshold: float, max_count: int, base: str
) -> dict[str, Any]:
    """The store reopened by a new process (a restart): its first search's seconds (the
    index loaded from its file), the answers to `queries`, its RSS and peak RSS."""
    qpath = os.path.join(base, "restart-queries.npz")
    np.savez(qpath, flat=queries.flat, offsets=queries.offsets)
    code = (
        f"import bench.search as b; b.restarted({path!r}, {qpath!r}, {threshold!r}, {max_count!r})"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the restarted process failed:\n{done.stderr[-2000:]}")
    for line in (done.stdout + done.stderr).splitlines():
        if "index_" in line and not line.startswith(
            "{"
        ):  # the index's own events (index_loaded: where it came from)
            say(f"    restarted process: {line.strip()}")
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    found["answers"] = [[(i, s) for i, s in a] for a in found["answers"]]
    return found


def restarted(path: str, qpath: str, threshold: float, max_count: int) -> None:
    """In the new process: prints one JSON line for `restart`."""
    with np.load(qpath) as q:
        queries = DescSet(q["flat"], q["offsets"])
    out: dict[str, Any] = {"rss_start_mb": rss_mb()}
    ctx = LocalContext(path)
    try:
        started = time.perf_counter()
        ctx.similar(queries[0], threshold, max_count)
        out["reload_s"] = time.perf_counter() - started
        out["reload_source"] = ctx.index_info()["source"]
        _, out["answers"] = timed_answers(ctx, queries, threshold, max_count)
    finally:
        ctx.close()
    out["reload_peak_mb"] = peak_rss_mb()
    print(json.dumps(out))


def duplicates_part(args: argparse.Namespace, data: Data, base: str) -> dict[str, Any]:
    from featsync.localcontext import matching

    n = args.dup_images
    path = os.path.join(base, f"duplicates-{n}.store")
    key = f"duplicates {n} {args.collection} {args.planted} {sd.DONORS} {sd.SEED}"
    pairs = [
        matching.similarity(data.collection[s], data.planted[i])
        for i, s in enumerate(data.planted_seeds)
    ]
    thr = args.dup_threshold
    say(
        f"\n== find-duplicates over {n:,} images ({len(data.collection):,} real, "
        f"{len(data.planted_seeds)} of them stored twice, the rest synthetic), threshold {thr:g}"
    )
    say(
        f"  the planted pairs by the exhaustive matcher: min {min(pairs):.2f}, median "
        f"{float(np.median(pairs)):.2f}, max {max(pairs):.2f} (threshold {thr:g}: "
        f"{sum(p >= thr for p in pairs)}/{len(pairs)} at or above it)"
    )
    loaded = filled(path, data, n, planted=True, key=key)
    if loaded is not None:
        say(f"  store: {n:,} images loaded by load_descriptors in {loaded:.1f} s")
    out: dict[str, Any] = {"pairs_min": min(pairs), "threshold": thr}
    ctx = LocalContext(path)
    try:
        started = time.perf_counter()
        info = ctx.index_info()
        out["build_s"] = time.perf_counter() - started
        started = time.perf_counter()
        groups = ctx.find_duplicates(thr)
        out["dup_s"] = time.perf_counter() - started
    finally:
        ctx.close()
    members = [{r.image_id for r in g} for g in groups]
    group_of = {i: n for n, g in enumerate(members) for i in g}
    found = sum(
        1
        for s in data.planted_seeds
        if group_of.get(real_id(s), -1) == group_of.get(copy_id(s), -2)
    )
    expected = [{real_id(s), copy_id(s)} for s in data.planted_seeds]
    other = [g for g in members if g not in expected]
    out["found"] = (found, len(data.planted_seeds))
    out["groups"], out["other"] = len(groups), len(other)
    say(
        f"  index built (index_info, {info.get('images')} images): {out['build_s']:.1f} s; "
        f"find_duplicates: {out['dup_s']:.1f} s, {len(groups)} groups; planted pairs in one "
        f"group: {found}/{len(data.planted_seeds)}; other groups: {len(other)}"
        + (f" (first: {sorted(other[0])[:4]})" if other else "")
    )
    return out


Row = tuple[str, str, str, bool | None]  # what, value, target, met


def share(pair: tuple[int, int]) -> str:
    return f"{pair[0] / max(1, pair[1]):.3f} ({pair[0]}/{pair[1]})"


def per_image(mib: float, images: int) -> str:
    return f"{mib:.0f} MiB ({mib * 1024 / images:.1f} KiB per image)"


def similar_rows(sim: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    (p50, p95, top), thr = sim["ms"], args.threshold
    first, same = sim["first"], sim["same_after_restart"]
    images = max(1, int(sim["info"]["images"]))
    kb = float(sim["info"]["bytes"]) / images / 1024
    grown = sim["reload_peak_mb"] - sim["rss_start_mb"]
    rows: list[Row] = [
        (
            f"find-similar p50, {args.images:,} images",
            f"{p50:.1f} ms",
            f"<= {P50_MS:g}",
            p50 <= P50_MS,
        ),
        ("find-similar p95 / max", f"{p95:.1f} / {top:.1f} ms", f"<= {P95_MS:g}", p95 <= P95_MS),
        ("a query's extraction (apart)", f"{sim['extract_ms']:.0f} ms", "", None),
        ("source image first", f"{first[0]}/{first[1]}", "all", first[0] == first[1]),
    ]
    for k, name in (("recall1", "recall@1"), ("recall10", "recall@10")):
        if k in sim:
            ok = sim[k][0] >= RECALL * sim[k][1]
            rows.append((f"{name} vs exhaustive", share(sim[k]), f">= {RECALL}", ok))
    worst = sim["unrelated_max"]
    rows += [
        ("highest similarity, unrelated image", f"{worst:.2f}", f"< {thr:g}", worst < thr),
        ("index built from the store", f"{sim['build_s']:.1f} s", "", None),
        ("index loaded by a new process (restart)", f"{sim['reload_s']:.2f} s", "", None),
        ("same answers after it", f"{same[0]}/{same[1]}", "all", same[0] == same[1]),
        (
            "index memory per image (index_info)",
            f"{kb:.1f} KiB",
            f"<= {KB_PER_IMAGE:g}",
            kb <= KB_PER_IMAGE,
        ),
        ("RSS growth as the index was built", per_image(sim["rss_index_mb"], images), "", None),
        ("peak RSS (with the bench's arrays)", f"{sim['peak_rss_mb']:.0f} MiB", "", None),
        ("a restarted process, peak RSS over its start", per_image(grown, images), "", None),
    ]
    return rows


def duplicates_rows(dup: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    what = f"find-duplicates, {args.dup_images:,} images, threshold {dup['threshold']:g}"
    found = dup["found"]
    return [
        (what, f"{dup['dup_s']:.1f} s", f"<= {DUP_S:g} s", dup["dup_s"] <= DUP_S),
        ("planted pairs in one group", f"{found[0]}/{found[1]}", "all", found[0] == found[1]),
    ]


def table(rows: list[Row]) -> None:
    say("\n| measured | value | target | |\n|---|---:|---|---|")
    for what, value, target, ok in rows:
        met = "" if ok is None else "met" if ok else "NOT met"
        say(f"| {what} | {value} | {target} | {met} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000, help="images in the find-similar store")
    ap.add_argument("--collection", type=int, default=10_000, help="real images stored")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--rotated", type=int, default=100)
    ap.add_argument("--unrelated", type=int, default=100)
    ap.add_argument("--planted", type=int, default=100)
    ap.add_argument("--subset", type=int, default=2000, help="images the exhaustive matcher sees")
    ap.add_argument("--exhaustive-unrelated", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=60.0)
    ap.add_argument("--max", type=int, default=10)
    ap.add_argument("--dup-images", type=int, default=20_000)
    ap.add_argument("--dup-threshold", type=float, default=90.0)
    ap.add_argument("--sync-images", type=int, default=1000)
    ap.add_argument("--sync-runs", type=int, default=3)
    ap.add_argument(
        "--jobs", type=int, default=2, help="processes extracting, and matching exhaustively"
    )
    ap.add_argument(
        "--cache",
        default=os.path.join(tempfile.gettempdir(), "featsync-bench-search"),
        help="descriptor cache folder",
    )
    ap.add_argument(
        "--dir", default=None, help="stores and images (a temporary folder if not given)"
    )
    ap.add_argument("--keep", action="store_true", help="keep --dir's stores for a later run")
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["similar", "duplicates", "sync"],
        choices=["similar", "duplicates", "sync"],
    )
    args = ap.parse_args()
    if args.collection > args.images or args.collection + args.planted > args.dup_images:
        raise SystemExit("--collection (with --planted) must fit in --images and --dup-images")
    if args.collection >= sd.DONOR_BASE:
        raise SystemExit(f"--collection must be under {sd.DONOR_BASE:,} (the donors' seeds)")
    base = args.dir or tempfile.mkdtemp(prefix="featsync-search-bench-")
    os.makedirs(base, exist_ok=True)
    say(f"{os.cpu_count()} CPUs; descriptors cached in {args.cache}; stores in {base}")
    cache = sd.Cache(args.cache, args.jobs, say)
    data = load_data(cache, args)
    images = sum(i for i, _ in cache.made.values())
    secs = sum(s for _, s in cache.made.values())
    per_image = np.diff(data.collection.offsets).mean()
    say(
        f"data: {images:,} real images' descriptors (collection {len(data.collection):,}, "
        f"{int(data.collection.offsets[-1]):,} descriptors, {per_image:.0f} per image); "
        f"their extraction took {secs:.0f} s in {args.jobs} processes "
        f"({cache.extracted:,} extracted in this run, {cache.extract_seconds:.0f} s)"
    )
    rows: list[Row] = []
    try:
        if "similar" in args.parts:
            rows += similar_rows(similar_part(args, data, base), args)
        if "duplicates" in args.parts:
            rows += duplicates_rows(duplicates_part(args, data, base), args)
        if "sync" in args.parts:
            rows += sync_rows(sync_part(args, base), args)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    table(rows)


if __name__ == "__main__":
    main()
