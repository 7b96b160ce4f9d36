"""`featsync verify`: GET what the ledger believes from the search context and report
each difference (drift, featsync.drift); `--repair` mends it through the ordinary
sync. And the daemon's rolling review (`review`), which the sync thread runs every
[daemon] verify_interval.

Repair hands each drift to the sync rather than calling the context itself: the
drifted IDs are marked "may hold" in the ledger (featsync.ledger_review.mark_drift),
then one ordinary cycle runs, so a file that is there is sent again (an update finds
what the context held, and a backup of it can be taken first) and an ID whose file
is gone is deleted through the delete guard, which may withhold it. When a daemon
holds the sync lock (its role, featsync.lock), the marks are written and the daemon's
own cycles act on them within a second or so (they are due now, as after `featsync
retry`); when another process holds it (a reconcile, another repair), the marks are
written and wait for the next cycle, and the repair says so (exit 1). Until a cycle
acts on them, a marked row is not checked (it is in flux) but counted: `marked`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from featsync import jsonout, progress
from featsync.config import Settings
from featsync.drift import Believed, Check, Drift, Findings, describe
from featsync.errors import Fatal
from featsync.escapes import printable
from featsync.looks import EXIT_NOT_IN_STEP, EXIT_OK
from featsync.model import SearchContext, State

if TYPE_CHECKING:
    from featsync.ledger import SqlLedger
    from featsync.lock import Holder

PAGE = 1000  # ledger rows read at a time by `verify --all`
SETTLED = ("sent", "deleted")  # repair outcomes that leave no drift behind
NOT_SENT = "not sent"  # marked, and no cycle of this run sent it (stopped, or not planned)
# With another process syncing, what looks like drift is looked at again this long
# after it was found: an update that process sent is in the context before its answer
# is in the ledger, and for that instant the two differ.
CONFIRM_PAUSE_S = 5.0


def run(
    settings: Settings,
    sample: int | None,
    every: bool,
    repair: bool,
    as_json: bool,
    stop: threading.Event | None = None,
) -> int:
    """GET what the ledger believes from the context; report each difference; with
    `repair`, mend it. `every` is the default (--all), spelt out. `stop` (set by a
    SIGINT or SIGTERM) cuts the check or the repair's cycle short: what was done is
    reported, what was not is counted, and the exit is 1."""
    from featsync import logs

    log = logs.get()
    stop = stop or threading.Event()
    with progress.shown() as sink:  # on a terminal: checked / total, rate, ETA
        found = _check(settings, sample, log, stop, sink)
    pending, marked = _in_flux(settings)  # rows no check can judge: failed, marked
    mended: dict[str, Any] | None = None
    if repair and found.drifts and not stop.is_set():
        mended = _repair(settings, found.drifts, log, stop)
    if as_json:
        report = {**describe(found), "pending": pending, "marked": marked, "repair": mended}
        jsonout.emit(report)
    else:
        lines = _lines(found, sample is not None, (pending, marked), mended)
        # IDs, file names and errors come from outside: none may move the cursor, colour
        # the terminal or forge a line of its own
        lines = [printable(line) for line in lines]
        if repair and found.drifts and mended is None:
            lines.append("repair: not begun (stopped); nothing was marked or sent")
        print("\n".join(lines))
    if found.unverified or found.stopped or marked:  # a mark: drift not yet mended
        return EXIT_NOT_IN_STEP
    if mended is not None:
        settled = SETTLED + (("waiting",) if mended["daemon_pid"] is not None else ())
        left = [o for o in mended["outcomes"].values() if o not in settled]
        return EXIT_NOT_IN_STEP if left or mended["stopped"] else EXIT_OK
    return EXIT_NOT_IN_STEP if found.drifts else EXIT_OK


def _let_the_syncer_record(url: str, halt: Callable[[], bool], log: Any, drifts: int) -> None:
    """When a process syncs (a daemon), wait CONFIRM_PAUSE_S before the drift found is
    confirmed: an update it sent may be held by the context and not yet recorded."""
    from featsync.lock import SyncLock

    who = SyncLock(url).who()
    if who is None:
        return
    log.info("verify_confirm_wait", drifts=drifts, seconds=CONFIRM_PAUSE_S, syncing_pid=who.pid)
    deadline = time.monotonic() + CONFIRM_PAUSE_S
    while time.monotonic() < deadline and not halt():
        time.sleep(0.05)


def _check(
    settings: Settings,
    sample: int | None,
    log: Any,
    stop: threading.Event | None = None,
    sink: progress.Sink = progress.nothing,
) -> Findings:
    from featsync.ledger import SqlLedger
    from featsync.wiring import open_context

    url = settings.ledger.url
    ledger = SqlLedger(url, read_only=True)
    writer: list[SqlLedger] = []  # opened for the first features count to write

    def fill(counts: Sequence[tuple[str, int, int]]) -> int:
        if not writer:
            writer.append(SqlLedger(url))
        return writer[0].fill_counts(counts)

    try:
        context = open_context(settings, log, read_only=True)
        try:
            same_context(ledger, context, log)  # before any GET (and so before any mark)
            halt = stop.is_set if stop is not None else lambda: False
            counts = ledger.counts()
            rows = counts.get(State.SYNCED.value, 0) + counts.get(State.DELETED.value, 0)
            # what the line shows: ("verify", answers so far, rows to check); then the
            # listing's answers ("list", total unknown)
            shown: list[Any] = ["verify", 0, rows if sample is None else min(sample, rows)]

            def answered() -> None:
                shown[1] += 1
                sink(shown[0], shown[1], shown[2], len(check.found.unverified))

            check = Check(
                context,
                settings.sync.concurrency,
                halt,
                progress=answered,
                fill=fill,
                prefix=settings.sync.id_prefix,
            )
            if sample is not None:
                check.rows(ledger.believed_sample(sample))
            else:
                check.rows(_every_row(ledger))
                if not check.found.stopped:
                    shown[:] = ["list", 0, None]
                    check.listing(ledger.believed_of)
            # A look reads a private copy of the ledger, as it was when it opened; what
            # looks like drift is confirmed against the ledger as it is now (a daemon
            # may have synced meanwhile), through a new look.
            if check.found.drifts and not check.found.stopped:
                _let_the_syncer_record(url, halt, log, len(check.found.drifts))
            now = SqlLedger(url, read_only=True)
            try:
                found = check.confirm(now.believed_of)
            finally:
                now.close()
        finally:
            context.close()
    finally:
        ledger.close()
        for w in writer:
            w.close()
    if found.filled:
        log.info("features_counts_filled", count=found.filled)
    return found


def same_context(ledger: SqlLedger, context: SearchContext, log: Any) -> None:
    """Refuse (Fatal) a context other than the one the ledger mirrors: every row would
    look missing there, and a repair would mark every row. A ledger that has not yet
    recorded which context it mirrors (a new one, or one from before bindings) gives no
    way to tell: its first reconcile (or a daemon's start) records it."""
    from featsync.engine import bind_context

    if ledger.context_identity() is None:
        raise Fatal(
            "the ledger has not yet recorded which search context it mirrors (a new "
            "ledger, or one from before featsync recorded it): verify needs one "
            "`featsync reconcile` (or a daemon's start) first, which records it"
        )
    bind_context(ledger, context, log, dry_run=True)  # the same refusal as a cycle's


def _in_flux(settings: Settings) -> tuple[int, int]:
    from featsync.ledger import SqlLedger

    ledger = SqlLedger(settings.ledger.url, read_only=True)
    try:
        return ledger.in_flux()
    finally:
        ledger.close()


def _every_row(ledger: SqlLedger) -> Iterator[Believed]:
    """Every row, a page at a time (never the whole ledger in memory)."""
    after = ""
    while True:
        page = ledger.believed_after(after, PAGE)
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1].image_id


def _repair(
    settings: Settings, drifts: list[Drift], log: Any, stop: threading.Event
) -> dict[str, Any]:
    """Mark the drifts and run one cycle under the sync lock; if a daemon holds the
    lock, mark them and leave them to it. A stop (SIGINT, SIGTERM: the handlers are in
    place before the marks are written) lets the calls in flight finish; the marks of
    what was not sent stay for the next cycle."""
    from featsync.engine import Engine, Stopped
    from featsync.ledger import SqlLedger
    from featsync.lock import SyncLock
    from featsync.wiring import open_context

    url = settings.ledger.url
    ids = [d.image_id for d in drifts]
    lock = SyncLock(url, role="verify --repair")
    try:
        lock.acquire()
    except Fatal:
        holder = lock.who()
        if holder is None:
            raise
        ledger = SqlLedger(url)
        try:
            ledger.mark_drift(drifts, time.time())
            outcomes = ledger.repair_outcomes(ids)
        finally:
            ledger.close()
        if holder.role == "daemon":  # its cycles act on the marks within seconds
            return _mended(log, drifts, outcomes, None, holder)
        # A reconcile, another verify --repair: their cycles planned before the marks
        outcomes = {i: NOT_SENT if o == "waiting" else o for i, o in outcomes.items()}
        return _mended(log, drifts, outcomes, None, holder)
    withheld_reason = None
    try:
        ledger = SqlLedger(url)
        try:
            ledger.mark_drift(drifts, time.time())
            if not stop.is_set():
                context = open_context(settings, log)
                try:
                    report = Engine(settings, ledger, context, log, stop=stop.is_set).cycle()
                    withheld_reason = report.plan.withheld_reason
                except Stopped:
                    log.info("cycle_stopped", reason="signal, while scanning")
                finally:
                    context.close()
            outcomes = ledger.repair_outcomes(ids)
        finally:
            ledger.close()
    finally:
        lock.release()
    # No daemon: a mark this run's cycle did not act on waits for the next cycle
    outcomes = {i: NOT_SENT if o == "waiting" else o for i, o in outcomes.items()}
    return _mended(log, drifts, outcomes, withheld_reason, stopped=stop.is_set())


def _mended(
    log: Any,
    drifts: Sequence[Drift],
    outcomes: dict[str, str],
    withheld_reason: str | None,
    holder: Holder | None = None,
    stopped: bool = False,
) -> dict[str, Any]:
    """What a repair did (the JSON's "repair"); `holder`: the process holding the sync
    lock, which the marks were left to (its role "daemon": it mends them)."""
    counts = outcome_counts(outcomes)
    daemon = holder.pid if holder is not None and holder.role == "daemon" else None
    held_by = None if holder is None else {"pid": holder.pid, "role": holder.role}
    log.info(
        "verify_repaired",
        drifts=len(drifts),
        daemon_pid=daemon,
        holder=held_by,
        stopped=stopped,
        **counts,
    )
    return {
        "daemon_pid": daemon,
        "holder": held_by,
        "stopped": stopped,
        "counts": counts,
        "outcomes": outcomes,
        "withheld_reason": withheld_reason if counts["withheld"] else None,
    }


def outcome_counts(outcomes: dict[str, str]) -> dict[str, int]:
    """Repair outcomes (LedgerReview.repair_outcomes) counted by kind."""
    by = Counter(o.split(":")[0].replace(" ", "_") for o in outcomes.values())
    kinds = ("sent", "deleted", "withheld", "failed", "waiting", "not_sent")
    return {k: by.get(k, 0) for k in kinds}


def _lines(
    f: Findings, sampled: bool, flux: tuple[int, int], mended: dict[str, Any] | None
) -> list[str]:
    lines = [f"{d.kind:<16} {d.image_id}: {d.detail}" for d in f.drifts]
    lines += [f"unverified       {i}: {e}" for i, e in f.unverified]
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(f.by_kind().items()))
    lines.append(
        f"verified {f.checked} images: {len(f.drifts)} drift(s)"
        + (f" ({kinds})" if kinds else "")
        + f", {len(f.unverified)} unverified"
    )
    if f.stopped:
        lines.append(f"stopped early ({f.stopped}): {f.not_checked} images not checked")
    if f.listed is False and not sampled:
        lines.append("orphans: not looked for (the search context cannot list its image IDs)")
    if f.filled:
        lines.append(f"filled {f.filled} features count(s) the ledger lacked")
    pending, marked = flux
    if pending:
        lines.append(
            f"pending: {pending} image(s) not checked, in flux in the ledger (failed, or "
            f"waiting for a retry), {marked} marked by a repair and not yet mended"
        )
    if mended is None:
        return lines
    c = mended["counts"]
    if mended["daemon_pid"] is not None:
        lines.append(
            f"repair: {len(mended['outcomes'])} drift(s) marked; a daemon (pid "
            f"{mended['daemon_pid']}) syncs with this ledger and mends them within seconds; "
            "`featsync verify` again to see"
        )
        return lines
    if mended["holder"] is not None:
        h = mended["holder"]
        lines.append(
            f"repair: {len(mended['outcomes'])} drift(s) marked, none sent: the sync lock "
            f"is held by pid {h['pid']} ({h['role']}), which is no daemon and does not act "
            "on the marks; the next cycle (`featsync reconcile` once it is done, or a "
            "daemon) mends them"
        )
        return lines
    lines.append(
        ("repair stopped (a signal)" if mended["stopped"] else "repair")
        + f": {c['sent']} sent again, {c['deleted']} deleted, {c['withheld']} "
        f"delete(s) withheld by the delete guard, {c['failed']} failed, "
        f"{c['not_sent']} not sent"
    )
    for image_id, outcome in sorted(mended["outcomes"].items()):
        lines.append(f"  {outcome:<9} {image_id}")
    if c["not_sent"]:
        lines.append(
            "not sent: each is marked in the ledger; the next `featsync reconcile` (or a "
            "daemon) sends it"
        )
    if mended["withheld_reason"]:
        lines.append(
            f"withheld: {mended['withheld_reason']}; `featsync reconcile --confirm-deletes` "
            "sends them"
        )
    return lines


# -- the daemon's rolling review ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reviewed:
    """One review: its findings and the range of image IDs it covered."""

    findings: Findings
    start: str  # after this ID ("": the start)
    end: str | None  # up to this one (None: to the end, then the next starts over)


def review(
    ledger: SqlLedger,
    context: SearchContext,
    settings: Settings,
    stop: Callable[[], bool],
    progress: Callable[[], None],
    started: Callable[[int, str], None] = lambda _n, _start: None,
) -> Reviewed:
    """Check the next max(verify_min, verify_sample x rows) ledger rows after the cursor
    where the last review stopped, and the IDs the context holds in the same range; the
    cursor moves on (kept in the ledger, so a restart continues) unless the review was
    cut short. Every row is looked at once per rows / batch reviews."""
    d = settings.daemon
    same_context(ledger, context, None)  # the daemon bound them; a store replaced since?
    n = max(1, d.verify_min, math.ceil(d.verify_sample * ledger.row_count()))
    start = ledger.review_cursor()
    rows = ledger.believed_after(start, n)
    end = rows[-1].image_id if len(rows) == n else None
    started(len(rows), start)
    check = Check(
        context,
        settings.sync.concurrency,
        stop,
        progress,
        ledger.fill_counts,
        prefix=settings.sync.id_prefix,
    )
    check.rows(rows)
    if not check.found.stopped:
        check.listing(ledger.believed_of, start, end)
    found = check.confirm(ledger.believed_of)
    if not found.stopped:
        ledger.set_review_cursor(end or "")
    return Reviewed(found, start, end)


def log_review(log: Any, done: Reviewed, seconds: float, repair: bool) -> None:
    """A finished review's lines: `review_finished`; `review_failed` if the context
    failed it; `context_drift` with the counts by kind if it found drift."""
    f = done.findings
    log.info(
        "review_finished",
        checked=f.checked,
        drift=len(f.drifts),
        unverified=len(f.unverified),
        filled=f.filled,
        orphans_looked_for=f.listed,
        after=done.start,
        until=done.end,
        stopped=f.stopped,
        duration_ms=round(seconds * 1000, 1),
    )
    if f.stopped:
        log.warning("review_failed", error=f.stopped, not_checked=f.not_checked)
    if f.drifts:
        log.warning(
            "context_drift",
            count=len(f.drifts),
            by_kind=f.by_kind(),
            image_ids=[d.image_id for d in f.drifts[:20]],
            repair=repair,
        )
