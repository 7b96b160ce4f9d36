"""`featsync run`: the daemon that keeps a search context in step with a folder.

The composition root: one Engine, a watchdog Watcher feeding a Pending set, an
APScheduler BackgroundScheduler for full rescans, signal handling, systemd's notify
protocol and a heartbeat in the logs.

Threads and who does what:
- watchdog's observer thread: the Handler notes changed paths and wakes the main loop;
- the scheduler's one worker thread: full rescans (at start, every rescan_interval,
  and at once after an overflow, a watcher error or a reload);
- the main thread: targeted cycles over paths that went quiet and over failed images
  whose wait is over, the heartbeat, reloads and the stop;
- featsync-notify: WATCHDOG=1 to systemd, only while the daemon makes progress.
Cycles run behind the engine's lock: they never overlap.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from featsync import config, logs
from featsync.engine import CycleReport, Engine, Stopped, bind_context
from featsync.errors import FeatsyncError
from featsync.ledger import SqlLedger
from featsync.lock import SyncLock
from featsync.model import RootState, SearchContext
from featsync.rescans import Rescans
from featsync.systemd import Notifier, Pulse
from featsync.watch import ROOT_CHANGED, Handler, Pending, Watcher
from featsync.wiring import open_context, scan_rules

# After an outage (transient errors in a row, or a fatal error such as refused
# credentials), the next try waits [daemon] outage_wait, doubling up to this cap.
OUTAGE_WAIT_CAP_S = 600.0
_TICK_S = 0.5  # the main loop's longest sleep (signal flags are read this often)


class Daemon:
    def __init__(
        self, config_path: str, settings: config.Settings, environ: Mapping[str, str] = os.environ
    ) -> None:
        self.config_path = config_path
        self.settings = settings
        self.log = logs.get()
        self.notifier = Notifier(self.log, environ)
        self.pulse = Pulse()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._signal: int | None = None  # set by signal handlers, read by the loop
        self._reload = False
        self.synced_since_start = 0
        self.last_good: float | None = None  # monotonic time of the last good cycle
        self.outage_wait = 0.0
        self.outage_until = 0.0  # monotonic: no targeted cycles before this
        self.rescan_after_pause = False  # a full cycle was cut short by an outage
        self.rewatch = False  # try to start a watch that should run but does not
        self.restart_watch = False  # the watched folder itself moved or went away
        self.root_lost = False  # the last full rescan found no folder
        self.ready_sent = False
        self.lock: SyncLock | None = None
        self.ledger: SqlLedger | None = None
        self.context: SearchContext | None = None
        self.engine: Engine | None = None
        self.watcher: Watcher | None = None
        self.pending = self._pending(settings)
        self.next_heartbeat = 0.0
        self.rescans: Rescans | None = None
        # Cycles run one at a time, whichever thread starts them; a reload swaps the
        # engine only between cycles.
        self.cycle_lock = threading.Lock()

    # -- set-up ------------------------------------------------------------------------

    @staticmethod
    def _pending(settings: config.Settings) -> Pending:
        d = settings.daemon
        return Pending(d.quiet_period, d.max_delay, d.max_pending)

    def _open(self, settings: config.Settings) -> tuple[SyncLock, SqlLedger, SearchContext]:
        lock = SyncLock(settings.ledger.url)
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
            lock.release()
            raise

    def _engine(self, settings: config.Settings, ledger: SqlLedger, ctx: SearchContext) -> Engine:
        return Engine(
            settings,
            ledger,
            ctx,
            self.log,
            stop=self.stopping.is_set,
            progress=self.pulse.progress,
            hold=self.pending.holds,
        )

    def _watcher(self, settings: config.Settings) -> Watcher:
        handler = Handler(scan_rules(settings), self.pending, self.wake.set, self._trouble)
        d = settings.daemon
        return Watcher(d.watcher, d.polling_interval, handler, self.log)

    def request_full(self, reason: str) -> None:
        if self.rescans is not None and not self.stopping.is_set():
            self.rescans.now(reason)

    def _trouble(self, reason: str) -> None:
        """The watcher lost track (overflow, handler error, dead watch): rescan all."""
        root_gone = reason == ROOT_CHANGED
        action = "watch again, full rescan" if root_gone else "full rescan"
        self.log.warning("watcher_problem", error=reason, action=action)
        if root_gone:  # a watch on a moved or unmounted folder sees nothing of its path
            self.restart_watch = True
            self.wake.set()
        self.request_full("watcher")

    # -- running -----------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
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
        self.rescans = Rescans(self._full, self.log)
        self.rescans.start(s.daemon.rescan_interval)
        pinger = threading.Thread(target=self._ping, name="featsync-notify", daemon=True)
        pinger.start()
        try:
            self._loop()
        finally:
            code = self._shutdown()
        return code

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only flags here: a signal handler must not take locks the loop may hold.
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._signal = signum

    def _loop(self) -> None:
        self.next_heartbeat = time.monotonic() + self.settings.daemon.heartbeat_interval
        while self._signal is None:
            self.pulse.loop()
            try:
                self._turn()
            except Exception as exc:  # the ledger unreachable, or a bug: pause, go on
                self.log.exception("loop_error", error=f"{type(exc).__name__}: {exc}")
                self._outage(f"{type(exc).__name__}: {exc}")
            if self._signal is not None:
                break
            self.wake.wait(self._sleep(self.next_heartbeat))
            self.wake.clear()

    def _turn(self) -> None:
        """One turn of the main loop."""
        now = time.monotonic()
        if self._reload:
            self._reload = False
            self._reload_config()
        watcher = self.watcher
        if watcher is not None and self.restart_watch:
            self.restart_watch = False
            watcher.stop()
            if watcher.start() != "off":
                self.request_full("watcher")
        elif watcher is not None and not watcher.alive():
            self.log.error("watcher_failed", mode=watcher.active, error="the watch died")
            watcher.stop()
            watcher.start()
            self.request_full("watcher")
        elif watcher is not None and self.rewatch:
            # A watch that could not start (the folder missing, an inotify limit) is
            # tried again after each full rescan: once per rescan_interval at most.
            self.rewatch = False
            if watcher.start() != "off":
                self.request_full("watcher")
        if self.pending.overflowed:
            self.pending.overflowed = False
            self.log.warning(
                "watch_overflow",
                max_pending=self.settings.daemon.max_pending,
                action="full rescan",
            )
            self.request_full("overflow")
        if now >= self.outage_until and self.engine is not None:
            if self.rescan_after_pause:
                self.rescan_after_pause = False
                self.request_full("after pause")
            self._targeted()
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + self.settings.daemon.heartbeat_interval
            self._heartbeat()

    def _sleep(self, next_heartbeat: float) -> float:
        now = time.monotonic()
        until = min(next_heartbeat, now + _TICK_S)
        due = self.pending.next_due()
        if due is not None:
            until = min(until, max(due, self.outage_until))
        return max(0.01, until - now)

    def _targeted(self) -> None:
        """A cycle over the paths that went quiet and the failed images now due."""
        engine = self.engine
        assert engine is not None and self.ledger is not None
        if self.cycle_lock.locked():
            return  # a full rescan runs; what waits is looked at after it
        root = engine.settings.sync.folder
        paths = set(self.pending.take(lambda rel: _size(os.path.join(root, rel))))
        due, _ = self.ledger.failed_due(time.time())
        prefix = engine.settings.sync.id_prefix
        paths.update(i[len(prefix) :] for i in due if i.startswith(prefix))
        if paths:
            self._cycle(sorted(paths), "changes")

    def _full(self, reason: str) -> None:
        if self.stopping.is_set():
            return
        if not self.ready_sent:
            self.ready_sent = True
            self.notifier.send(READY="1", STATUS="first full rescan under way")
        self._cycle(None, reason)

    def _cycle(self, scope: list[str] | None, reason: str) -> None:
        self.pulse.cycles += 1
        self.pulse.progress()
        try:
            with self.cycle_lock:
                if self.engine is None or self.stopping.is_set():
                    return
                report = self.engine.cycle(scope=scope)
                self._after(report, scope)
        except Stopped:
            self.log.info("cycle_stopped", reason="stop requested")
            return
        except FeatsyncError as exc:
            self.log.error("cycle_failed", trigger=reason, error=str(exc))
            self._outage(str(exc))
            return
        except Exception as exc:  # a bug must not end the daemon; the next rescan retries
            self.log.exception("cycle_crashed", trigger=reason, error=f"{type(exc).__name__}")
            self._outage(f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.pulse.cycles -= 1

    def _after(self, report: CycleReport, scope: list[str] | None) -> None:
        w = self.watcher
        if scope is None and w is not None and w.mode != "off" and w.active == "off":
            self.rewatch = True
            self.wake.set()
        # A folder that went missing (unmounted, moved away) and is back is another
        # directory to the kernel: the old watch sees nothing of it. Watch it anew.
        if scope is None and report.snapshot.root_state is not RootState.OK:
            self.root_lost = True
        elif scope is None and self.root_lost:
            self.root_lost = False
            self.restart_watch = True
            self.wake.set()
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
            root = self.settings.sync.folder
            for rel in scope:
                self.pending.mark(rel, _size(os.path.join(root, rel)))
        if a is not None and (a.backed_off or a.transient):
            self._outage(a.backed_off or "transient errors")
        elif report.good:
            self.last_good = time.monotonic()
            self.outage_wait = 0.0
            self.outage_until = 0.0
        self._status()

    def _outage(self, error: str) -> None:
        first = self.settings.daemon.outage_wait
        self.outage_wait = min(max(OUTAGE_WAIT_CAP_S, first), max(first, self.outage_wait * 2))
        # ±10% jitter: daemons that lost the same service do not come back in step
        pause = round(self.outage_wait * random.uniform(0.9, 1.1), 2)
        self.outage_until = time.monotonic() + pause
        self.log.warning("sync_paused", error=error, retry_in_s=pause)
        self._status()

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

    def _ping(self) -> None:
        """WATCHDOG=1 at half systemd's interval, only while the daemon makes progress."""
        interval = self.notifier.watchdog_s
        if interval is None:
            return
        while not self.stopping.wait(interval / 2):
            if self.pulse.alive(interval):
                self.notifier.send(WATCHDOG="1")

    # -- reload and stop --------------------------------------------------------------

    def _reload_config(self) -> None:
        old = self.settings
        try:
            new = config.load(self.config_path)
            if new == old:
                self.log.info("config_reloaded", changed=[])
                return
            changed = [f.name for f in fields(new) if getattr(new, f.name) != getattr(old, f.name)]
            reopen = new.ledger != old.ledger or new.context != old.context
            if reopen and new.ledger == old.ledger and self.lock is not None:
                self.lock.release()  # the same ledger: the lock passes to the new opening
            try:
                fresh = self._open(new) if reopen else None
            except FeatsyncError:
                if self.lock is not None:
                    self.lock.acquire()  # keep ours
                raise
        except FeatsyncError as exc:
            self.log.error("config_reload_failed", error=str(exc), kept="the running config")
            return
        rewatch = new.sync != old.sync or new.daemon != old.daemon
        with self.cycle_lock:  # between cycles
            if fresh is not None:
                assert self.ledger is not None and self.context is not None
                self.context.close()
                self.ledger.close()
                if self.lock is not None:
                    self.lock.release()
                self.lock, self.ledger, self.context = fresh
            assert self.ledger is not None and self.context is not None
            self.settings = new
            if rewatch:
                if self.watcher is not None:
                    self.watcher.stop()
                self.pending = self._pending(new)
            self.engine = self._engine(new, self.ledger, self.context)
        if new.log != old.log:
            logs.configure(new.log.format, new.log.level)
        if rewatch:
            self.watcher = self._watcher(new)
            self.watcher.start()
        if new.daemon.rescan_interval != old.daemon.rescan_interval:
            assert self.rescans is not None
            self.rescans.every(new.daemon.rescan_interval)
        self.log.info("config_reloaded", changed=changed)
        self.request_full("reload")

    def _shutdown(self) -> int:
        self.stopping.set()
        name = signal.Signals(self._signal).name if self._signal else "none"
        self.log.info("daemon_stopping", signal=name)
        self.notifier.send(STOPPING="1", STATUS="stopping")
        if self.watcher is not None:
            self.watcher.stop()
        if self.rescans is not None:
            self.rescans.shutdown()
        timeout = self.settings.daemon.stop_timeout
        engine = self.engine
        if engine is not None and not self.cycle_lock.acquire(timeout=timeout):
            # Calls still in flight past the bound: leave without them. The ledger is
            # consistent (one transaction per outcome); a call whose outcome was not
            # recorded is repeated once by the next start, and every call is idempotent.
            self.log.warning("daemon_stopped", in_flight=engine.in_flight, timed_out=True)
            self.notifier.close()
            sys.stderr.flush()
            os._exit(0)
        try:
            if self.context is not None:
                self.context.close()
            if self.ledger is not None:
                self.ledger.close()
            if self.lock is not None:
                self.lock.release()
        finally:
            if engine is not None:
                self.cycle_lock.release()  # a rescan still queued then sees the stop
        self.log.info("daemon_stopped", synced_since_start=self.synced_since_start)
        self.notifier.close()
        return 0


def _size(path: str) -> int | None:
    try:
        return os.lstat(path).st_size
    except OSError:
        return None


def run(config_path: str, settings: config.Settings) -> int:
    """`featsync run`: returns the exit code (0 after SIGTERM/SIGINT)."""
    return Daemon(config_path, settings).run()
