"""What apply records of each outcome: the ledger row, the counts of the cycle
(ApplyResult) and the per-image log event. Run by apply's calling thread, the
ledger's one writer; a failure to record is that image's failure, never the end of
the batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from featsync.errors import Fatal
from featsync.model import Kind, Ledger, Outcome, Policy
from featsync.plan import retry_delay

Clock = Callable[[], float]


@dataclass(slots=True)
class ApplyResult:
    """Counts of what happened, by what actually happened."""

    added: int = 0
    updated: int = 0
    deleted: int = 0
    failed: int = 0
    deferred: int = 0  # the file changed or vanished since the scan: next cycle
    transient: int = 0  # failed for a reason that is no fault of the image
    not_sent: int = 0  # left for the next cycle: a stop request, or the service down
    weak: int = 0  # synced with fewer than min_features features
    backed_off: str | None = None  # the error that made the worker back off
    fatal: Fatal | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)


def unexpected(exc: BaseException) -> str:
    return f"unexpected error: {type(exc).__name__}: {exc}"


def undo_safely(ledger: Ledger, image_id: str, prior: dict[str, Any] | None, log: Any) -> None:
    """An add that was not sent after all: its row back as it was. If even that fails,
    the row keeps saying "may hold", which costs at most one call later."""
    try:
        ledger.undo_intent(image_id, prior)
    except Exception as exc:
        log.warning("image_not_recorded", image_id=image_id, error=unexpected(exc))


def record_safely(
    out: Outcome, ledger: Ledger, policy: Policy, log: Any, clock: Clock, res: ApplyResult
) -> None:
    """Record one outcome; a failure to record is that image's failure (or, for the
    ledger itself, fatal: nothing more is sent), never the end of the batch."""
    try:
        _record(out, ledger, policy, log, clock, res)
    except Fatal as exc:
        res.failed += 1
        res.failures.append((out.action.image_id, str(exc)))
        log.error("image_not_recorded", image_id=out.action.image_id, error=str(exc))
        if res.fatal is None:
            res.fatal = exc
    except Exception as exc:
        why = unexpected(exc)
        res.failed += 1
        res.failures.append((out.action.image_id, why))
        log.error("image_not_recorded", image_id=out.action.image_id, error=why)


_EVENTS = {Kind.ADD: "image_added", Kind.UPDATE: "image_updated", Kind.DELETE: "image_deleted"}
_WAITS = ("rejected", "internal")  # failures that wait longer after each try


def _record(
    out: Outcome, ledger: Ledger, policy: Policy, log: Any, clock: Clock, res: ApplyResult
) -> None:
    a = out.action
    now = clock()
    if out.error_kind == "not_sent":
        res.not_sent += 1
        return
    if out.error_kind == "deferred":
        res.deferred += 1
        log.info("image_deferred", image_id=a.image_id, action=a.kind.value, reason=out.error)
        return
    if out.done is None:
        # A rejected image waits, longer after each try; a transient error is retried
        # by the next cycle (the client has already backed off within this one).
        wait_s = retry_delay(a.attempts + 1, policy) if out.error_kind in _WAITS else 0.0
        ledger.record(out, now, now + wait_s if wait_s else None)
        res.failed += 1
        res.transient += out.error_kind == "transient"
        res.failures.append((a.image_id, out.error or ""))
        log.warning(
            "image_failed",
            image_id=a.image_id,
            action=a.kind.value,
            version=a.version,
            error=out.error,
            error_kind=out.error_kind,
            duration_ms=out.duration_ms,
        )
        if out.error_kind == "fatal" and res.fatal is None:
            res.fatal = Fatal(out.error or "fatal error")
        return
    ledger.record(out, now, None)
    if out.backup and "skipped" in out.backup:
        log.warning("backup_skipped", image_id=a.image_id, reason=out.backup)
    if out.done is Kind.ADD:
        res.added += 1
    elif out.done is Kind.UPDATE:
        res.updated += 1
    else:
        res.deleted += 1
    log.info(
        _EVENTS[out.done],
        image_id=a.image_id,
        version=a.version + 1,
        features_count=out.features_count,
        duration_ms=out.duration_ms,
        **({"backup": out.backup} if out.backup else {}),
    )
    count = out.features_count
    if out.done is not Kind.DELETE and count is not None and count < policy.min_features:
        res.weak += 1
        log.warning(
            "image_weak",
            image_id=a.image_id,
            features_count=count,
            min_features=policy.min_features,
            reason="too few features to be found by a search (flat, tiny or blurred?)",
        )
