"""`featsync reconcile`: one cycle from the command line, and what it prints.

On a terminal a live progress line (featsync.progress) while it works and one plain
summary line on stderr at the end; with `--json` the cycle's result (or, with
`--dry-run`, the plan) as one JSON document on stdout. A SIGINT/SIGTERM stops it
cleanly (featsync.stopping): the cycle is recorded as interrupted, the exit is 128 +
the signal's number.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from featsync import jsonout, logs, plan_text, progress
from featsync.config import Settings
from featsync.engine import CycleReport, Engine, Stopped
from featsync.errors import Fatal
from featsync.looks import EXIT_FATAL, EXIT_NOT_IN_STEP, EXIT_OK
from featsync.model import CycleLedger, SearchContext
from featsync.stopping import Stop, stop_on_signals


def run(
    settings: Settings, dry_run: bool, confirm_deletes: bool, resync: bool, as_json: bool = False
) -> int:
    if resync and dry_run:
        print(
            "featsync: --resync sends every image again; a dry run cannot show that "
            "plan (it would be: add every image of the folder)",
            file=sys.stderr,
        )
        return EXIT_FATAL
    # The handlers are in place for the whole command: a Ctrl-C while the ledger or
    # the context opens is no traceback either.
    with stop_on_signals() as stop:
        code = _run(settings, dry_run, confirm_deletes, resync, as_json, stop)
        return stop.exit_code if stop.signum is not None else code


def _run(
    settings: Settings,
    dry_run: bool,
    confirm_deletes: bool,
    resync: bool,
    as_json: bool,
    stop: Stop,
) -> int:
    from featsync.ledger import SqlLedger
    from featsync.lock import SyncLock
    from featsync.wiring import open_context

    lock = SyncLock(settings.ledger.url)
    if not dry_run:  # a dry run writes nothing: it may look while a daemon syncs
        lock.acquire()
    try:
        ledger = SqlLedger(settings.ledger.url, read_only=dry_run)
        try:
            context = open_context(settings, logs.get(), read_only=dry_run)
            try:
                check_access(context)
                return _cycle(
                    settings, ledger, context, dry_run, confirm_deletes, resync, as_json, stop
                )
            finally:
                context.close()
        finally:
            ledger.close()
    finally:
        lock.release()


def check_access(context: SearchContext) -> None:
    """A context that needs credentials (Aspose) fetches a token now, before the scan:
    a wrong client ID or secret is said (Fatal: exit 2) even when the plan would send
    nothing."""
    check = getattr(context, "check_access", None)
    if check is not None:
        check()


def _cycle(
    settings: Settings,
    ledger: CycleLedger,
    context: SearchContext,
    dry_run: bool,
    confirm_deletes: bool,
    resync: bool,
    as_json: bool,
    stop: Stop,
) -> int:
    started = time.time()
    report: CycleReport | None = None
    failed: Fatal | None = None
    with progress.shown() as sink:
        engine = Engine(settings, ledger, context, logs.get(), stop=stop.is_set, sink=sink)
        try:
            report = engine.cycle(dry_run=dry_run, confirm_deletes=confirm_deletes, resync=resync)
        except Stopped:
            pass
        except Fatal as exc:
            failed = exc
    # the live line is gone: what follows is printed below it
    if failed is not None:
        if engine.last is not None:  # it ran, and then failed: say what it did
            _said(engine.last, started, as_json, error=str(failed))
        raise failed
    if report is None:
        logs.get().info("cycle_stopped", reason="signal, while scanning")
        progress.summary_line(
            f"stopped while scanning: nothing sent in {_secs(time.time() - started)}"
        )
        if as_json:
            jsonout.emit(_stopped_json(started, dry_run))
        return EXIT_NOT_IN_STEP
    if dry_run:
        if as_json:
            jsonout.emit(
                {
                    **plan_text.as_json(report.plan, report.rows, report.snapshot.complete),
                    "in_step": report.in_step,
                    "duration_ms": report.duration_ms,
                }
            )
        else:
            print("\n".join(plan_text.describe(report.plan, report.rows)))
    else:
        _said(report, started, as_json)
    return EXIT_OK if report.in_step else EXIT_NOT_IN_STEP


def _said(report: CycleReport, started: float, as_json: bool, error: str | None = None) -> None:
    """The summary line on a terminal, and the JSON result with --json."""
    progress.summary_line(summary(report))
    if as_json:
        jsonout.emit(result_json(report, started, error))


def _secs(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def summary(report: CycleReport) -> str:
    """One line for a person: "1000 added, 0 updated, 0 deleted, 0 failed in 42 s",
    with what else is not zero (unchanged, withheld deletes, not sent)."""
    a, p = report.applied, report.plan
    assert a is not None
    failed = a.failed + len(p.waiting)
    line = f"{a.added} added, {a.updated} updated, {a.deleted} deleted, {failed} failed"
    extra = [
        (p.unchanged, "unchanged"),
        (len(p.withheld), "deletes withheld (featsync reconcile --confirm-deletes)"),
        (a.not_sent + a.deferred, "left for the next cycle"),
    ]
    line += "".join(f", {n} {what}" for n, what in extra if n)
    line += f" in {_secs(report.duration_ms / 1000)}"
    if report.interrupted:
        line = "interrupted: " + line
    if not report.snapshot.complete:
        line += " (the scan was incomplete)"
    return line


def result_json(report: CycleReport, started: float, error: str | None = None) -> dict[str, Any]:
    """The cycle's result for a script (`reconcile --json`)."""
    a, p = report.applied, report.plan
    assert a is not None
    return {
        "started_at": jsonout.iso(started),
        "finished_at": jsonout.iso(started + report.duration_ms / 1000),
        "duration_ms": report.duration_ms,
        "in_step": report.in_step and error is None,
        "complete": report.snapshot.complete,
        "interrupted": report.interrupted,
        "counts": {
            "added": a.added,
            "updated": a.updated,
            "deleted": a.deleted,
            "unchanged": p.unchanged,
            "failed": a.failed + len(p.waiting),
            "withheld_deletes": len(p.withheld),
            "deferred": a.deferred,
            "not_sent": a.not_sent,
            "weak": a.weak,
        },
        "failures": [{"image_id": i, "error": e} for i, e in a.failures],
        "waiting": list(p.waiting),
        "withheld_deletes": {
            "image_ids": [w.image_id for w in p.withheld],
            "reason": p.withheld_reason,
            "release": None if not p.withheld or p.doubtful else plan_text.CONFIRM,
        },
        "error": error,
    }


def _stopped_json(started: float, dry_run: bool) -> dict[str, Any]:
    return {
        "started_at": jsonout.iso(started),
        "finished_at": jsonout.iso(time.time()),
        "dry_run": dry_run,
        "in_step": False,
        "complete": False,
        "interrupted": True,
        "error": "stopped while scanning: nothing was sent",
    }
