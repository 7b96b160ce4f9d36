"""The daemon's sync thread, featsync-sync: the one thread that runs cycles.

Every cycle runs here, full and targeted, one at a time, and so do the pauses after
an outage. Its work is posted to it: full rescans asked for in `Requests` (kept while
a cycle runs, served after it, folded when asked for twice), changed paths in the
daemon's `Pending` (a targeted cycle once they went quiet), and failed images whose
wait is over (read from the ledger, where `featsync retry` clears waits). A reload's
new engine (and ledger and context) is handed to it (`hand_over`) and taken over
between cycles.

It owns the engine, the ledger, the context and the ledger's lock from the start to
the stop: the main thread opens them (at the start, on a reload) and closes them once
this thread has ended. Other threads only read its attributes. What the main thread
must act on (the first full rescan began, a watch to start again, a new STATUS= line)
this thread sets as a flag on it, then wakes it.

The ledger's counts the heartbeat and STATUS= report are read here too (at the start,
after each cycle, when a pause begins, after a reload that opened the ledger anew) and
kept in `counts` with the time of the read: the main thread never waits on the ledger
for them (see featsync.daemon).

The reviews of the search context run here as well, between cycles, every [daemon]
verify_interval (timed by this thread: a review is its own work, never posted twice,
and one that comes late is only late): a rolling sample of the ledger's images GET
from the context (featsync.verify.review); drift is logged as `context_drift`, kept
until mended (`drifted`: an ID goes when a cycle records it, synced or deleted, or a
later review of its range finds it clean; counted by kind in `drift` for the
heartbeat), and with [daemon] repair = true marked in the ledger and mended by a full
cycle right away. A review stops with the daemon like a cycle does; one stopped or
failed part way changes neither the drift kept nor the time of the last review.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from featsync import config
from featsync.drift import Drift, DriftKept
from featsync.engine import CycleReport, Engine, Stopped
from featsync.errors import FeatsyncError
from featsync.ledger import SqlLedger
from featsync.lock import SyncLock
from featsync.model import RootState, SearchContext, State
from featsync.rescans import Requests
from featsync.scan import image_id_for
from featsync.systemd import Pulse
from featsync.watch import Pending, Watcher

if TYPE_CHECKING:
    pass

# After an outage (transient errors in a row, or a fatal error such as refused
# credentials), the next try waits [daemon] outage_wait, doubling up to this cap.
OUTAGE_WAIT_CAP_S = 600.0
TICK_S = 0.5  # the longest either loop sleeps (flags are read this often)

Opened = tuple[SyncLock | None, SqlLedger, SearchContext]


@dataclass(frozen=True, slots=True)
class Reload:
    """A reloaded config, handed from the main thread to the sync thread."""

    settings: config.Settings
    fresh: Opened | None  # a ledger and context opened anew (and the lock of a new ledger)


@dataclass(frozen=True, slots=True)
class Counts:
    """The ledger's images by state, as the sync thread last read them."""

    by_state: Mapping[str, int]
    at: float  # time.monotonic() of the read


class Main(Protocol):
    """The main thread (the daemon), as the sync thread sees it."""

    pending: Pending  # the Pending of now: a reload may replace it
    watcher: Watcher | None
    # Set here, acted on (and cleared) by the main thread once woken.
    rescan_started: bool  # the first full rescan began: READY=1
    rewatch: bool  # try to start a watch that should run but does not
    restart_watch: bool  # the watched folder is back: watch it anew
    status_due: bool  # something changed: a new STATUS= line

    def stopping(self) -> bool: ...

    def request_full(self, reason: str) -> None: ...

    def wake_main(self) -> None: ...


class SyncThread:
    """featsync-sync: serves what is posted, one cycle at a time, until the stop."""

    def __init__(
        self,
        main: Main,
        settings: config.Settings,
        opened: Opened,
        requests: Requests,
        pulse: Pulse,
        log: Any,
        watchdog_s: float | None,
    ) -> None:
        self.main = main
        self.requests = requests
        self.pulse = pulse
        self.log = log
        self.watchdog_s = watchdog_s  # systemd's watchdog interval (None: no watchdog)
        self.lock, self.ledger, self.context = opened
        self.engine = self._engine(settings, self.ledger, self.context)
        self.running: str | None = None  # "full" or "paths" while a cycle runs
        self.synced_since_start = 0
        self.last_good: float | None = None  # monotonic time of the last good cycle
        self.outage_wait = 0.0
        self.outage_until = 0.0  # monotonic: no targeted cycles before this
        self.rescan_after_pause = False  # a full cycle was cut short by an outage
        self.root_lost = False  # the last full rescan found no folder
        self.counts: Counts | None = None  # for the heartbeat, which never reads the ledger
        # (image ID, updated_at) of due rows no path reaches, a full cycle asked for them
        self.asked_full_for: frozenset[tuple[str, float]] = frozenset()
        self.kept = DriftKept()  # drift found by reviews and not yet mended
        self.reviewed_at: float | None = None  # monotonic: the last finished review's end
        self.review_from = time.monotonic()  # the next review is due verify_interval after
        # A reload waiting for this thread: set by the main thread only when empty,
        # emptied here once taken over.
        self.handoff: Reload | None = None
        self._thread: threading.Thread | None = None
        self._count()  # before the thread starts: the heartbeat's counts until a cycle's

    def _engine(self, settings: config.Settings, ledger: SqlLedger, ctx: SearchContext) -> Engine:
        return Engine(
            settings,
            ledger,
            ctx,
            self.log,
            stop=self.main.stopping,
            progress=self.pulse.progress,
            hold=self._holds,
        )

    def _holds(self, rel: str) -> bool:
        return self.main.pending.holds(rel)  # the Pending of now: a reload may replace it

    # -- the main thread's side ----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="featsync-sync", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the thread to end; whether it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def hand_over(self, reload: Reload) -> None:
        """Hand a reload over (only when `handoff` is empty); taken over between cycles."""
        self.handoff = reload
        self.requests.poke()

    def close(self) -> None:
        """Once the thread has ended: close what it held, and a reload never taken over."""
        handoff = self.handoff
        if handoff is not None and handoff.fresh is not None:
            _close(handoff.fresh[2], handoff.fresh[1], handoff.fresh[0])
        _close(self.context, self.ledger, self.lock)

    # -- the sync thread ---------------------------------------------------------------

    def _serve(self) -> None:
        """The sync thread: serve what is posted, one cycle at a time, until the stop."""
        while not self.main.stopping():
            self.pulse.loop()
            try:
                self._sync_turn()
            except Exception as exc:  # the ledger unreachable, or a bug: pause, go on
                self.log.exception("loop_error", error=f"{type(exc).__name__}: {exc}")
                self._outage(f"{type(exc).__name__}: {exc}")
            if self.main.stopping():
                break
            self.requests.wait(self._sync_sleep())

    def _sync_turn(self) -> None:
        handoff = self.handoff
        if handoff is not None:
            try:
                self._take_over(handoff)
            finally:
                self.handoff = None  # the main thread may hand over the next one
        reasons = self.requests.take_full()
        if reasons:
            if not self.main.rescan_started:
                self.main.rescan_started = True
                self.main.wake_main()
            self._cycle(None, ",".join(reasons))
        elif time.monotonic() >= self.outage_until:
            if self.rescan_after_pause:
                self.rescan_after_pause = False
                self._cycle(None, "after pause")
            else:
                self._targeted()
                interval = self.engine.settings.daemon.verify_interval
                if interval and time.monotonic() >= self.review_from + interval:
                    self._review()

    def _sync_sleep(self) -> float:
        now = time.monotonic()
        tick = TICK_S
        if self.watchdog_s is not None:  # turns often enough to count as alive
            tick = min(tick, self.watchdog_s / 4)
        until = now + tick
        due = self.main.pending.next_due()
        if due is not None:
            until = min(until, max(due, self.outage_until))
        return max(0.01, until - now)

    def _targeted(self) -> None:
        """A cycle over the paths that went quiet and the failed images now due."""
        engine = self.engine
        root = engine.settings.sync.folder
        paths = set(self.main.pending.take(lambda rel: _size(os.path.join(root, rel))))
        # By the path found on disk: an ID is not a path (an NFD name's ID is NFC)
        due, unreached = self.ledger.due_work(time.time(), engine.settings.sync.id_prefix)
        paths.update(due)
        if unreached:
            # No path reaches these rows: a full cycle judges them, asked for once (a
            # row that cycle left as it was is not asked for again; a new failure
            # recorded on it, a new updated_at, is)
            asked = frozenset(unreached)
            if not asked <= self.asked_full_for:
                self.main.request_full("due, no path")
            self.asked_full_for = asked
        if paths:
            self._cycle(sorted(paths), "changes", self._gone_meanwhile(root, paths))

    def _gone_meanwhile(self, root: str, judged: set[str]) -> int:
        """Images the context holds whose files (or folders) the watcher saw go but a
        later cycle will judge: they count against this cycle's delete limits, so a
        folder emptied in bursts is judged as a whole, not a few files at a time."""
        gone = [
            rel
            for rel in self.main.pending.paths()
            if rel not in judged and _size(os.path.join(root, rel)) is None
        ]
        if not gone:
            return 0
        prefix = self.engine.settings.sync.id_prefix
        ids = [image_id_for(rel.strip("/"), prefix) for rel in gone]
        rows = self.ledger.rows_in_scope(ids, [i + "/" for i in ids])
        return sum(1 for r in rows.values() if r.remote and r.state != State.DELETED)

    def _cycle(self, scope: list[str] | None, reason: str, pending_gone: int = 0) -> None:
        engine = self.engine
        if self.main.stopping():
            return
        self.running = "full" if scope is None else "paths"
        self.pulse.cycles += 1
        self.pulse.progress()
        try:
            report = engine.cycle(scope=scope, pending_gone=pending_gone)
            self._after(report, scope)
        except Stopped:
            self.log.info("cycle_stopped", reason="stop requested")
        except FeatsyncError as exc:
            self.log.error("cycle_failed", trigger=reason, error=str(exc))
            self._outage(str(exc))
        except Exception as exc:  # a bug must not end the daemon; the next rescan retries
            self.log.exception("cycle_crashed", trigger=reason, error=f"{type(exc).__name__}")
            self._outage(f"{type(exc).__name__}: {exc}")
        finally:
            self.pulse.cycles -= 1
            self.running = None

    def _after(self, report: CycleReport, scope: list[str] | None) -> None:
        w = self.main.watcher
        if scope is None and w is not None and w.mode != "off" and w.active == "off":
            self.main.rewatch = True
            self.main.wake_main()
        # A folder that went missing (unmounted, moved away) and is back is another
        # directory to the kernel: the old watch sees nothing of it. Watch it anew.
        if scope is None and report.snapshot.root_state is not RootState.OK:
            self.root_lost = True
        elif scope is None and self.root_lost:
            self.root_lost = False
            self.main.restart_watch = True
            self.main.wake_main()
        a = report.applied
        if a is not None:
            self.synced_since_start += a.added + a.updated + a.deleted
            if a.added + a.updated + a.deleted:
                self._drop_mended()
        # What this cycle could not finish is looked at again: the paths of a targeted
        # cycle go back to waiting; a full cycle cut short (calls not sent) is run again
        # after the pause. Files a full cycle found still being written are not a reason
        # to rescan everything at once: their own events bring them back (else the next
        # scheduled rescan does), or a file written for minutes would mean a rescan a turn.
        cut_short = a is not None and bool(a.not_sent or a.backed_off)
        if scope is None and cut_short:
            self.rescan_after_pause = True
        elif scope is not None and (cut_short or report.plan.unsettled or (a and a.deferred)):
            root = report.snapshot.root
            for rel in scope:
                self.main.pending.mark(rel, _size(os.path.join(root, rel)))
        if a is not None and (a.backed_off or a.transient):
            self._outage(a.backed_off or "transient errors")
        elif report.good:
            self.last_good = time.monotonic()
            self.outage_wait = 0.0
            self.outage_until = 0.0
        self._status_soon()

    def _review(self) -> None:
        """Review the next rolling sample of the context; never raises (an error is
        logged and the next interval tries again)."""
        from featsync import verify

        self.running = "review"
        self.pulse.cycles += 1  # the watchdog pings while the review moves on
        self.pulse.progress()
        began = time.monotonic()
        try:
            done = verify.review(
                self.ledger,
                self.context,
                self.engine.settings,
                self.main.stopping,
                self.pulse.progress,
                lambda n, start: self.log.info("review_started", images=n, after=start),
            )
        except Exception as exc:  # transient, fatal, a bug: say so, try next interval
            self.log.warning("review_failed", error=f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.pulse.cycles -= 1
            self.running = None
            self.review_from = time.monotonic()
        f = done.findings
        if f.stopped == "stop requested":
            self.log.info("review_stopped", checked=f.checked, not_checked=f.not_checked)
            return
        repair = self.engine.settings.daemon.repair
        verify.log_review(self.log, done, time.monotonic() - began, repair and not f.stopped)
        if f.stopped:  # failed part way (review_failed): as if it had not run
            return
        self.reviewed_at = time.monotonic()
        try:
            self.kept.reviewed(done.start, done.end, done.findings, self.ledger.believed_of)
        except Exception as exc:  # the ledger unreadable: the drift kept as it was
            self.log.warning("drift_not_updated", error=f"{type(exc).__name__}: {exc}")
        if f.drifts and repair:
            self._repair(f.drifts)
        self._status_soon()

    def _drop_mended(self) -> None:
        try:
            self.kept.drop_mended(self.ledger.believed_of)
        except Exception as exc:  # kept as it is; the next cycle looks again
            self.log.warning("drift_not_updated", error=f"{type(exc).__name__}: {exc}")

    @property
    def drift(self) -> dict[str, int] | None:
        """The heartbeat's `drift` (featsync.drift.DriftKept)."""
        return self.kept.counts

    def _repair(self, drifts: list[Drift]) -> None:
        """Mark the drifts "may hold" and mend them with a full cycle, now (the cycle
        drops what it mended from `drifted`)."""
        from featsync import verify

        self.ledger.mark_drift(drifts, time.time())
        self._cycle(None, "repair")
        outcomes = self.ledger.repair_outcomes([d.image_id for d in drifts])
        by = verify.outcome_counts(outcomes)
        self.log.info("verify_repaired", drifts=len(drifts), daemon_pid=os.getpid(), **by)

    def _outage(self, error: str) -> None:
        first = self.engine.settings.daemon.outage_wait
        self.outage_wait = min(max(OUTAGE_WAIT_CAP_S, first), max(first, self.outage_wait * 2))
        # ±10% jitter: daemons that lost the same service do not come back in step
        pause = round(self.outage_wait * random.uniform(0.9, 1.1), 2)
        self.outage_until = time.monotonic() + pause
        self.log.warning("sync_paused", error=error, retry_in_s=pause)
        self._status_soon()

    def _status_soon(self) -> None:
        """Something changed (a cycle ended, a pause began): the counts read anew, then
        a new STATUS= line."""
        self._count()
        self.main.status_due = True
        self.main.wake_main()

    def _count(self) -> None:
        """Read the ledger's counts for the heartbeat and STATUS=. Also called on the
        way out of an error: it never raises; the counts kept say how old they are."""
        try:
            self.counts = Counts(self.ledger.counts(), time.monotonic())
        except Exception as exc:
            self.log.warning("counts_failed", error=f"{type(exc).__name__}: {exc}")

    def _take_over(self, r: Reload) -> None:
        """Between cycles: the reloaded config's engine from now on."""
        old: tuple[SearchContext | None, SqlLedger | None, SyncLock | None] | None = None
        if r.fresh is not None:
            lock, ledger, context = r.fresh
            # The same ledger: the lock stays ours. Another: the new one is held already.
            old = (self.context, self.ledger, self.lock if lock is not None else None)
            self.ledger, self.context = ledger, context
            if lock is not None:
                self.lock = lock
        self.engine = self._engine(r.settings, self.ledger, self.context)
        if r.fresh is not None:  # another ledger or context: the drift found is not theirs
            self.kept, self.reviewed_at = DriftKept(), None
        self.main.request_full("reload")
        if old is not None:
            self._count()  # of the ledger now in use
            _close(*old)


def _close(context: SearchContext | None, ledger: SqlLedger | None, lock: SyncLock | None) -> None:
    """Close a context and a ledger, then let the lock go (even if closing failed)."""
    try:
        if context is not None:
            context.close()
        if ledger is not None:
            ledger.close()
    finally:
        if lock is not None:
            lock.release()


def _size(path: str) -> int | None:
    try:
        return os.lstat(path).st_size
    except OSError:
        return None
