"""The cost of isolating feature extraction: a first sync against the raw extraction limit.

Builds a folder of textured 640x480 JPEGs (1,000 by default), then, in the same run
and alternating, times:

- the reference: the same files extracted by a bare ``ProcessPoolExecutor`` of
  ``nproc`` workers (each reads a file and runs decode + AKAZE; no ledger, no store);
- the first sync: ``featsync reconcile`` as a new process into a fresh ledger and a
  fresh embedded context (scan, hashing, worker processes with fd passing, the store,
  one ledger transaction per image, and the interpreter's start-up).

Prints images per second of each (best of N) and the ratio. Target: the first sync at
least 0.8x the reference.

    python bench/extract.py [--images 1000] [--runs 3] [--dir DIR --keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from featsync.samples import textured_bytes

TARGET = 0.8


def _extract_file(path: str) -> int:
    from featsync.localcontext import features

    with open(path, "rb") as fh:
        return len(features.extract(fh.read(), path))


def reference(paths: list[str], workers: int) -> float:
    """Seconds for a bare process pool to extract every file (pool start-up included,
    as the sync pays for its own)."""
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        total = sum(pool.map(_extract_file, paths, chunksize=8))
    took = time.perf_counter() - started
    assert total > 0
    return took


def first_sync(base: Path, images: Path) -> float:
    """Seconds for `featsync reconcile` into a fresh ledger and context."""
    run = base / "run"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    (run / "featsync.toml").write_text(
        f'[sync]\nfolder = "{images}"\n[log]\nlevel = "warning"\n', encoding="utf-8"
    )
    return timed_reconcile(str(run / "featsync.toml"))


def timed_reconcile(config_path: str) -> float:
    """Seconds `featsync reconcile --config CONFIG_PATH` takes as a new process."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "featsync", "reconcile", "--config", config_path],
        capture_output=True,
        text=True,
        check=False,
    )
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"featsync reconcile failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep --dir's images for a later run")
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="featsync-extract-bench-"))
    images = base / "images"
    if not (images.is_dir() and len(os.listdir(images)) == args.images):
        shutil.rmtree(images, ignore_errors=True)
        images.mkdir(parents=True)
        old = time.time() - 3600
        for n in range(args.images):
            p = images / f"img{n:05d}.jpg"
            p.write_bytes(textured_bytes(n, "JPEG", size=(640, 480)))
            os.utime(p, (old, old))
    paths = sorted(str(p) for p in images.iterdir())
    workers = os.cpu_count() or 1
    ref: list[float] = []
    sync: list[float] = []
    try:
        for _ in range(args.runs):
            ref.append(reference(paths, workers))
            sync.append(first_sync(base, images))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    n = len(paths)
    best_ref, best_sync = min(ref), min(sync)
    print(f"{n} images (640x480 JPEG), {workers} CPUs, best of {args.runs}")
    print(
        f"  reference: bare process pool of {workers}: {best_ref:7.2f} s  {n / best_ref:6.1f} img/s"
    )
    print(f"  featsync reconcile, first sync:     {best_sync:7.2f} s  {n / best_sync:6.1f} img/s")
    ratio = best_ref / best_sync
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"  first sync / reference: {ratio:.2f}x (target >= {TARGET}: {verdict})")
    print(f"  all runs: reference {[round(x, 2) for x in ref]}, sync {[round(x, 2) for x in sync]}")


if __name__ == "__main__":
    main()
