"""`featsync backup export | list | prune`: the kept features, streamed out, listed,
and trimmed to the retention rules on demand."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import sys
import time
from typing import IO, Any

from featsync import logs
from featsync.backups import BackupStore, log_pruned
from featsync.config import Settings
from featsync.errors import Fatal
from featsync.looks import EXIT_OK, when

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """--since: an ISO 8601 date or time (UTC unless it says otherwise), an age such
    as 90m, 12h, 7d or 2w, or seconds since the epoch."""
    now = time.time() if now is None else now
    t = text.strip()
    m = _RELATIVE.match(t.lower())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise Fatal(
            f"--since {text!r}: not a time; give an ISO 8601 date or time "
            "(2026-11-01, 2026-11-01T12:00:00Z), an age (90m, 12h, 7d, 2w) or epoch seconds"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def export(settings: Settings, out: str | None, since: str | None, image_ids: list[str]) -> int:
    """JSON lines, one kept version each, streamed: memory stays flat. To a file: written
    under a temporary name and renamed when complete."""
    start = parse_since(since) if since is not None else None
    store = BackupStore(settings.backup.path, read_only=True)
    try:
        if out is None:
            n = _write(store, sys.stdout, start, image_ids)
        else:
            tmp = f"{out}.partial"
            try:
                with open(tmp, "w", encoding="utf-8") as fh:
                    n = _write(store, fh, start, image_ids)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, out)
            except OSError as exc:
                raise Fatal(f"--out {out!r}: {exc.strerror or exc}") from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    finally:
        store.close()
    print(f"exported {n} backup(s)" + (f" to {out}" if out else ""), file=sys.stderr)
    return EXIT_OK


def _write(store: BackupStore, fh: IO[str], since: float | None, image_ids: list[str]) -> int:
    n = 0
    for b, feats in store.stream(since, image_ids):
        doc = {
            "imageId": b.image_id,
            "version": b.version,
            "hash": b.digest,
            "takenAt": dt.datetime.fromtimestamp(b.taken_at, dt.UTC).isoformat(),
            "reason": b.reason,
            "featuresCount": feats.features_count,
            "featureLengthInBits": feats.feature_length_in_bits,
            "features": base64.b64encode(feats.features).decode("ascii"),
        }
        fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
        n += 1
    return n


def listing(settings: Settings, image_ids: list[str], as_json: bool) -> int:
    store = BackupStore(settings.backup.path, read_only=True)
    try:
        per_image, totals = store.summary(image_ids)
    finally:
        store.close()
    if as_json:
        print(json.dumps({"images": per_image, "totals": totals}, indent=2, ensure_ascii=False))
        return EXIT_OK
    for p in per_image:
        versions = ", ".join(f"v{v}" for v in p["versions"])
        print(f"{p['image_id']}  {versions}  newest {when(p['newest_at'])}  {_size(p['size'])}")
    print(
        f"{totals['backups']} backup(s), {_size(totals['backup_bytes'])}; "
        f"{totals['image_copies']} image copies, {_size(totals['image_bytes'])}; "
        f"in {settings.backup.path}"
    )
    return EXIT_OK


def prune(settings: Settings) -> int:
    """Apply every retention rule now (a cycle applies them by itself, see backups)."""
    from featsync.ledger import SqlLedger

    b = settings.backup
    ledger = SqlLedger(settings.ledger.url, read_only=True)
    store = BackupStore(b.path)
    try:
        pruned = store.prune(
            b.keep_versions,
            b.keep_deleted_days,
            b.max_size,
            ledger.held_among,
            ledger.current_digests,
            time.time(),
        )
    finally:
        store.close()
        ledger.close()
    log_pruned(logs.get(), pruned, b.max_size)
    print(
        f"pruned {pruned.versions} beyond keep_versions, {pruned.gone} of images gone over "
        f"keep_deleted_days, {pruned.size} over max_size, {pruned.images} image copies; "
        f"{_size(pruned.freed)} freed"
    )
    return EXIT_OK


def _size(n: Any) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
