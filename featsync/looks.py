"""The operator's looks: `status` and `history`. Each reads the ledger read-only and
writes nothing; each returns an exit code: 0 in step, 1 not (failures, withheld
deletes, drift), 2 fatal (raised)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from featsync.config import Settings

EXIT_OK, EXIT_NOT_IN_STEP, EXIT_FATAL = 0, 1, 2


def status(settings: Settings, as_json: bool) -> int:
    from featsync.ledger import SqlLedger
    from featsync.lock import SyncLock

    ledger = SqlLedger(settings.ledger.url, read_only=True)
    try:
        data: dict[str, Any] = {
            "folder": settings.sync.folder,
            "syncing_pid": SyncLock(settings.ledger.url).holder(),
            "counts": ledger.counts(settings.sync.min_features),
            "weak": ledger.weak(settings.sync.min_features),
            "failures": ledger.failures(),
            "withheld_deletes": ledger.withheld_ids(),
            "last_cycle": ledger.last_cycle(),
        }
    finally:
        ledger.close()
    if as_json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print("\n".join(_status_lines(data)))
    last = data["last_cycle"]
    held_back = last is not None and (last["withheld_deletes"] or not last["complete"])
    held_back = held_back or bool(data["withheld_deletes"]) or last is None  # never synced
    return EXIT_NOT_IN_STEP if data["failures"] or held_back else EXIT_OK


def history(settings: Settings, image_id: str, as_json: bool) -> int:
    """Every version of one image ID (read-only: the ledger is not written)."""
    from featsync.ledger import SqlLedger

    ledger = SqlLedger(settings.ledger.url, read_only=True)
    try:
        versions = ledger.history_of(image_id)
    finally:
        ledger.close()
    if not versions:
        print(f"featsync: {image_id!r}: no history in the ledger (never synced)", file=sys.stderr)
        return EXIT_NOT_IN_STEP
    out = [
        {
            "version": h["version"],
            "at": h["at"],
            "action": h["action"],
            "hash": h["digest"],
            "features_count": h["features_count"],
        }
        for h in versions
    ]
    if as_json:
        print(json.dumps({"image_id": image_id, "versions": out}, indent=2, ensure_ascii=False))
        return EXIT_OK
    for v in out:
        count = "-" if v["features_count"] is None else f"{v['features_count']} features"
        digest = (v["hash"] or "-")[:16]
        print(f"v{v['version']:<4} {_when(v['at'])}  {v['action']:<7} {digest:<16}  {count}")
    return EXIT_OK


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _status_lines(data: dict[str, Any]) -> list[str]:
    counts = data["counts"]
    pid = data["syncing_pid"]
    lines = [
        f"folder: {data['folder']}",
        f"syncing: {'pid ' + pid + ' (a daemon or a reconcile)' if pid else 'no process now'}",
        "images: " + ", ".join(f"{n} {state}" for state, n in counts.items()),
    ]
    c = data["last_cycle"]
    if c is None:
        lines.append("last cycle: never")
    else:
        lines.append(
            f"last cycle: {_when(c['finished_at'])} ({c['duration_ms']:.0f} ms): "
            f"{c['added']} added, {c['updated']} updated, {c['deleted']} deleted, "
            f"{c['unchanged']} unchanged, {c['failed']} failed, "
            f"{c['withheld_deletes']} withheld deletes"
            + ("" if c["complete"] else ", scan incomplete")
        )
    for w in data["weak"]:
        lines.append(f"weak: {w['image_id']}: {w['features_count']} features (hardly ever found)")
    withheld = data["withheld_deletes"]
    if withheld:
        shown = ", ".join(withheld[:10]) + (
            f" and {len(withheld) - 10} more" if len(withheld) > 10 else ""
        )
        lines.append(
            f"withheld deletes: {len(withheld)} ({shown}); they stay withheld until the "
            "files come back or `featsync reconcile --confirm-deletes`"
        )
    for f in data["failures"]:
        lines.append(
            f"failed: {f['image_id']}: {f['error']} "
            f"(tries {f['attempts']}, next try {_when(f['next_attempt_at'])})"
        )
    return lines
