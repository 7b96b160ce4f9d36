"""The cost of backups: a sync of 1,000 updates against `featsync serve`, with backups
off, on (the default), and on with image copies, in the same run.

Starts `featsync serve` with 50 ms of injected latency, builds a folder of small
textured images (so that extraction on the server does not hide what is measured),
and for each mode syncs the folder into a fresh context with a fresh ledger (adds, not
timed), rewrites every image, and times the sync of the 1,000 updates. Prints the
calls by kind, the time, and the ratio against backups off. A backup is one GET per
update, made by the same worker before its PUT: expect about two calls' latency per
update instead of one, so the ratio is near 2 on a latency-bound link, and the disk
cost of the store and the copies is small beside it.

    python bench/backups.py [--images 1000] [--latency 0.05] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.http_throughput import new_context_id, remote, serving
from featsync import config
from featsync.engine import Engine
from featsync.ledger import SqlLedger
from featsync.samples import textured_bytes
from featsync.wiring import open_context

MODES = {"off": {"enabled": False}, "on": {}, "on + images": {"images": True}}


class Counting:
    """The Aspose client, counting the calls made through it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name in ("add_features", "update_features", "delete_features", "get_features"):

            def counted(*args: Any, **kw: Any) -> Any:
                self.calls[name] += 1
                return attr(*args, **kw)

            return counted
        return attr


def _write(images: Path, n: int, seed0: int) -> None:
    old = time.time() - 3600
    for i in range(n):
        p = images / f"img{i:05d}.png"
        p.write_bytes(textured_bytes(seed0 + i, "PNG", size=(64, 64)))
        os.utime(p, (old, old))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    with serving("featsync-backup-bench-", args.latency, args.concurrency + 4) as (base, url):
        print(
            f"{args.images} updates, {args.latency * 1000:.0f} ms latency, "
            f"concurrency {args.concurrency}, server {url}\n"
        )
        print(f"{'backups':>12} {'seconds':>8} {'ratio':>6} {'PUT':>6} {'GET':>6} {'store':>10}")
        reference = None
        for mode, backup in MODES.items():
            run = base / mode.replace(" ", "")
            images = run / "images"
            images.mkdir(parents=True)
            _write(images, args.images, 0)
            context_id = new_context_id(url, run)
            settings = config.parse(
                {
                    "sync": {"folder": str(images), "concurrency": args.concurrency},
                    "ledger": {"url": f"sqlite:///{run / 'ledger.db'}"},
                    "context": {**remote(url), "context_id": context_id, "trust_env": False},
                    "backup": {"path": str(run / "backups"), **backup},
                    "log": {"level": "warning"},
                },
                str(run),
                str(run / "featsync.toml"),
            )
            ledger = SqlLedger(settings.ledger.url)
            ctx = Counting(open_context(settings))
            log = structlog.get_logger()
            first = Engine(settings, ledger, ctx, log).cycle()
            assert first.applied is not None and first.applied.added == args.images, first
            _write(images, args.images, 100_000)
            ctx.calls.clear()
            t = time.perf_counter()
            report = Engine(settings, ledger, ctx, log).cycle()
            secs = time.perf_counter() - t
            ctx.close()
            ledger.close()
            assert report.applied is not None and report.applied.updated == args.images, report
            reference = reference or secs
            store = sum(f.stat().st_size for f in (run / "backups").rglob("*") if f.is_file())
            print(
                f"{mode:>12} {secs:>8.2f} {secs / reference:>6.2f} "
                f"{ctx.calls['update_features']:>6} {ctx.calls['get_features']:>6} "
                f"{store / 1e6:>7.1f} MB"
            )


if __name__ == "__main__":
    main()
