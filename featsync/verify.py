"""`featsync verify`: GET what the ledger believes from the search context and
report each difference (drift); `--repair` mends it through the ordinary sync."""

from __future__ import annotations

import json
import random
from typing import Any

from featsync.config import Settings
from featsync.errors import ItemRejected, NotFound, Transient
from featsync.looks import EXIT_NOT_IN_STEP, EXIT_OK
from featsync.model import State


def run(settings: Settings, sample: int | None, every: bool, repair: bool, as_json: bool) -> int:
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
