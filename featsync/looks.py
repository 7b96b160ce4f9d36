"""The operator's look: `status`. It reads the ledger read-only and writes nothing;
it returns an exit code: 0 in step, 1 not (failures, withheld deletes, never synced),
2 fatal (raised). The exit codes of every command are here."""

from __future__ import annotations

import time
from typing import Any

from featsync import jsonout
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
        jsonout.emit(_as_json(data))
    else:
        print("\n".join(_status_lines(data)))
    last = data["last_cycle"]
    held_back = last is not None and (
        last["withheld_deletes"] or not last["complete"] or last.get("interrupted")
    )
    held_back = held_back or bool(data["withheld_deletes"]) or last is None  # never synced
    return EXIT_NOT_IN_STEP if data["failures"] or held_back else EXIT_OK


def _as_json(data: dict[str, Any]) -> dict[str, Any]:
    """Numbers as numbers, times as ISO 8601 (README: "JSON for scripts")."""
    pid = data["syncing_pid"]
    out = {**data, "syncing_pid": int(pid) if pid and pid.isdigit() else None}
    out["syncing"] = pid is not None  # a holder whose pid could not be read is still one
    out["failures"] = [
        {**f, "next_attempt_at": jsonout.iso(f["next_attempt_at"])} for f in data["failures"]
    ]
    c = data["last_cycle"]
    if c is not None:
        out["last_cycle"] = {
            **c,
            "started_at": jsonout.iso(c["started_at"]),
            "finished_at": jsonout.iso(c["finished_at"]),
        }
    return out


def when(ts: float | None) -> str:
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
            f"last cycle: {when(c['finished_at'])} ({c['duration_ms']:.0f} ms): "
            f"{c['added']} added, {c['updated']} updated, {c['deleted']} deleted, "
            f"{c['unchanged']} unchanged, {c['failed']} failed, "
            f"{c['withheld_deletes']} withheld deletes"
            + ("" if c["complete"] else ", scan incomplete")
            + (", interrupted (a stop was asked for)" if c.get("interrupted") else "")
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
            f"(tries {f['attempts']}, next try {when(f['next_attempt_at'])})"
        )
    return lines
