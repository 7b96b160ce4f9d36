"""`featsync run`: the daemon that keeps a search context in step with a folder.

The composition root: one Engine, a watchdog Watcher feeding a Pending set, an
APScheduler timer for full rescans, signal handling, systemd's notify protocol and a
heartbeat in the logs.

Threads and who does what (one owner for every cycle):
- featsync-sync, the sync thread: every cycle, full and targeted, one at a time, and
  the pauses after an outage. Its work is posted to it: full rescans asked for in
  `Requests` (kept while a cycle runs, served after it, folded when asked for twice),
  changed paths in `Pending` (a targeted cycle once they went quiet), and failed
  images whose wait is over (read from the ledger, where `featsync retry` clears
  waits). A reload's new engine (and ledger and context) is handed to it and taken
  over between cycles;
- watchdog's observer thread: the Handler notes changed paths and pokes the sync
  thread; a lost track (overflow, dead watch) posts a full rescan;
- APScheduler's threads: post a full rescan every rescan_interval (the daemon posts
  the first one, at start, itself);
- the main thread: signals, reloads (the config read, a new ledger and context opened,
  then handed over), the watcher's health, heartbeats, systemd notify (READY, STATUS,
  WATCHDOG, STOPPING) and the stop. It never runs a cycle nor waits for one, except on
  the stop, for at most stop_timeout.
Signal handlers only set plain attributes, no lock (an Event's lock, or the log's, taken
in a handler that interrupted its holder would deadlock): SIGTERM/SIGINT set the stop
flag that the engine reads while it scans and before each call, so any cycle stops at
once; Python's wakeup fd wakes the main thread.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from featsync import config, logs
from featsync.engine import CycleReport, Engine, Stopped, bind_context
from featsync.errors import FeatsyncError
from featsync.ledger import SqlLedger
from featsync.lock import SyncLock
from featsync.model import RootState, SearchContext, State
from featsync.rescans import Requests, Rescans
from featsync.scan import image_id_for
from featsync.systemd import Notifier, Pulse
from featsync.watch import ROOT_CHANGED, Handler, Pending, Watcher
from featsync.wiring import open_context, scan_rules

# After an outage (transient errors in a row, or a fatal error such as refused
# credentials), the next try waits [daemon] outage_wait, doubling up to this cap.
OUTAGE_WAIT_CAP_S = 600.0
_TICK_S = 0.5  # the longest either loop sleeps (flags are read this often)

Opened = tuple[SyncLock | None, SqlLedger, SearchContext]


@dataclass(frozen=True, slots=True)
class _Reload:
    """A reloaded config, handed from the main thread to the sync thread."""

    settings: config.Settings
    fresh: Opened | None  # a ledger and context opened anew (and the lock of a new ledger)


class Daemon:
    def __init__(
        self, config_path: str, settings: config.Settings, environ: Mapping[str, str] = os.environ
    ) -> None:
        self.config_path = config_path
        self.settings = settings  # the main thread's; the engine carries the sync thread's
        self.log = logs.get()
        self.notifier = Notifier(self.log, environ)
        self.pulse = Pulse()
        self.requests = Requests()
        self.pending = self._pending(settings)
        # Set by signal handlers, read by everyone.
        self._signal: int | None = None
        self._reload = False
        self._closing = False  # the main thread ends the sync thread (any way out)
        self._wake_r = self._wake_w = -1  # the main thread's wake-up pipe
        # The sync thread's alone (others only read them).
        self.lock: SyncLock | None = None
        self.ledger: SqlLedger | None = None
        self.context: SearchContext | None = None
        self.engine: Engine | None = None
        self.running: str | None = None  # "full" or "paths" while a cycle runs
        self.synced_since_start = 0
        self.last_good: float | None = None  # monotonic time of the last good cycle
        self.outage_wait = 0.0
        self.outage_until = 0.0  # monotonic: no targeted cycles before this
        self.rescan_after_pause = False  # a full cycle was cut short by an outage
        self.root_lost = False  # the last full rescan found no folder
        # Set by the sync or the watcher thread, acted on by the main thread.
        self.rewatch = False  # try to start a watch that should run but does not
        self.restart_watch = False  # the watched folder itself moved or went away
        self.rescan_started = False  # the first full rescan began: READY=1
        self.status_due = False  # something changed: a new STATUS= line
        # A reload waiting for the sync thread: set by the main thread only when empty,
        # emptied by the sync thread once taken over.
        self._handoff: _Reload | None = None
        # The main thread's alone.
        self.watcher: Watcher | None = None
        self.rescans: Rescans | None = None
        self.syncer: threading.Thread | None = None
        self.ready_sent = False
        self.next_heartbeat = 0.0
        self.next_ping = 0.0

    # -- set-up ------------------------------------------------------------------------

    @staticmethod
    def _pending(settings: config.Settings) -> Pending:
        d = settings.daemon
        return Pending(d.quiet_period, d.max_delay, d.max_pending)

    def _open(self, settings: config.Settings, take_lock: bool = True) -> Opened:
        """The ledger and the context, bound together; the ledger's lock first, unless
        it is the one the daemon holds already (a lock is never let go and taken again:
        another process could take it in between)."""
        lock = SyncLock(settings.ledger.url) if take_lock else None
        if lock is not None:
            lock.acquire()
        try:
            ledger = SqlLedger(settings.ledger.url)
            try:
                context = open_context(settings, self.log)
                try:  # another context than the ledger mirrors: refuse to start (exit 2)
                    bind_context(ledger, context, self.log)
                except BaseException:
                    context.close()
                    raise
                return lock, ledger, context
            except BaseException:
                ledger.close()
                raise
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def _engine(self, settings: config.Settings, ledger: SqlLedger, ctx: SearchContext) -> Engine:
        return Engine(
            settings,
            ledger,
            ctx,
            self.log,
            stop=self.stopping,
            progress=self.pulse.progress,
            hold=self._holds,
        )

    def _holds(self, rel: str) -> bool:
        return self.pending.holds(rel)  # the Pending of now: a reload may replace it

    def _watcher(self, settings: config.Settings) -> Watcher:
        handler = Handler(scan_rules(settings), self.pending, self.requests.poke, self._trouble)
        d = settings.daemon
        return Watcher(d.watcher, d.polling_interval, handler, self.log)

    def stopping(self) -> bool:
        """The stop flag: set by the SIGTERM/SIGINT handler itself."""
        return self._signal is not None or self._closing

    def request_full(self, reason: str) -> None:
        """Ask the sync thread for a full rescan (any thread; returns at once)."""
        if self.stopping():
            return
        if self.requests.full(reason) and self.running == "full":
            self.log.info("rescan_queued", reason=reason, after="the full rescan under way")

    def _trouble(self, reason: str) -> None:
        """The watcher lost track (overflow, handler error, dead watch): rescan all."""
        root_gone = reason == ROOT_CHANGED
        action = "watch again, full rescan" if root_gone else "full rescan"
        self.log.warning("watcher_problem", error=reason, action=action)
        if root_gone:  # a watch on a moved or unmounted folder sees nothing of its path
            self.restart_watch = True
            self._wake_main()
        self.request_full("watcher")

    # -- the main thread ---------------------------------------------------------------

    def run(self) -> int:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        previous = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
            return self._run()
        finally:
            signal.set_wakeup_fd(previous)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self) -> int:
        self.lock, self.ledger, self.context = self._open(self.settings)
        self.engine = self._engine(self.settings, self.ledger, self.context)
        s = self.settings
        self.log.info(
            "daemon_started",
            pid=os.getpid(),
            folder=s.sync.folder,
            context=s.context.kind,
            watcher=s.daemon.watcher,
            rescan_interval_s=s.daemon.rescan_interval,
            quiet_period_s=s.daemon.quiet_period,
            systemd_notify=self.notifier.enabled,
        )
        self.watcher = self._watcher(s)
        self.watcher.start()
        # The first cycle is a full rescan: posted before the sync thread can serve
        # anything else (failed images due, say).
        self.requests.full("start")
        self.syncer = threading.Thread(target=self._serve, name="featsync-sync", daemon=True)
        self.syncer.start()
        self.rescans = Rescans(self.request_full, self.log)
        self.rescans.start(s.daemon.rescan_interval)
        try:
            self._loop()
        finally:
            code = self._shutdown()
        return code

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Plain attributes only (see the module docstring). Setting `_signal` is the
        # stop: the engine and apply read it through `stopping`.
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._signal = signum

    def _wake_main(self) -> None:
        with contextlib.suppress(OSError):  # full: it wakes anyway; closed: it has ended
            os.write(self._wake_w, b"w")

    def _loop(self) -> None:
        now = time.monotonic()
        self.next_heartbeat = now + self.settings.daemon.heartbeat_interval
        self.next_ping = now
        while self._signal is None:
            try:
                self._turn()
            except Exception as exc:  # a bug, or the ledger unreadable: say so, go on
                self.log.exception("loop_error", error=f"{type(exc).__name__}: {exc}")
            if self._signal is not None:
                break
            ready, _, _ = select.select([self._wake_r], [], [], self._sleep())
            if ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 512):
                        pass

    def _turn(self) -> None:
        """One turn of the main loop: never a cycle, never a wait for one."""
        if self._reload and self._handoff is None:  # else: once the last one is taken over
            self._reload = False
            self._reload_config()
        self._tend_watcher()
        if self.pending.overflowed:
            self.pending.overflowed = False
            self.log.warning(
                "watch_overflow",
                max_pending=self.settings.daemon.max_pending,
                action="full rescan",
            )
            self.request_full("overflow")
        if self.rescan_started and not self.ready_sent:
            self.ready_sent = True
            self.notifier.send(READY="1", STATUS="first full rescan under way")
        if self.status_due:
            self.status_due = False
            self._status()
        now = time.monotonic()
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.settings.daemon.heartbeat_interval
            self._heartbeat()
        interval = self.notifier.watchdog_s
        if interval is not None and now >= self.next_ping:
            # WATCHDOG=1 at half systemd's interval, only once READY was said and only
            # while the sync thread makes progress (turns, or moves on in a cycle).
            self.next_ping = now + interval / 2
            if self.ready_sent and self.pulse.alive(interval):
                self.notifier.send(WATCHDOG="1")

    def _tend_watcher(self) -> None:
        watcher = self.watcher
        if watcher is None:
            return
        if self.restart_watch:
            self.restart_watch = False
            watcher.stop()
            if watcher.start() != "off":
                self.request_full("watcher")
        elif not watcher.alive():
            self.log.error("watcher_failed", mode=watcher.active, error="the watch died")
            watcher.stop()
            watcher.start()
            self.request_full("watcher")
        elif self.rewatch:
            # A watch that could not start (the folder missing, an inotify limit) is
            # tried again after each full rescan: once per rescan_interval at most.
            self.rewatch = False
            if watcher.start() != "off":
                self.request_full("watcher")

    def _sleep(self) -> float:
        now = time.monotonic()
        until = min(self.next_heartbeat, now + _TICK_S)
        if self.notifier.watchdog_s is not None:
            until = min(until, self.next_ping)
        return max(0.01, until - now)

    def _facts(self) -> dict[str, Any]:
        ledger, engine = self.ledger, self.engine
        counts = ledger.counts() if ledger is not None else {}
        age = None if self.last_good is None else round(time.monotonic() - self.last_good, 1)
        return {
            "pending": len(self.pending),
            "in_flight": engine.in_flight if engine is not None else 0,
            "quarantined": counts.get("failed", 0),
            "synced": counts.get("synced", 0),
            "synced_since_start": self.synced_since_start,
            "last_good_cycle_age_s": age,
            "watcher": self.watcher.active if self.watcher is not None else "off",
            "paused_for_s": round(max(0.0, self.outage_until - time.monotonic()), 1),
        }

    def _status(self) -> None:
        try:
            f = self._facts()
        except FeatsyncError:
            return  # the heartbeat reports what went wrong
        line = f"{f['synced']} synced, {f['pending']} pending, {f['quarantined']} quarantined"
        if f["paused_for_s"]:
            line += f", paused {f['paused_for_s']:.0f}s after errors"
        self.notifier.send(STATUS=line)

    def _heartbeat(self) -> None:
        try:
            facts = self._facts()
        except FeatsyncError as exc:
            self.log.error("heartbeat", error=str(exc))
            return
        self.log.info("heartbeat", **facts)
        self._status()

    # -- the sync thread ---------------------------------------------------------------

    def _serve(self) -> None:
        """The sync thread: serve what is posted, one cycle at a time, until the stop."""
        while not self.stopping():
            self.pulse.loop()
            try:
                self._sync_turn()
            except Exception as exc:  # the ledger unreachable, or a bug: pause, go on
                self.log.exception("loop_error", error=f"{type(exc).__name__}: {exc}")
                self._outage(f"{type(exc).__name__}: {exc}")
            if self.stopping():
                break
            self.requests.wait(self._sync_sleep())

    def _sync_turn(self) -> None:
        handoff = self._handoff
        if handoff is not None:
            try:
                self._take_over(handoff)
            finally:
                self._handoff = None  # the main thread may hand over the next one
        reasons = self.requests.take_full()
        if reasons:
            if not self.rescan_started:
                self.rescan_started = True
                self._wake_main()
            self._cycle(None, ",".join(reasons))
        elif time.monotonic() >= self.outage_until:
            if self.rescan_after_pause:
                self.rescan_after_pause = False
                self._cycle(None, "after pause")
            else:
                self._targeted()

    def _sync_sleep(self) -> float:
        now = time.monotonic()
        tick = _TICK_S
        if self.notifier.watchdog_s is not None:  # turns often enough to count as alive
            tick = min(tick, self.notifier.watchdog_s / 4)
        until = now + tick
        due = self.pending.next_due()
        if due is not None:
            until = min(until, max(due, self.outage_until))
        return max(0.01, until - now)

    def _targeted(self) -> None:
        """A cycle over the paths that went quiet and the failed images now due."""
        engine = self.engine
        assert engine is not None and self.ledger is not None
        root = engine.settings.sync.folder
        paths = set(self.pending.take(lambda rel: _size(os.path.join(root, rel))))
        # By the path found on disk: an ID is not a path (an NFD name's ID is NFC)
        paths.update(self.ledger.due_paths(time.time(), engine.settings.sync.id_prefix))
        if paths:
            self._cycle(sorted(paths), "changes", self._gone_meanwhile(root, paths))

    def _gone_meanwhile(self, root: str, judged: set[str]) -> int:
        """Images the context holds whose files (or folders) the watcher saw go but a
        later cycle will judge: they count against this cycle's delete limits, so a
        folder emptied in bursts is judged as a whole, not a few files at a time."""
        assert self.ledger is not None
        gone = [
            rel
            for rel in self.pending.paths()
            if rel not in judged and _size(os.path.join(root, rel)) is None
        ]
        if not gone:
            return 0
        assert self.engine is not None
        prefix = self.engine.settings.sync.id_prefix
        ids = [image_id_for(rel.strip("/"), prefix) for rel in gone]
        rows = self.ledger.rows_in_scope(ids, [i + "/" for i in ids])
        return sum(1 for r in rows.values() if r.remote and r.state != State.DELETED)

    def _cycle(self, scope: list[str] | None, reason: str, pending_gone: int = 0) -> None:
        engine = self.engine
        if engine is None or self.stopping():
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
        w = self.watcher
        if scope is None and w is not None and w.mode != "off" and w.active == "off":
            self.rewatch = True
            self._wake_main()
        # A folder that went missing (unmounted, moved away) and is back is another
        # directory to the kernel: the old watch sees nothing of it. Watch it anew.
        if scope is None and report.snapshot.root_state is not RootState.OK:
            self.root_lost = True
        elif scope is None and self.root_lost:
            self.root_lost = False
            self.restart_watch = True
            self._wake_main()
        a = report.applied
        if a is not None:
            self.synced_since_start += a.added + a.updated + a.deleted
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
                self.pending.mark(rel, _size(os.path.join(root, rel)))
        if a is not None and (a.backed_off or a.transient):
            self._outage(a.backed_off or "transient errors")
        elif report.good:
            self.last_good = time.monotonic()
            self.outage_wait = 0.0
            self.outage_until = 0.0
        self._status_soon()

    def _outage(self, error: str) -> None:
        first = self.settings.daemon.outage_wait
        self.outage_wait = min(max(OUTAGE_WAIT_CAP_S, first), max(first, self.outage_wait * 2))
        # ±10% jitter: daemons that lost the same service do not come back in step
        pause = round(self.outage_wait * random.uniform(0.9, 1.1), 2)
        self.outage_until = time.monotonic() + pause
        self.log.warning("sync_paused", error=error, retry_in_s=pause)
        self._status_soon()

    def _status_soon(self) -> None:
        self.status_due = True
        self._wake_main()

    # -- reload and stop --------------------------------------------------------------

    def _reload_config(self) -> None:
        """Read the config again and hand what changed to the sync thread, which takes
        it over between cycles (the main thread does not wait for that)."""
        old = self.settings
        try:
            new = config.load(self.config_path)
            if new == old:
                self.log.info("config_reloaded", changed=[])
                return
            changed = [f.name for f in fields(new) if getattr(new, f.name) != getattr(old, f.name)]
            reopen = new.ledger != old.ledger or new.context != old.context
            # Another ledger: its lock is taken now, ours let go only once it is in use.
            fresh = self._open(new, take_lock=new.ledger != old.ledger) if reopen else None
        except FeatsyncError as exc:
            self.log.error("config_reload_failed", error=str(exc), kept="the running config")
            return
        self.settings = new
        if new.log != old.log:
            logs.configure(new.log.format, new.log.level)
        if new.sync != old.sync or new.daemon != old.daemon:
            if self.watcher is not None:
                self.watcher.stop()
            self.pending = self._pending(new)
            self.watcher = self._watcher(new)
            self.watcher.start()
        if new.daemon.rescan_interval != old.daemon.rescan_interval:
            assert self.rescans is not None
            self.rescans.every(new.daemon.rescan_interval)
        self.log.info("config_reloaded", changed=changed)
        self._handoff = _Reload(new, fresh)
        self.requests.poke()

    def _take_over(self, r: _Reload) -> None:
        """The sync thread, between cycles: the reloaded config's engine from now on."""
        old: tuple[SearchContext | None, SqlLedger | None, SyncLock | None] | None = None
        if r.fresh is not None:
            lock, ledger, context = r.fresh
            # The same ledger: the lock stays ours. Another: the new one is held already.
            old = (self.context, self.ledger, self.lock if lock is not None else None)
            self.ledger, self.context = ledger, context
            if lock is not None:
                self.lock = lock
        assert self.ledger is not None and self.context is not None
        self.engine = self._engine(r.settings, self.ledger, self.context)
        self.request_full("reload")
        if old is not None:
            _close(*old)

    def _shutdown(self) -> int:
        self._closing = True  # also the stop flag, when no signal ended the loop
        name = signal.Signals(self._signal).name if self._signal else "none"
        self.log.info("daemon_stopping", signal=name)
        self.notifier.send(STOPPING="1", STATUS="stopping")
        if self.watcher is not None:
            self.watcher.stop()
        if self.rescans is not None:
            self.rescans.shutdown()
        self.requests.close()
        syncer = self.syncer
        if syncer is not None:
            syncer.join(self.settings.daemon.stop_timeout)
            if syncer.is_alive():
                # Calls still in flight past the bound: leave without them. The ledger is
                # consistent (one transaction per outcome); a call whose outcome was not
                # recorded is repeated once by the next start, and every call is idempotent.
                in_flight = self.engine.in_flight if self.engine is not None else 0
                self.log.warning("daemon_stopped", in_flight=in_flight, timed_out=True)
                self.notifier.close()
                sys.stderr.flush()
                os._exit(0)
        handoff = self._handoff
        if handoff is not None and handoff.fresh is not None:  # never taken over
            _close(handoff.fresh[2], handoff.fresh[1], handoff.fresh[0])
        _close(self.context, self.ledger, self.lock)
        self.log.info("daemon_stopped", synced_since_start=self.synced_since_start)
        self.notifier.close()
        return 0


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


def run(config_path: str, settings: config.Settings) -> int:
    """`featsync run`: returns the exit code (0 after SIGTERM/SIGINT)."""
    return Daemon(config_path, settings).run()
