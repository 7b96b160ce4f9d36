"""Peak memory of a first sync of very large files: the bound that streaming keeps.

Builds four large JPEG photos of about 250 MB each (real pixel data: a 10,000 x 7,500
noise photo at quality 100, each copy made distinct), then runs ``featsync reconcile``
at concurrency 4 into a fresh ledger and embedded context while sampling, every 20 ms,
the resident memory of the featsync process and of its extraction workers. Reference,
in the same run: a plain Python process that reads the same four files whole at once,
four threads, as featsync did before it streamed them.

Target: the whole process tree (featsync plus its workers) stays under 400 MB.

    python bench/memory.py [--size-mb 250] [--files 4] [--dir DIR --keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_MB = 400.0


def make_photo(path: Path, size_mb: int) -> None:
    """A real JPEG of roughly `size_mb` MB (noise at quality 100 costs ~2 B/pixel)."""
    import numpy as np
    from PIL import Image

    pixels = int(size_mb * 1e6 / 2.0)
    w = int((pixels * 4 / 3) ** 0.5)
    h = pixels // w
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG", quality=100)


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
                out += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    return out


def sample(proc: subprocess.Popen[bytes]) -> tuple[float, float, float]:
    """Peaks (MB) of the main process, of any one worker, and of the whole tree."""
    main = worker = tree = 0
    while proc.poll() is None:
        m = rss_kb(proc.pid)
        ws = [rss_kb(c) for c in children(proc.pid)]
        main, worker, tree = max(main, m), max([worker, *ws]), max(tree, m + sum(ws))
        time.sleep(0.02)
    return main / 1024, worker / 1024, tree / 1024


READ_WHOLE = """
import resource, sys, threading
held = []
def read(p):
    with open(p, "rb") as fh:
        held.append(fh.read())
ts = [threading.Thread(target=read, args=(p,)) for p in sys.argv[1:]]
[t.start() for t in ts]
[t.join() for t in ts]
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=250)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    base = args.dir or Path(tempfile.mkdtemp(prefix="featsync-memory-bench-"))
    images = base / "images"
    try:
        first = images / "photo0.jpg"
        if not first.exists():
            images.mkdir(parents=True, exist_ok=True)
            make_photo(first, args.size_mb)
        for n in range(1, args.files):
            copy = images / f"photo{n}.jpg"
            if not copy.exists():
                shutil.copyfile(first, copy)
                with open(copy, "ab") as fh:
                    fh.write(n.to_bytes(4, "big"))  # after the end marker: distinct content
        paths = sorted(str(p) for p in images.iterdir())
        sizes = [os.path.getsize(p) / 1e6 for p in paths]

        ref = subprocess.run(
            [sys.executable, "-c", READ_WHOLE, *paths], capture_output=True, text=True, check=True
        )
        ref_mb = int(ref.stdout.strip()) / 1024

        run = base / "run"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        (run / "featsync.toml").write_text(
            f'[sync]\nfolder = "{images}"\nconcurrency = 4\nmax_file_size = {10**9}\n'
            '[log]\nlevel = "warning"\n',
            encoding="utf-8",
        )
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "featsync", "reconcile", "--config", str(run / "featsync.toml")],
            stderr=subprocess.PIPE,
        )
        main_mb, worker_mb, tree_mb = sample(proc)
        took = time.perf_counter() - started
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.returncode != 0:
            raise SystemExit(f"featsync reconcile failed ({proc.returncode}):\n{err[-2000:]}")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    total = sum(sizes)
    print(f"{len(paths)} JPEG files of {min(sizes):.0f}-{max(sizes):.0f} MB ({total:.0f} MB)")
    print(f"  reference: reading them whole at once (as before):  peak {ref_mb:7.1f} MB")
    print(f"  featsync reconcile, concurrency 4, {took:.1f} s:")
    print(f"    featsync process                                peak {main_mb:7.1f} MB")
    print(f"    largest extraction worker                       peak {worker_mb:7.1f} MB")
    print(f"    whole tree (featsync + workers, summed)         peak {tree_mb:7.1f} MB")
    verdict = "met" if tree_mb < TARGET_MB else "NOT met"
    print(f"  tree / reference: {tree_mb / ref_mb:.2f}x; target < {TARGET_MB:.0f} MB: {verdict}")


if __name__ == "__main__":
    main()
