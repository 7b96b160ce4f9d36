"""`featsync reconcile`: one cycle from the command line, and what it prints."""

from __future__ import annotations

import sys

from featsync import logs
from featsync.config import Settings
from featsync.looks import EXIT_FATAL, EXIT_NOT_IN_STEP, EXIT_OK
from featsync.stopping import stop_on_signals


def run(settings: Settings, dry_run: bool, confirm_deletes: bool, resync: bool) -> int:
    from featsync.engine import Engine, Stopped, describe
    from featsync.ledger import SqlLedger
    from featsync.lock import SyncLock
    from featsync.wiring import open_context

    if resync and dry_run:
        print(
            "featsync: --resync sends every image again; a dry run cannot show that "
            "plan (it would be: add every image of the folder)",
            file=sys.stderr,
        )
        return EXIT_FATAL
    lock = SyncLock(settings.ledger.url)
    if not dry_run:  # a dry run writes nothing: it may look while a daemon syncs
        lock.acquire()
    try:
        ledger = SqlLedger(settings.ledger.url, read_only=dry_run)
        try:
            context = open_context(settings, logs.get(), read_only=dry_run)
            try:
                with stop_on_signals() as stop:
                    engine = Engine(settings, ledger, context, logs.get(), stop=stop.is_set)
                    report = engine.cycle(
                        dry_run=dry_run, confirm_deletes=confirm_deletes, resync=resync
                    )
            except Stopped:
                logs.get().info("cycle_stopped", reason="signal, while scanning")
                return EXIT_NOT_IN_STEP
            finally:
                context.close()
        finally:
            ledger.close()
    finally:
        lock.release()
    if dry_run:
        print("\n".join(describe(report.plan)))
    return EXIT_OK if report.in_step else EXIT_NOT_IN_STEP
