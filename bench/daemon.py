"""The daemon: event-to-synced latency, and memory over a large folder.

Part 1, latency: `featsync run` against `featsync serve` on loopback; one new image at
a time, N times; the time from the file being written to the daemon's `image_added`
for it. Reference, measured in the same run: the quiet period (which the daemon
waits on purpose) plus one add call made directly. Target: p50 <= quiet + 0.5 s.

Part 2, memory: the daemon's resident set (VmRSS) idle over an empty folder, idle over
a folder of 100,000 images after its startup rescan, and after further full rescans.
Reference, measured in the same run: the RSS cost per entry of a plain dict of
100,000 40-character keys with tuple values. Targets: below 200 MB at 100,000 images,
and growth per image no more than ~450 bytes.

    python bench/daemon.py [--changes 50] [--quiet 2.0] [--files 100000]
                           [--dir /tmp/featsync-bench] [--keep] [--only latency|memory]

--dir and --keep are those of bench/rescan.py: a tree kept by an earlier run is
reused, its build and first reconcile skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rescan import build
from featsync.samples import textured_bytes

ID, SECRET = "bench", "bench-secret"  # a loopback server's throwaway credential
ENV = {**os.environ, "FEATSYNC_CLIENT_ID": ID, "FEATSYNC_CLIENT_SECRET": SECRET}
ENV.pop("FEATSYNC_CONFIG", None)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


class Daemon:
    def __init__(self, base: Path, name: str) -> None:
        self.log = base / f"{name}.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "featsync", "run", "--config", str(base / "featsync.toml")],
                stdout=subprocess.DEVNULL,
                stderr=fh,
                env=ENV,
            )
        self._read = 0
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        with open(self.log, "rb") as fh:
            fh.seek(self._read)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1
        self._read += end
        for line in chunk[:end].splitlines():
            if line.startswith(b"{"):
                self.events.append(json.loads(line))
        return self.events

    def count(self, event: str, **match: Any) -> int:
        return sum(
            1
            for e in self.poll()
            if e["event"] == event and all(e.get(k) == v for k, v in match.items())
        )

    def rss_kb(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in kB."""
        fields = {}
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def start_serve(data: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "featsync", "serve", "--port", "0", "--data", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=ENV,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("serving on "):
        raise SystemExit(f"featsync serve did not start: {line!r}")
    return proc, line.split()[-1]


def latency(changes: int, quiet: float) -> None:
    import structlog

    from featsync import logs
    from featsync.aspose import AsposeContext, ClientSettings
    from featsync.model import Secret

    logs.configure("console", "warning")  # the bench's own client: no token chatter
    base = Path(tempfile.mkdtemp(prefix="featsync-latency-"))
    serve, url = start_serve(base / "serve")
    try:
        settings = ClientSettings(
            base_url=url + "/v3.0", auth_url=url + "/connect/token", trust_env=False
        )
        maker = AsposeContext(settings, ID, Secret(SECRET), structlog.get_logger())
        context_id = maker.create_context()
        maker.close()
        direct = AsposeContext(
            dataclasses.replace(settings, context_id=context_id),
            ID,
            Secret(SECRET),
            structlog.get_logger(),
        )
        sample = textured_bytes(10_000)
        calls = []
        for n in range(10):
            t = time.perf_counter()
            direct.add_features(f"direct-{n}.jpg", sample)
            calls.append(time.perf_counter() - t)
        direct.close()
        one_call = statistics.median(calls)

        (base / "images").mkdir()
        (base / "featsync.toml").write_text(
            f'[sync]\nfolder = "images"\n[log]\nformat = "json"\n'
            f'[context]\nkind = "aspose"\nbase_url = "{url}/v3.0"\n'
            f'auth_url = "{url}/connect/token"\ncontext_id = "{context_id}"\ntrust_env = false\n'
            f"[daemon]\nquiet_period = {quiet}\n"
        )
        daemon = Daemon(base, "latency")
        wait_until(lambda: daemon.count("cycle_finished") >= 1, 60, "the first cycle")
        blobs = [textured_bytes(n) for n in range(changes)]
        lat = []
        for n, blob in enumerate(blobs):
            image_id = f"change-{n:03}.jpg"
            (base / "images" / image_id).write_bytes(blob)
            written = time.time()

            def synced(i: str = image_id) -> bool:
                return daemon.count("image_added", image_id=i) == 1

            wait_until(synced, 60, image_id)
            event = next(
                e
                for e in daemon.events
                if e["event"] == "image_added" and e["image_id"] == image_id
            )
            at = dt.datetime.fromisoformat(event["timestamp"]).timestamp()
            lat.append(at - written)
        daemon.stop()
    finally:
        serve.terminate()
        serve.wait()
        shutil.rmtree(base, ignore_errors=True)
    lat.sort()
    p50 = statistics.median(lat)
    p95 = lat[max(0, round(0.95 * len(lat)) - 1)]
    floor = quiet + one_call
    print(f"latency over {changes} single-file changes (quiet_period {quiet:g} s):")
    print(f"  reference: quiet period + one direct add call = {quiet:g} + {one_call * 1000:.1f} ms")
    print(
        f"  p50 {p50:.3f} s ({p50 / floor:.2f}x reference)   p95 {p95:.3f} s   max {lat[-1]:.3f} s"
    )
    verdict = "meets" if p50 <= quiet + 0.5 else "MISSES"
    print(f"  target p50 <= quiet + 0.5 s = {quiet + 0.5:g} s: {verdict}")


def dict_reference(n: int) -> float:
    """RSS bytes per entry of a dict of n 40-character keys -> small tuples."""
    code = (
        "import sys\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS'): return int(line.split()[1]) * 1024\n"
        "before = rss()\n"
        f"d = {{f'{{i:040d}}': (i, i * 2, i * 3) for i in range({n})}}\n"
        f"print((rss() - before) / {n})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def memory(files: int, workdir: str | None, keep: bool, rescans: int) -> None:
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="featsync-mem-"))
    daemon_cfg = (
        '[daemon]\nrescan_interval = 5\nheartbeat_interval = 3600\n[log]\nformat = "json"\n'
    )
    try:
        if not (base / "images").exists():
            print(f"building {files} files and syncing them once (a few minutes) ...")
            build(base, files)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "featsync",
                    "reconcile",
                    "--config",
                    str(base / "featsync.toml"),
                ],
                env=ENV,
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        config = base / "featsync.toml"
        config.write_text('[sync]\nfolder = "images"\n' + daemon_cfg)

        empty = Path(tempfile.mkdtemp(prefix="featsync-empty-"))
        (empty / "images").mkdir()
        (empty / "featsync.toml").write_text('[sync]\nfolder = "images"\n' + daemon_cfg)
        d0 = Daemon(empty, "empty")
        wait_until(lambda: d0.count("cycle_finished") >= 1, 60, "the empty daemon's rescan")
        time.sleep(1)  # a benchmark lets the process settle before it measures
        empty_rss, _ = d0.rss_kb()
        d0.stop()
        shutil.rmtree(empty, ignore_errors=True)

        d = Daemon(base, "memory")
        wait_until(lambda: d.count("cycle_finished", scope="full") >= 1, 600, "the startup rescan")
        first = next(e for e in d.events if e["event"] == "cycle_finished")
        time.sleep(1)
        after_first, _ = d.rss_kb()
        wait_until(
            lambda: d.count("cycle_finished", scope="full") >= 1 + rescans, 3600, "more rescans"
        )
        time.sleep(1)
        after_more, peak = d.rss_kb()
        d.stop()
    finally:
        if not keep and not workdir:
            shutil.rmtree(base, ignore_errors=True)
    ref = dict_reference(files)
    per_image = (after_more - empty_rss) * 1024 / files
    print(
        f"memory (VmRSS), {files} images, startup rescan: {first['unchanged']} unchanged "
        f"in {first['duration_ms']:.0f} ms:"
    )
    print(f"  idle, empty folder:                    {empty_rss / 1024:7.1f} MB")
    print(f"  idle after the startup rescan:         {after_first / 1024:7.1f} MB")
    print(
        f"  idle after {rescans:2} more full rescans:       {after_more / 1024:7.1f} MB "
        f"(peak {peak / 1024:.1f} MB)"
    )
    print(
        f"  growth per image: {per_image:.0f} B; reference dict entry: {ref:.0f} B "
        f"({per_image / ref:.2f}x)"
    )
    ok = after_more < 200 * 1024 and per_image <= 450
    print(f"  target < 200 MB and <= ~450 B/image: {'meets' if ok else 'MISSES'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--quiet", type=float, default=2.0)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--rescans", type=int, default=3, help="full rescans after the first")
    ap.add_argument("--only", choices=["latency", "memory"], default=None)
    args = ap.parse_args()
    if args.only in (None, "latency"):
        latency(args.changes, args.quiet)
    if args.only in (None, "memory"):
        memory(args.files, args.dir, args.keep, args.rescans)


if __name__ == "__main__":
    main()
