"""bench/search.py's sync part: what a loaded index costs the first sync.

The first sync of --sync-images textured 640x480 JPEGs by ``featsync reconcile`` (a new
process) against ``featsync serve`` (no injected latency), each time into a fresh
context: one whose index was loaded by a findSimilar call before the sync (the index
is then kept in step by every add), one never searched (no index in memory),
alternating, --sync-runs of each; the ratio of the best of each, each run's ratio, and
the median of serve's own CPU seconds per sync (its extraction workers are other
processes: what is left is requests, the store and the index, and a busy machine
disturbs it less than the wall-clock). Then the embedded reconcile (no serve) and the
time of its first search, which brings the index up to date with the store.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from typing import Any

import numpy as np

from bench import search_data as sd
from bench.extract import timed_reconcile
from featsync.localcontext.context import LocalContext

SYNC_RATIO = 1.10
Row = tuple[str, str, str, "bool | None"]  # what, value, target, met


def say(text: str = "") -> None:
    print(text, flush=True)


def reconcile(config_path: str) -> float:
    return timed_reconcile(config_path)


def toml_config(run: str, folder: str, context: dict[str, Any] | None) -> str:
    os.makedirs(run)
    lines = ["[sync]", f'folder = "{folder}"', "[log]", 'level = "warning"']
    if context:
        lines.append("[context]")
        for k, v in context.items():
            lines.append(f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}")
    path = os.path.join(run, "featsync.toml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def serve_pid() -> int:
    """The `featsync serve` this process started (its child)."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me and b"serve" in argv:
            return int(name)
    raise SystemExit("cannot find the featsync serve process")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (not its children: serve's extraction
    workers are apart, so this is serve's own work: requests, store, index)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sync_part(args: argparse.Namespace, base: str) -> dict[str, Any]:
    from bench.http_throughput import new_context_id, remote, serving
    from featsync import config
    from featsync.localcontext import features
    from featsync.samples import textured_bytes
    from featsync.wiring import open_context

    n = args.sync_images
    folder = os.path.join(base, f"sync-images-{n}")
    if not (os.path.isdir(folder) and len(os.listdir(folder)) == n):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        old = time.time() - 3600
        for i in range(n):
            p = os.path.join(folder, f"img{i:05d}.jpg")
            with open(p, "wb") as fh:
                fh.write(textured_bytes(i, "JPEG", size=sd.SIZE))
            os.utime(p, (old, old))
    with open(os.path.join(folder, "img00000.jpg"), "rb") as fh:
        probe = fh.read()
    say(
        f"\n== the first sync of {n:,} textured 640x480 JPEGs, `featsync reconcile` against "
        f"`featsync serve`, index loaded before the sync or not, alternating, {args.sync_runs} each"
    )
    out: dict[str, Any] = {"loaded": [], "cold": [], "first_search": [], "cpu": {}}
    with serving("featsync-search-bench-", 0.0, 16) as (sbase, url):
        pid = serve_pid()
        for turn in range(args.sync_runs):
            for warm in (True, False) if turn % 2 == 0 else (False, True):
                work = os.path.join(str(sbase), f"run{turn}-{'loaded' if warm else 'cold'}")
                os.makedirs(work)
                cid = new_context_id(url, work)  # type: ignore[arg-type]
                context = {**remote(url), "context_id": cid, "trust_env": False}
                client = open_context(config.parse({"context": context}, work))
                try:
                    if warm:
                        started = time.perf_counter()
                        client.find_similar(
                            image=probe, threshold=args.threshold, max_count=args.max
                        )
                        out["first_search"].append(time.perf_counter() - started)
                    cpu = cpu_s(pid)
                    secs = reconcile(toml_config(os.path.join(work, "c"), folder, context))
                    cpu = cpu_s(pid) - cpu
                    hits = client.find_similar(
                        image=probe, threshold=args.threshold, max_count=args.max
                    )
                finally:
                    client.close()
                assert hits and hits[0].image_id.endswith("img00000.jpg"), hits
                out["loaded" if warm else "cold"].append(secs)
                out["cpu"].setdefault(warm, []).append(cpu)
                say(
                    f"  run {turn + 1}, index {'loaded' if warm else 'not loaded'}: {secs:.1f} s; "
                    f"serve's own CPU {cpu:.1f} s"
                )
    run = os.path.join(base, "sync-embedded")
    shutil.rmtree(run, ignore_errors=True)
    out["embedded"] = reconcile(toml_config(run, folder, None))
    query = features.extract(probe, "probe")
    ctx = LocalContext(os.path.join(run, "featsync-context.db"))
    try:
        started = time.perf_counter()
        hits = ctx.similar(query, args.threshold, args.max)
        out["embedded_first_search"] = time.perf_counter() - started
        out["embedded_source"] = ctx.index_info().get("source")
    finally:
        ctx.close()
    assert hits and hits[0].image_id.endswith("img00000.jpg"), hits
    best_loaded, best_cold = min(out["loaded"]), min(out["cold"])
    out["ratio"] = best_loaded / best_cold
    say(
        f"  best: index loaded {best_loaded:.1f} s, not loaded {best_cold:.1f} s: "
        f"{out['ratio']:.3f}x; the findSimilar that loaded it: "
        f"{max(out['first_search']):.2f} s at most"
    )
    pairs = [a / b for a, b in zip(out["loaded"], out["cold"], strict=True)]
    out["pair_ratios"] = pairs
    say(f"  each run's loaded / not loaded: {', '.join(f'{r:.3f}' for r in pairs)}")
    warm_cpu, cold_cpu = (float(np.median(out["cpu"][w])) for w in (True, False))
    out["cpu_ratio"] = warm_cpu / cold_cpu
    say(
        f"  serve's own CPU per sync (median; extraction workers not counted): index loaded "
        f"{warm_cpu:.1f} s, not loaded {cold_cpu:.1f} s: {out['cpu_ratio']:.3f}x"
    )
    say(
        f"  embedded reconcile (no serve): {out['embedded']:.1f} s; then its first search "
        f"(index {out['embedded_source']}): {out['embedded_first_search']:.2f} s"
    )
    return out


def sync_rows(sync: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    loaded, cold, ratio = min(sync["loaded"]), min(sync["cold"]), sync["ratio"]
    return [
        (
            f"first sync of {args.sync_images:,} JPEGs via serve, index loaded / not",
            f"{loaded:.1f} / {cold:.1f} s = {ratio:.3f}x (runs: "
            + ", ".join(f"{r:.2f}" for r in sync["pair_ratios"])
            + ")",
            f"<= {SYNC_RATIO}x",
            ratio <= SYNC_RATIO,
        ),
        (
            "serve's own CPU per sync (median), index loaded / not",
            f"{sync['cpu_ratio']:.3f}x",
            "",
            None,
        ),
        (
            "embedded reconcile; then its first search",
            f"{sync['embedded']:.1f} s; {sync['embedded_first_search']:.2f} s",
            "",
            None,
        ),
    ]
