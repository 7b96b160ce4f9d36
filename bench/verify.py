"""`verify --all` against `featsync serve` with injected latency, against the ideal.

Starts `featsync serve --latency 0.05` on a free loopback port, makes a search
context, and fills its store and a ledger directly with synthetic rows (10,000 by
default: extracting that many real images would take minutes and measure the
extractor, not verify): each image holds `--descriptors` random 61-byte descriptors
(200 by default, 12 KiB; a 320x240 photo has about 500) and the ledger records the
same count, so every image is checked and none drifts. Then, in the same run:

- verify: featsync.verify's check of every image (the ledger read a page at a time,
  the GETs from a pool of `--concurrency` threads, the orphan listing), in process;
- reference: a bare `requests` session and a thread pool of the same size doing the
  same GETs (token, URL, JSON body read), nothing else.

Prints GET/s of each, the ideal ``concurrency / latency`` and the shares; the target
is verify at >= 85% of the ideal.

    python bench/verify.py [--images 10000] [--concurrency 16] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import requests
import structlog

from bench.http_throughput import CLIENT_ID, CLIENT_SECRET, new_context_id, remote, serving
from featsync import config, verify
from featsync.aspose import API
from featsync.ledger import SqlLedger
from featsync.schema import images
from featsync.wiring import open_context

TARGET = 0.85
DESCRIPTOR_BYTES = 61


def fill_store(store: Path, n: int, descriptors: int) -> None:
    """Synthetic features rows, straight into the served context's store file."""
    blob = os.urandom(descriptors * DESCRIPTOR_BYTES)
    with sqlite3.connect(store) as db:
        db.executemany(
            "INSERT INTO features VALUES (?, ?, ?, 0)",
            ((f"img/{i:06}.jpg", descriptors, blob) for i in range(n)),
        )


def fill_ledger(ledger: SqlLedger, n: int, descriptors: int) -> None:
    now = time.time()
    rows = [
        {
            "image_id": f"img/{i:06}.jpg",
            "size": 1,
            "mtime_ns": 1,
            "inode": i,
            "digest": f"{i:064x}",
            "version": 1,
            "state": "synced",
            "remote": True,
            "attempts": 0,
            "features_count": descriptors,
            "created_at": now,
            "updated_at": now,
            "relpath": f"img/{i:06}.jpg",
        }
        for i in range(n)
    ]
    with ledger.engine.begin() as conn:
        conn.execute(images.insert(), rows)


def reference(url: str, context_id: str, n: int, concurrency: int) -> float:
    """The same GETs with a bare requests session and a thread pool: seconds."""
    s = requests.Session()
    s.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=concurrency)
    s.mount("http://", adapter)
    token = s.post(
        f"{url}/connect/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    ).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    base = f"{url}/v3.0{API}/{context_id}/features?imageId="

    def get(i: int) -> int:
        r = s.get(base + quote(f"img/{i:06}.jpg", safe=""), headers=headers)
        r.json()
        return r.status_code

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        statuses = set(pool.map(get, range(n)))
    secs = time.perf_counter() - t
    s.close()
    assert statuses == {200}, statuses
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--descriptors", type=int, default=200)
    args = ap.parse_args()
    with serving("featsync-verify-bench-", args.latency, args.concurrency + 4) as (base, url):
        context_id = new_context_id(url, base)
        settings = config.parse(
            {
                "sync": {"folder": str(base / "images"), "concurrency": args.concurrency},
                "ledger": {"url": f"sqlite:///{base / 'ledger.db'}"},
                "context": {**remote(url), "context_id": context_id, "trust_env": False},
                "log": {"level": "warning"},
            },
            str(base),
            str(base / "featsync.toml"),
        )
        fill_store(base / "serve" / f"{context_id}.search", args.images, args.descriptors)
        ledger = SqlLedger(settings.ledger.url)
        fill_ledger(ledger, args.images, args.descriptors)
        bound = open_context(settings)
        ledger.bind_context(bound.identity())  # as a first reconcile would
        bound.close()
        ledger.close()
        print(
            f"{args.images} images of {args.descriptors} descriptors "
            f"({args.descriptors * DESCRIPTOR_BYTES / 1024:.1f} KiB), concurrency "
            f"{args.concurrency}, {args.latency * 1000:.0f} ms latency, server {url}\n"
        )
        ideal = args.concurrency / args.latency
        cpu, t = time.process_time(), time.perf_counter()
        found = verify._check(settings, None, structlog.get_logger())
        secs, cpu = time.perf_counter() - t, time.process_time() - cpu
        assert found.checked == args.images and not found.drifts, found
        assert not found.unverified and found.listed is True, found
        rate = args.images / secs
        ref = args.images / reference(url, context_id, args.images, args.concurrency)
        print(f"{'':<10} {'GET/s':>8} {'ideal':>7} {'share':>6}")
        print(f"{'verify':<10} {rate:>8.1f} {ideal:>7.1f} {rate / ideal:>6.0%}")
        print(f"{'reference':<10} {ref:>8.1f} {ideal:>7.1f} {ref / ideal:>6.0%}")
        print(
            f"\nverify: {secs:.1f} s for {args.images} GETs (and the orphan listing), client "
            f"CPU {cpu / args.images * 1000:.2f} ms per image; verify / reference "
            f"{rate / ref:.0%}"
        )
        verdict = "meets" if rate / ideal >= TARGET else "MISSES"
        print(f"verify at {rate / ideal:.0%} of the ideal ({verdict} the target >= {TARGET:.0%})")


if __name__ == "__main__":
    main()
