"""No-change rescan cost against `find`, measured in the same run.

Builds a tree of small image files (100,000 by default), syncs it once into the
embedded context with a real reconcile, then times, best of several runs each:

  find      find DIR -type f -printf '%s %T@ %i\\n'  (the reference)
  walk      a plain os.scandir + stat walk in Python (what any rescan must at least do)
  rescan    one no-change featsync cycle in process: ledger load, scan, plan, record
  command   `featsync reconcile` as a new process (adds interpreter start and imports)

and prints each as a ratio to `find`. Target: rescan <= 2.5x find.

    python bench/rescan.py [--files 100000] [--dir /tmp/featsync-bench] [--keep]

With --dir pointing at a tree kept by an earlier run (--keep), the build and the
first reconcile are skipped.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from PIL import Image

from featsync import config
from featsync.engine import Engine
from featsync.ledger import SqlLedger
from featsync.wiring import open_context

TARGET = 2.5


def tiny_png(n: int) -> bytes:
    """A distinct 8x8 PNG: decodable, a few hundred bytes."""
    img = Image.new("RGB", (8, 8), ((n * 7) % 256, (n * 13) % 256, (n * 29) % 256))
    img.putpixel((n % 8, (n // 8) % 8), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def build(base: Path, files: int) -> Path:
    images = base / "images"
    images.mkdir(parents=True)
    per_dir = 1000
    old = time.time() - 3600  # older than the racy window, as on a real folder
    for n in range(files):
        d = images / f"d{n // per_dir:04d}"
        if n % per_dir == 0:
            d.mkdir()
        p = d / f"img{n:07d}.png"
        p.write_bytes(tiny_png(n))
        os.utime(p, (old, old))
    (base / "featsync.toml").write_text('[sync]\nfolder = "images"\n[log]\nlevel = "warning"\n')
    return images


def best_of(runs: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def walk(root: str) -> int:
    count = 0
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                else:
                    e.stat(follow_symlinks=False)
                    count += 1
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dir", default=None, help="where to build the tree (default: a temp dir)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--keep", action="store_true", help="keep the tree afterwards (a later run reuses it)"
    )
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="featsync-bench-"))
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    try:
        images = base / "images"
        if (base / "featsync.toml").exists():
            print(f"reusing the tree under {images}")
        else:
            t = time.perf_counter()
            build(base, args.files)
            print(f"built {args.files} files in {time.perf_counter() - t:.1f} s under {images}")
        settings = config.load(str(base / "featsync.toml"))
        ledger = SqlLedger(settings.ledger.url)
        ctx = open_context(settings)
        engine = Engine(settings, ledger, ctx, structlog.get_logger())
        t = time.perf_counter()
        first = engine.cycle()
        assert first.applied is not None
        print(
            f"first reconcile: {first.applied.added} added, {first.applied.failed} failed, "
            f"{first.plan.unchanged} unchanged in {time.perf_counter() - t:.1f} s"
        )

        def rescan() -> None:
            report = engine.cycle()
            assert report.applied is not None and report.plan.unchanged == args.files
            assert report.applied.added == report.applied.updated == 0

        find_cmd = ["find", str(images), "-type", "f", "-printf", r"%s %T@ %i\n"]
        results = {
            "find": best_of(
                args.runs, lambda: subprocess.run(find_cmd, stdout=subprocess.DEVNULL, check=True)
            ),
            "walk": best_of(args.runs, lambda: walk(str(images))),
            "rescan": best_of(args.runs, rescan),
            "command": best_of(
                3,
                lambda: subprocess.run(
                    [sys.executable, "-m", "featsync", "reconcile"],
                    cwd=base,
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
            ),
        }
        ctx.close()
        ledger.close()
        ref = results["find"]
        print(f"\nno-change rescan of {args.files} files, best of {args.runs}:")
        for name, secs in results.items():
            print(f"  {name:<8} {secs * 1000:8.1f} ms   {secs / ref:5.2f}x find")
        verdict = "meets" if results["rescan"] / ref <= TARGET else "MISSES"
        print(f"\nrescan / find = {results['rescan'] / ref:.2f} ({verdict} the target <= {TARGET})")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
