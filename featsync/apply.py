"""Apply a plan: send the calls with a bounded worker pool, record each outcome.

Workers only read files and call the search context; the calling thread is the
ledger's one writer and records each outcome as soon as it arrives. Adds and updates
go first, deletes after, so a moved image is never missing from the context. One
image's failure never stops the batch; a ``Fatal`` error stops taking new work, lets
the calls in flight finish and is raised once they are recorded.

Transient errors back off the whole worker, not each image: after a few in a row (the
client has already retried each call with backoff) the service is taken to be down,
no new work is started, and what is left waits for the next cycle, which the daemon
delays with a growing wait. An outage costs a handful of calls, not one per image.
A stop request (SIGTERM) likewise stops taking new work and lets the calls in flight
finish.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from featsync.errors import AlreadyExists, Fatal, ItemRejected, NotFound, Transient
from featsync.model import Action, Kind, Ledger, Outcome, Plan, Policy, SearchContext
from featsync.plan import retry_delay
from featsync.scan import Unsettled, read_settled, stat_key

Clock = Callable[[], float]
Hold = Callable[[str], bool]  # is this path (relative to the root) still being written?


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
    backed_off: str | None = None  # the error that made the worker back off
    fatal: Fatal | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)


def _send(
    action: Action,
    root: str,
    ctx: SearchContext,
    racy_cutoff_ns: int,
    hold: Hold,
    go: Callable[[], bool],
) -> Outcome:
    """Do one action against the search context (runs in a worker thread)."""
    started = time.perf_counter()
    if not go():  # queued before a backoff or a stop request: leave it for the next cycle
        return Outcome(action, None, None, 0, 0, 0, None, "not sent", "not_sent", 0.0)
    digest: str | None = None
    size = mtime = inode = 0

    def result(
        done: Kind | None,
        count: int | None = None,
        error: str | None = None,
        kind: str | None = None,
    ) -> Outcome:
        ms = round((time.perf_counter() - started) * 1000, 1)
        return Outcome(action, done, digest, size, mtime, inode, count, error, kind, ms)

    try:
        if action.kind is Kind.DELETE:
            with contextlib.suppress(NotFound):  # not there: the goal is reached
                ctx.delete_features(action.image_id)
            return result(Kind.DELETE)
        assert action.file is not None
        if hold(action.file.relpath):
            return result(None, kind="deferred", error="file is being written")
        try:
            data, st = read_settled(os.path.join(root, action.file.relpath))
        except (Unsettled, FileNotFoundError):
            return result(None, kind="deferred", error="file changed or vanished since the scan")
        except OSError as exc:
            return result(None, error=f"cannot read file: {exc.strerror or exc}", kind="rejected")
        digest = hashlib.sha256(data).hexdigest()
        size, mtime, inode = stat_key(st, racy_cutoff_ns)
        if action.kind is Kind.ADD:
            try:
                return result(Kind.ADD, ctx.add_features(action.image_id, data))
            except AlreadyExists:
                return result(Kind.UPDATE, ctx.update_features(action.image_id, data))
        try:
            return result(Kind.UPDATE, ctx.update_features(action.image_id, data))
        except NotFound:
            return result(Kind.ADD, ctx.add_features(action.image_id, data))
    except ItemRejected as exc:
        return result(None, error=str(exc), kind="rejected")
    except Transient as exc:
        return result(None, error=str(exc), kind="transient")
    except Fatal as exc:
        return result(None, error=str(exc), kind="fatal")
    except (AlreadyExists, NotFound) as exc:  # the fallback call met the opposite surprise
        return result(None, error=str(exc), kind="transient")


def apply_plan(
    plan: Plan,
    root: str,
    ctx: SearchContext,
    ledger: Ledger,
    policy: Policy,
    concurrency: int,
    log: Any,
    clock: Clock = time.time,
    stop: Callable[[], bool] = lambda: False,
    progress: Callable[[], None] = lambda: None,
    breaker: int = 3,
    hold: Hold = lambda _relpath: False,
    in_flight: Callable[[int], None] = lambda _n: None,
) -> ApplyResult:
    """Execute `plan`; every outcome lands in the ledger as soon as it is known.

    `stop` is asked before each new call; `progress` is told of every outcome;
    after `breaker` transient failures in a row the worker backs off (see above).
    """
    res = ApplyResult()
    gate = _Gate(stop, progress, breaker, hold, in_flight)
    now = clock()
    ledger.record_restat(plan.restat, now)
    ledger.forget(plan.forget, now)
    if plan.unreadable:
        ledger.record_unreadable(plan.unreadable, now, lambda tries: retry_delay(tries, policy))
        for image_id, why in plan.unreadable:
            res.failed += 1
            res.failures.append((image_id, why))
            log.warning("image_failed", image_id=image_id, action="read", error=why)
    racy_cutoff_ns = time.time_ns() - 2_000_000_000
    sends = [a for a in plan.actions if a.kind is not Kind.DELETE]
    deletes = [a for a in plan.actions if a.kind is Kind.DELETE]
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="featsync-apply") as pool:
        for phase in (sends, deletes):
            if gate.open(res):
                _run_phase(
                    phase,
                    pool,
                    concurrency,
                    root,
                    ctx,
                    ledger,
                    policy,
                    log,
                    clock,
                    racy_cutoff_ns,
                    res,
                    gate,
                )
            else:
                res.not_sent += len(phase)
    if res.backed_off is not None:
        log.warning("worker_backoff", error=res.backed_off, not_sent=res.not_sent)
    return res


@dataclass(slots=True)
class _Gate:
    """Whether apply may start another call."""

    stop: Callable[[], bool]
    progress: Callable[[], None]
    breaker: int
    hold: Hold
    in_flight: Callable[[int], None]
    transient_run: int = 0  # transient failures in a row

    def open(self, res: ApplyResult) -> bool:
        return res.fatal is None and res.backed_off is None and not self.stop()

    def saw(self, out: Outcome, res: ApplyResult) -> None:
        self.progress()
        if out.error_kind == "transient":
            self.transient_run += 1
            if self.transient_run >= self.breaker and res.backed_off is None:
                res.backed_off = out.error or "transient error"
        elif out.error_kind not in ("deferred", "not_sent"):
            self.transient_run = 0


def _run_phase(
    actions: Iterable[Action],
    pool: ThreadPoolExecutor,
    concurrency: int,
    root: str,
    ctx: SearchContext,
    ledger: Ledger,
    policy: Policy,
    log: Any,
    clock: Clock,
    racy_cutoff_ns: int,
    res: ApplyResult,
    gate: _Gate,
) -> None:
    # At most 2 x concurrency submitted at once: memory stays bounded for huge plans,
    # and after a fatal error, a stop request or a backoff little is left to cancel.
    todo = iter(actions)
    running: set[Future[Outcome]] = set()
    while True:
        while len(running) < 2 * concurrency and gate.open(res):
            action = next(todo, None)
            if action is None:
                break
            running.add(
                pool.submit(
                    _send, action, root, ctx, racy_cutoff_ns, gate.hold, lambda: gate.open(res)
                )
            )
        gate.in_flight(len(running))
        if not running:
            res.not_sent += sum(1 for _ in todo)
            return
        done, running = wait(running, return_when=FIRST_COMPLETED)
        for fut in done:
            out = fut.result()
            _record(out, ledger, policy, log, clock, res)
            gate.saw(out, res)


_EVENTS = {Kind.ADD: "image_added", Kind.UPDATE: "image_updated", Kind.DELETE: "image_deleted"}


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
        wait_s = retry_delay(a.attempts + 1, policy) if out.error_kind == "rejected" else 0.0
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
    )
