"""Calls per second of a reconcile against `featsync serve`, against the ideal.

Starts `featsync serve` with 50 ms of injected latency on a free loopback port,
builds a folder of small textured images (2,000 by default: small so that feature
extraction on the server does not hide what is measured), and for each concurrency
(1, 4, 8, 16) reconciles the folder into a fresh search context with a fresh
ledger. Prints calls per second, the share of the ideal ``concurrency / latency``,
and the client's CPU time per call. Target: at least 85% of ideal up to 16.

    python bench/http_throughput.py [--images 2000] [--latency 0.05] [--concurrency 1 4 8 16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from featsync import config
from featsync.engine import Engine
from featsync.ledger import SqlLedger
from featsync.samples import textured_bytes
from featsync.wiring import open_context

TARGET = 0.85
CLIENT_ID, CLIENT_SECRET = "bench", "bench-secret"


def start_server(data: Path, latency: float, threads: int) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, FEATSYNC_CLIENT_ID=CLIENT_ID, FEATSYNC_CLIENT_SECRET=CLIENT_SECRET)
    proc = subprocess.Popen(
        [sys.executable, "-m", "featsync", "serve", "--port", "0", "--data", str(data),
         "--latency", str(latency), "--threads", str(threads), "--log-format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("serving on "):
                return proc, line.split()[-1]
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("featsync serve did not start")


@contextlib.contextmanager
def serving(prefix: str, latency: float, threads: int) -> Iterator[tuple[Path, str]]:
    """A scratch folder and `featsync serve` (with `latency`) on a free port, the
    credentials in the environment and structlog quiet; both gone afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    os.environ["FEATSYNC_CLIENT_ID"], os.environ["FEATSYNC_CLIENT_SECRET"] = (
        CLIENT_ID,
        CLIENT_SECRET,
    )
    server, url = start_server(base / "serve", latency, threads)
    try:
        yield base, url
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


def remote(url: str) -> dict[str, Any]:
    """The [context] of a config pointing at `featsync serve` at `url`."""
    return {"kind": "aspose", "base_url": f"{url}/v3.0", "auth_url": f"{url}/connect/token"}


def new_context_id(url: str, folder: Path) -> str:
    maker = open_context(config.parse({"context": remote(url)}, str(folder)))
    try:
        return maker.create_context()  # type: ignore[attr-defined, no-any-return]
    finally:
        maker.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    args = ap.parse_args()
    with serving("featsync-http-bench-", args.latency, max(args.concurrency) + 4) as (base, url):
        images = base / "images"
        images.mkdir()
        old = time.time() - 3600
        for n in range(args.images):
            p = images / f"img{n:05d}.png"
            p.write_bytes(textured_bytes(n, "PNG", size=(64, 64)))
            os.utime(p, (old, old))
        print(f"{args.images} images, {args.latency * 1000:.0f} ms latency, server {url}\n")
        print(
            f"{'concurrency':>11} {'calls/s':>8} {'ideal':>7} {'share':>6} {'client CPU/call':>16}"
        )
        worst = 1.0
        for conc in args.concurrency:
            run = base / f"c{conc}"
            run.mkdir()
            context_id = new_context_id(url, run)
            settings = config.parse(
                {
                    "sync": {"folder": str(images), "concurrency": conc},
                    "ledger": {"url": f"sqlite:///{run / 'ledger.db'}"},
                    "context": {**remote(url), "context_id": context_id, "trust_env": False},
                    "log": {"level": "warning"},
                },
                str(run),
                str(run / "featsync.toml"),
            )
            ledger = SqlLedger(settings.ledger.url)
            ctx = open_context(settings)
            cpu, t = time.process_time(), time.perf_counter()
            report = Engine(settings, ledger, ctx, structlog.get_logger()).cycle()
            secs, cpu = time.perf_counter() - t, time.process_time() - cpu
            ctx.close()
            ledger.close()
            assert report.applied is not None and report.applied.added == args.images, report
            rate, ideal = args.images / secs, conc / args.latency
            worst = min(worst, rate / ideal)
            print(
                f"{conc:>11} {rate:>8.1f} {ideal:>7.1f} {rate / ideal:>6.0%} "
                f"{cpu / args.images * 1000:>13.2f} ms"
            )
        verdict = "meets" if worst >= TARGET else "MISSES"
        print(f"\nlowest share {worst:.0%} ({verdict} the target >= {TARGET:.0%})")


if __name__ == "__main__":
    main()
