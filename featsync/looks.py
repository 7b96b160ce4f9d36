"""The operator's looks: `status`, `history` and `verify`. Each reads the ledger
read-only (and `verify` the search context) and writes nothing; each returns an exit
code: 0 in step, 1 not (failures, withheld deletes, drift), 2 fatal (raised)."""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

from featsync.config import Settings
from featsync.errors import ItemRejected, NotFound, Transient
from featsync.model import State

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


def verify(settings: Settings, sample: int | None, as_json: bool) -> int:
    """GET what the ledger believes from the context; report each difference."""
    from featsync import logs
    from featsync.ledger import SqlLedger
    from featsync.wiring import open_context

    ledger = SqlLedger(settings.ledger.url, read_only=True)
    try:
        believed = ledger.believed()
    finally:
        ledger.close()
    checked = [b for b in believed if b[1] in (State.SYNCED, State.DELETED)]
    if sample is not None and sample < len(checked):
        checked = sorted(random.sample(checked, sample))
    drifts: list[dict[str, Any]] = []
    unverified: list[dict[str, Any]] = []
    context = open_context(settings, logs.get(), read_only=True)
    try:
        for image_id, state, _remote, count in checked:
            try:
                held = context.get_features(image_id)
            except NotFound:
                if state == State.SYNCED:
                    drifts.append(_drift(image_id, "missing", "synced by the ledger, absent"))
                continue
            except (Transient, ItemRejected) as exc:
                unverified.append({"image_id": image_id, "error": str(exc)})
                continue
            if state == State.DELETED:
                drifts.append(_drift(image_id, "held_but_deleted", "deleted by the ledger, held"))
            elif count is not None and held.features_count != count:
                why = f"{held.features_count} features held, {count} recorded"
                drifts.append(_drift(image_id, "count_differs", why))
        listing = getattr(context, "image_ids", None)
        if sample is None and callable(listing):  # the embedded context can list its IDs
            known = {b[0] for b in believed if b[2]}
            for image_id in sorted(set(listing()) - known):
                drifts.append(_drift(image_id, "orphan", "held, unknown to the ledger"))
    finally:
        context.close()
    if as_json:
        report = {"checked": len(checked), "drifts": drifts, "unverified": unverified}
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        for d in drifts:
            print(f"{d['kind']:<16} {d['image_id']}: {d['detail']}")
        for u in unverified:
            print(f"unverified       {u['image_id']}: {u['error']}")
        print(
            f"verified {len(checked)} images: {len(drifts)} drift(s), {len(unverified)} unverified"
        )
    return EXIT_NOT_IN_STEP if drifts or unverified else EXIT_OK


def _drift(image_id: str, kind: str, detail: str) -> dict[str, Any]:
    return {"image_id": image_id, "kind": kind, "detail": detail}


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
