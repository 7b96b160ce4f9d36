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
import itertools
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from featsync.apply_record import ApplyResult, Clock, record_safely, undo_safely, unexpected
from featsync.backup_worker import BACKUP_WAIT, BackupNotTaken, Backups
from featsync.errors import (
    AlreadyExists,
    Fatal,
    ItemRejected,
    NotFound,
    SourceChanged,
    Transient,
)
from featsync.model import (
    Action,
    Kind,
    Ledger,
    OpenImage,
    Outcome,
    Plan,
    Policy,
    SearchContext,
)
from featsync.plan import retry_delay
from featsync.progress import Sink, nothing
from featsync.scan import SHORT_OF, Changed, hash_open, open_checked, stat_key, still_same

Hold = Callable[[str], bool]  # is this path (relative to the root) still being written?


def _send(
    action: Action,
    root: str,
    ctx: SearchContext,
    racy_cutoff_ns: int,
    gate: _Gate,
) -> Outcome:
    """Do one action against the search context (runs in a worker thread).

    Whatever goes wrong with this one image becomes its outcome: nothing raised here
    may end the batch.
    """
    started = time.perf_counter()
    if not gate.open():  # queued before a backoff or a stop request: next cycle
        return Outcome(action, None, None, 0, 0, 0, None, "not sent", "not_sent", 0.0)
    digest: str | None = None
    size = mtime = inode = 0
    reached = False  # an add was sent: the context may hold it, unless it said no
    existed: list[bool] = []  # the add met "already there" (so the context holds it)
    notes: list[str] = []  # what became of the backups before the call

    def result(
        done: Kind | None,
        count: int | None = None,
        error: str | None = None,
        kind: str | None = None,
    ) -> Outcome:
        ms = round((time.perf_counter() - started) * 1000, 1)
        backup = "; ".join(notes) or None
        return Outcome(
            action, done, digest, size, mtime, inode, count, error, kind, ms, reached, backup
        )

    def backup(reason: str) -> None:
        """Keep what the context holds before `reason` replaces it; then, if a stop
        came meanwhile, the change is not sent (`_NotSent`)."""
        if gate.backups is not None:
            held = gate.held_digests.get(action.image_id)
            notes.append(gate.backups.before(ctx, action.image_id, action.version, held, reason))
            if gate.stop():
                raise _NotSent

    try:
        if action.kind is Kind.DELETE:
            backup("delete")
            with contextlib.suppress(NotFound):  # not there: the goal is reached
                ctx.delete_features(action.image_id)
            return result(Kind.DELETE)
        f = action.file
        assert f is not None
        if gate.hold(f.relpath):
            return result(None, kind="deferred", error="file is being written")
        if f.size > gate.max_file_size:
            digest, size, mtime, inode = f.digest, f.size, f.mtime_ns, f.inode  # wait for a change
            return result(
                None,
                error=f"file is {f.size:,} bytes ({_mb(f.size)}), more than "
                f"[sync] max_file_size = {gate.max_file_size:,} bytes",
                kind="rejected",
            )
        path = os.path.join(root, f.relpath)
        try:
            fd, st = open_checked(path, gate.follow_symlinks, f.inode, f.size, f.mtime_ns, f.device)
        except Changed as exc:
            return result(None, kind="deferred", error=f"file not sent: {exc}")
        try:
            # Hash, then send, from this one descriptor; then look again: if the file
            # was written to meanwhile, what the context took may be neither version.
            digest = hash_open(fd, st)
            if digest is None:
                return result(None, kind="deferred", error="file changed while it was read")
            size, mtime, inode = stat_key(st, racy_cutoff_ns)
            if gate.backups is not None and (note := gate.backups.keep_image(fd, size, digest)):
                notes.append(note)
            # The row says "may hold" since before this action was handed to a worker
            # (the ledger's one writer wrote it): from here on the context may hold it.
            reached = action.kind is Kind.ADD
            try:
                done, count = _call(
                    ctx, action, OpenImage(fd, st.st_size, action.image_id), existed, backup
                )
            except ItemRejected:
                reached = bool(existed)  # a "no" to the add itself: nothing was added
                if still_same(fd, st):
                    raise
                digest = None
                return result(None, kind="deferred", error="file changed while it was sent")
            except SourceChanged:
                if still_same(fd, st):
                    raise
                digest = None
                return result(None, kind="deferred", error="file changed while it was sent")
            if not still_same(fd, st):
                # Recorded as sent, but as of no known content (no digest, no mtime that
                # a stat can equal): the next scan reads it and sends it again.
                digest, mtime = "", 0
            return result(done, count)
        finally:
            os.close(fd)
    except OSError as exc:  # opening or reading the file (EIO, EMFILE, ...)
        why = f"cannot read file: {exc.strerror or exc}"
        return result(None, error=why, kind="transient" if exc.errno in SHORT_OF else "rejected")
    except SourceChanged as exc:
        return result(None, kind="deferred", error=str(exc))
    except _NotSent:
        return result(None, kind="not_sent", error="not sent: stop requested")
    except ItemRejected as exc:
        return result(None, error=str(exc), kind="rejected")
    except BackupNotTaken as exc:  # waits like a transient failure; not the service's
        return result(None, error=str(exc), kind=BACKUP_WAIT)
    except Transient as exc:
        return result(None, error=str(exc), kind="transient")
    except Fatal as exc:
        return result(None, error=str(exc), kind="fatal")
    except (AlreadyExists, NotFound) as exc:  # the fallback call met the opposite surprise
        return result(None, error=str(exc), kind="transient")
    except Exception as exc:  # a bug or an odd input: this image's failure, not the batch's
        return result(None, error=unexpected(exc), kind="internal")


class _NotSent(Exception):
    """A stop came while the backup before the call was taken: the call is not made."""


def _call(
    ctx: SearchContext,
    action: Action,
    image: OpenImage,
    existed: list[bool],
    backup: Callable[[str], None],
) -> tuple[Kind, int | None]:
    """Add or update, each replacement after `backup` of what it replaces; "already
    there" turns an add into an update (noted in `existed`), "not there" the other way
    round."""
    if action.kind is Kind.ADD:
        try:
            return Kind.ADD, ctx.add_features(action.image_id, image)
        except AlreadyExists:
            existed.append(True)
            backup("replace")  # features the ledger did not know of
            return Kind.UPDATE, ctx.update_features(action.image_id, image)
    try:
        backup("update")
        return Kind.UPDATE, ctx.update_features(action.image_id, image)
    except NotFound:
        return Kind.ADD, ctx.add_features(action.image_id, image)


def _mb(n: int) -> str:
    return f"{n / 1048576:,.1f} MiB"


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
    backups: Backups | None = None,
    sink: Sink = nothing,
) -> ApplyResult:
    """Execute `plan`; every outcome lands in the ledger as soon as it is known.

    `stop` is asked before each new call; `progress` is told of every outcome;
    `sink` is told how many of the plan's actions are done (and failed) after each;
    after `breaker` transient failures in a row the worker backs off (see above);
    `backups`: keep what the context holds before each update and delete.
    """
    res = ApplyResult()
    gate = _Gate(res, policy, stop, progress, breaker, hold, in_flight, backups, sink)
    gate.total = len(plan.actions)
    if gate.total:  # the send phase's line opens now, not at the first outcome
        sink("send", 0, gate.total, 0)
    now = clock()
    ledger.record_restat(plan.restat, now)
    ledger.forget(plan.forget, now)
    if plan.unreadable:
        ledger.record_unreadable(
            plan.unreadable,
            now,
            lambda tries: retry_delay(tries, policy),
            dict(plan.unreadable_paths),
        )
        for image_id, why in plan.unreadable:
            res.failed += 1
            res.failures.append((image_id, why))
            log.warning("image_failed", image_id=image_id, action="read", error=why)
    racy_cutoff_ns = time.time_ns() - 2_000_000_000
    sends = [a for a in plan.actions if a.kind is not Kind.DELETE]
    deletes = [a for a in plan.actions if a.kind is Kind.DELETE]
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="featsync-apply") as pool:
        for phase in (sends, deletes):
            if gate.open():

                def send(action: Action) -> Future[Outcome]:
                    return pool.submit(_send, action, root, ctx, racy_cutoff_ns, gate)

                _run_phase(phase, send, concurrency, ledger, log, clock, gate)
            else:
                res.not_sent += len(phase)
    if res.backed_off is not None:
        log.warning("worker_backoff", error=res.backed_off, not_sent=res.not_sent)
    return res


@dataclass(slots=True)
class _Gate:
    """Whether apply may start another call, and the rules each call follows."""

    res: ApplyResult
    policy: Policy
    stop: Callable[[], bool]
    progress: Callable[[], None]
    breaker: int
    hold: Hold
    in_flight: Callable[[int], None]
    backups: Backups | None
    sink: Sink
    total: int = 0  # actions in the plan, and outcomes seen of them (for the sink)
    done: int = 0
    transient_run: int = 0  # transient failures in a row
    # The content hash of the version the context holds, by image ID, for the backups
    # (written by the applying thread before the action is handed to a worker).
    held_digests: dict[str, str] = field(default_factory=dict)

    @property
    def max_file_size(self) -> int:
        return self.policy.max_file_size

    @property
    def follow_symlinks(self) -> bool:
        return self.policy.follow_symlinks

    def open(self) -> bool:
        res = self.res
        return res.fatal is None and res.backed_off is None and not self.stop()

    def saw(self, out: Outcome) -> None:
        self.progress()
        self.done += 1
        self.sink("send", self.done, self.total, self.res.failed)
        if out.error_kind == "transient":
            self.transient_run += 1
            if self.transient_run >= self.breaker and self.res.backed_off is None:
                self.res.backed_off = out.error or "transient error"
        elif out.error_kind not in ("deferred", "not_sent", BACKUP_WAIT):
            self.transient_run = 0


def _run_phase(
    actions: Iterable[Action],
    send: Callable[[Action], Future[Outcome]],
    concurrency: int,
    ledger: Ledger,
    log: Any,
    clock: Clock,
    gate: _Gate,
) -> None:
    # At most 2 x concurrency submitted at once: memory stays bounded for huge plans,
    # and after a fatal error, a stop request or a backoff little is left to cancel.
    todo = iter(actions)
    running: dict[Future[Outcome], Action] = {}
    before: dict[str, dict[str, Any] | None] = {}  # rows as they were before an add's intent
    res = gate.res
    while True:
        # Refill once half the queue is done, a batch at a time: the intents of a
        # batch's adds are written in one transaction before any of them is sent.
        if len(running) <= concurrency and gate.open():
            batch = list(itertools.islice(todo, 2 * concurrency - len(running)))
            adds = [(a.image_id, a.file.relpath) for a in batch if a.kind is Kind.ADD and a.file]
            try:
                held = [(a.image_id, a.version) for a in batch if a.version]
                if gate.backups is not None and held:
                    gate.held_digests.update(ledger.version_digests(held))
                before.update(ledger.record_intents(adds, clock()))
            except Fatal as exc:
                res.not_sent += len(batch)
                res.fatal = res.fatal or exc
                log.error("intent_not_recorded", images=len(adds), error=str(exc))
                batch = []
            for action in batch:
                running[send(action)] = action
        gate.in_flight(len(running))
        if not running:
            res.not_sent += sum(1 for _ in todo)
            return
        # With a timeout: a signal delivered to another thread runs its Python handler
        # only when the main thread runs again (a bare lock wait never wakes for it).
        done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
        for fut in done:
            action = running.pop(fut)
            gate.held_digests.pop(action.image_id, None)
            try:
                out = fut.result()
            except Exception as exc:  # _send catches everything; this is the last net
                out = Outcome(action, None, None, 0, 0, 0, None, unexpected(exc), "internal", 0.0)
            if out.error_kind == "transient" and gate.stop():
                # Failing while we stop (a connection cut, a worker stopped with us) is
                # no news about the image: leave it as it was, for the next start.
                out = out._replace(error_kind="not_sent")
            if action.image_id in before:
                prior = before.pop(action.image_id)
                if out.error_kind in ("not_sent", "deferred") and not out.reached:
                    undo_safely(ledger, action.image_id, prior, log)
            record_safely(out, ledger, gate.policy, log, clock, res)
            gate.saw(out)
