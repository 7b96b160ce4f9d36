"""`featsync reconcile`: one cycle from the command line, and what it prints.

On a terminal a live progress line (featsync.progress) while it works and one plain
summary line on stderr at the end; with `--json` the cycle's result (or, with
`--dry-run`, the plan) as one JSON document on stdout. A SIGINT/SIGTERM stops it
cleanly (featsync.stopping): the cycle is recorded as interrupted, the exit is 128 +
the signal's number.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from featsync import jsonout, logs, plan_text, progress
from featsync.config import Settings
from featsync.engine import CycleReport, Engine, Stopped
from featsync.errors import Fatal, FeatsyncError, Transient
from featsync.escapes import printable
from featsync.looks import EXIT_FATAL, EXIT_NOT_IN_STEP, EXIT_OK
from featsync.model import CycleLedger, Plan, SearchContext
from featsync.stopping import Stop, stop_on_signals

STOPPED_SCANNING = "stopped while scanning: nothing was sent"


class _Said:
    """Whether the one JSON document of `--json` is printed yet (a failure after the
    cycle's result must not print a second one)."""

    def __init__(self, dry_run: bool, as_json: bool) -> None:
        self.dry_run, self.as_json = dry_run, as_json
        self.started = time.time()
        self.done = False

    def emit(self, data: dict[str, Any]) -> None:
        if self.as_json and not self.done:
            jsonout.emit(data)
        self.done = True

    def failure(self, error: str, interrupted: bool = False) -> None:
        """The document of a run that never had a cycle's result: the same shape, with
        nothing done, `in_step` false and `error` set."""
        if self.dry_run:
            self.emit(dry_run_json(None, self.started, error))
        else:
            self.emit(result_json(None, self.started, error, interrupted))


def run(
    settings: Settings, dry_run: bool, confirm_deletes: bool, resync: bool, as_json: bool = False
) -> int:
    said = _Said(dry_run, as_json)
    if resync and dry_run:
        return _fatal(
            said,
            Fatal(
                "--resync sends every image again; a dry run cannot show that "
                "plan (it would be: add every image of the folder)"
            ),
        )
    # The handlers are in place for the whole command, and until all is printed: a
    # Ctrl-C while the ledger or the context opens is no traceback either, and a
    # second one while the result is printed does not cut it short.
    with stop_on_signals() as stop:
        try:
            code = _run(settings, dry_run, confirm_deletes, resync, said, stop)
        except FeatsyncError as exc:
            return _fatal(said, exc)
        finally:
            sys.stdout.flush()  # out (into a pipe too) before the handlers are put back
        return stop.exit_code if stop.signum is not None else code


def _fatal(said: _Said, exc: FeatsyncError) -> int:
    """A run that failed: its JSON document (with the error) if none is printed yet,
    then the error said as featsync.cli says a fatal one (exit 2; 1 for an error a
    later run may not meet)."""
    said.failure(str(exc))
    if not progress.on_terminal():
        logs.get().error("fatal_error", error=str(exc))
    print(f"featsync: {printable(str(exc))}", file=sys.stderr, flush=True)
    return EXIT_FATAL if isinstance(exc, Fatal) else EXIT_NOT_IN_STEP


def _run(
    settings: Settings,
    dry_run: bool,
    confirm_deletes: bool,
    resync: bool,
    said: _Said,
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
                if not dry_run:  # a dry run calls no service: it plans offline, as ever
                    check_access(context, logs.get(), stop.is_set)
                return _cycle(settings, ledger, context, confirm_deletes, resync, said, stop)
            finally:
                context.close()
        finally:
            ledger.close()
    finally:
        lock.release()


def check_access(
    context: SearchContext, log: Any, stop: Callable[[], bool] = lambda: False
) -> None:
    """A context that needs credentials (Aspose) fetches a token now, before the scan:
    a client ID or secret the token endpoint refuses is said (Fatal: exit 2) even when
    the plan would send nothing. Anything else (the endpoint down, busy, a timeout) is
    a warning: the run goes on as it would have (a cycle with nothing to send needs no
    token). Once `stop()` is true (Ctrl-C): the check is not waited for."""
    check = getattr(context, "check_access", None)
    if check is None:
        return
    failed: list[BaseException] = []

    def attempt() -> None:
        try:
            check()
        except BaseException as exc:  # handed to the waiting thread
            failed.append(exc)

    # In a thread of its own: its retries (with backoff) must not hold up a stop
    worker = threading.Thread(target=attempt, name="featsync-check-access", daemon=True)
    worker.start()
    while worker.is_alive() and not stop():
        worker.join(0.1)
    if worker.is_alive():
        return  # stopped: the cycle stops at once, before it sends anything
    if failed and isinstance(failed[0], Transient):
        log.warning(
            "access_not_checked",
            error=str(failed[0]),
            reason="the token endpoint did not answer; the cycle goes on",
        )
    elif failed:
        raise failed[0]


def _cycle(
    settings: Settings,
    ledger: CycleLedger,
    context: SearchContext,
    confirm_deletes: bool,
    resync: bool,
    said: _Said,
    stop: Stop,
) -> int:
    dry_run, started = said.dry_run, said.started
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
            _said(engine.last, said, error=str(failed))
        raise failed
    if report is None:
        logs.get().info("cycle_stopped", reason="signal, while scanning")
        progress.summary_line(
            f"stopped while scanning: nothing sent in {_secs(time.time() - started)}"
        )
        said.failure(STOPPED_SCANNING, interrupted=True)
        return EXIT_NOT_IN_STEP
    if dry_run:
        if said.as_json:
            said.emit(dry_run_json(report, started))
        else:
            print("\n".join(plan_text.describe(report.plan, report.rows)))
    else:
        _said(report, said)
    return EXIT_OK if report.in_step else EXIT_NOT_IN_STEP


def _said(report: CycleReport, said: _Said, error: str | None = None) -> None:
    """The summary line on a terminal, and the JSON result with --json."""
    progress.summary_line(summary(report))
    said.emit(result_json(report, said.started, error))


def _secs(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def summary(report: CycleReport) -> str:
    """One line for a person: "1000 added, 0 updated, 0 deleted, 0 failed in 42 s",
    with what else is not zero (unchanged, withheld deletes, not sent)."""
    a, p = report.applied, report.plan
    assert a is not None
    failed = a.failed + len(p.waiting)
    line = f"{a.added} added, {a.updated} updated, {a.deleted} deleted, {failed} failed"
    # how to release them only where that helps (not while the folder is in doubt)
    how = f" ({plan_text.CONFIRM})" if plan_text.release(p) == plan_text.CONFIRM else ""
    extra = [
        (p.unchanged, "unchanged"),
        (len(p.withheld), "deletes withheld" + how),
        (a.not_sent + a.deferred, "left for the next cycle"),
    ]
    line += "".join(f", {n} {what}" for n, what in extra if n)
    line += f" in {_secs(report.duration_ms / 1000)}"
    if report.interrupted:
        line = "interrupted: " + line
    if not report.snapshot.complete:
        line += " (the scan was incomplete)"
    return line


def result_json(
    report: CycleReport | None, started: float, error: str | None = None, interrupted: bool = False
) -> dict[str, Any]:
    """The cycle's result for a script (`reconcile --json`); None: the run failed or
    stopped before a cycle's result (nothing done, `error` says why). One shape."""
    a = report.applied if report is not None else None
    p = report.plan if report is not None else Plan()
    took = report.duration_ms if report is not None else (time.time() - started) * 1000
    return {
        "started_at": jsonout.iso(started),
        "finished_at": jsonout.iso(started + took / 1000),
        "duration_ms": took,
        "in_step": report is not None and report.in_step and error is None,
        "complete": report is not None and report.snapshot.complete,
        "interrupted": report.interrupted if report is not None else interrupted,
        "counts": {
            "added": a.added if a else 0,
            "updated": a.updated if a else 0,
            "deleted": a.deleted if a else 0,
            "unchanged": p.unchanged,
            "failed": (a.failed if a else 0) + len(p.waiting),
            "withheld_deletes": len(p.withheld),
            "deferred": a.deferred if a else 0,
            "not_sent": a.not_sent if a else 0,
            "weak": a.weak if a else 0,
        },
        "failures": [{"image_id": i, "error": e} for i, e in (a.failures if a else [])],
        "waiting": list(p.waiting),
        "withheld_deletes": {
            "image_ids": [w.image_id for w in p.withheld],
            "reason": p.withheld_reason,
            "release": None if plan_text.release(p) != plan_text.CONFIRM else plan_text.CONFIRM,
        },
        "problems": plan_text.problems(report.snapshot) if report is not None else [],
        "error": error,
    }


def dry_run_json(
    report: CycleReport | None, started: float, error: str | None = None
) -> dict[str, Any]:
    """The plan for a script (`reconcile --dry-run --json`); None: the run failed or
    stopped before it had one (an empty plan, `error` says why). One shape."""
    if report is None:
        took = (time.time() - started) * 1000
        return {
            **plan_text.as_json(Plan(), {}, complete=False),
            "in_step": False,
            "duration_ms": took,
            "problems": [],
            "error": error,
        }
    return {
        **plan_text.as_json(report.plan, report.rows, report.snapshot.complete),
        "in_step": report.in_step and error is None,
        "duration_ms": report.duration_ms,
        "problems": plan_text.problems(report.snapshot),
        "error": error,
    }
