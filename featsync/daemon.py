"""`featsync run`: the daemon that keeps a search context in step with a folder.

The composition root and its main thread: it opens the ledger and the context, wires
the sync thread (featsync.syncthread, which runs every cycle), a watchdog Watcher
feeding a Pending set and an APScheduler timer for full rescans (featsync.rescans),
then handles signals, reloads, the watcher's health, the heartbeat in the logs,
systemd's notify protocol (featsync.systemd) and the stop.

Threads and who does what (one owner for every cycle):
- featsync-sync, the sync thread (featsync.syncthread.SyncThread): every cycle, full
  and targeted, one at a time, and the pauses after an outage; it owns the engine,
  the ledger, the context and the ledger's lock. Its work is posted to it (full
  rescans in `Requests`, changed paths in `Pending`; failed images whose wait is over
  it reads from the ledger); a reload's new engine is handed to it and taken over
  between cycles;
- watchdog's observer thread: the Handler notes changed paths and pokes the sync
  thread; a lost track (overflow, dead watch) posts a full rescan;
- APScheduler's threads: post a full rescan every rescan_interval (the daemon posts
  the first one, at start, itself);
- the main thread (this module): signals, reloads (the config read, a new ledger and
  context opened, then handed over), the watcher's health, heartbeats, systemd notify
  (READY, STATUS, WATCHDOG, STOPPING) and the stop. It never runs a cycle nor waits
  for one, except on the stop, for at most stop_timeout.
Apart from opening the ledger (at the start, and on a reload that changes [ledger] or
[context]) and closing it after the stop, the main thread never uses it, so that no
lock holds up its heartbeats and WATCHDOG pings: while another program holds the
ledger locked, a ledger call waits (up to SQLite's busy_timeout per statement, and
featsync.ledger's BUSY_WAIT_S per transaction; on a database server a table lock may
have no timeout at all). The heartbeat and STATUS= report the counts the sync thread,
the ledger's owner, last read (at the start, after each cycle, when a pause begins,
after a reload that opened the ledger anew) and their age, `counts_age_s`: during a
long cycle they are as old as the cycle.
Signal handlers only set plain attributes, no lock (an Event's lock, or the log's, taken
in a handler that interrupted its holder would deadlock): SIGTERM/SIGINT set the stop
flag that the engine reads while it scans and before each call, so any cycle stops at
once; Python's wakeup fd wakes the main thread.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from featsync import config, logs
from featsync.engine import bind_context
from featsync.errors import FeatsyncError
from featsync.ledger import SqlLedger
from featsync.lock import SyncLock
from featsync.reconcile_cli import check_access
from featsync.rescans import Requests, Rescans
from featsync.syncthread import TICK_S, Opened, Reload, SyncThread
from featsync.systemd import Notifier, Pulse
from featsync.watch import ROOT_CHANGED, Handler, Pending, Watcher
from featsync.wiring import open_context, scan_rules


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
        # The sync thread: it owns the engine, the ledger, the context, the lock and
        # every cycle's state (others only read them).
        self.sync: SyncThread | None = None
        # Set by the sync or the watcher thread, acted on by the main thread.
        self.rewatch = False  # try to start a watch that should run but does not
        self.restart_watch = False  # the watched folder itself moved or went away
        self.rescan_started = False  # the first full rescan began: READY=1
        self.status_due = False  # something changed: a new STATUS= line
        # The main thread's alone.
        self.watcher: Watcher | None = None
        self.rescans: Rescans | None = None
        self.ready_sent = False
        self.next_heartbeat = 0.0
        self.next_ping = 0.0

    # -- set-up ------------------------------------------------------------------------

    @staticmethod
    def _pending(settings: config.Settings) -> Pending:
        d = settings.daemon
        return Pending(d.quiet_period, d.max_delay, d.max_pending)

    def _open(
        self, settings: config.Settings, take_lock: bool = True, check: bool = False
    ) -> Opened:
        """The ledger and the context, bound together; the ledger's lock first, unless
        it is the one the daemon holds already (a lock is never let go and taken again:
        another process could take it in between). `check` (at the start): a client
        secret the token endpoint refuses stops the daemon (exit 2), even with nothing
        to send; an endpoint that does not answer is a warning."""
        lock = SyncLock(settings.ledger.url, role="daemon") if take_lock else None
        if lock is not None:
            lock.acquire()
        try:
            ledger = SqlLedger(settings.ledger.url)
            try:
                context = open_context(settings, self.log)
                try:  # another context than the ledger mirrors: refuse to start (exit 2)
                    bind_context(ledger, context, self.log, prefix=settings.sync.id_prefix)
                    if check:
                        check_access(context, self.log, self.stopping)
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
        sync = self.sync
        if self.requests.full(reason) and sync is not None and sync.running == "full":
            self.log.info("rescan_queued", reason=reason, after="the full rescan under way")

    def _trouble(self, reason: str) -> None:
        """The watcher lost track (overflow, handler error, dead watch): rescan all."""
        root_gone = reason == ROOT_CHANGED
        action = "watch again, full rescan" if root_gone else "full rescan"
        self.log.warning("watcher_problem", error=reason, action=action)
        if root_gone:  # a watch on a moved or unmounted folder sees nothing of its path
            self.restart_watch = True
            self.wake_main()
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
        s = self.settings
        opened = self._open(s, check=True)
        sync = self.sync = SyncThread(
            self, s, opened, self.requests, self.pulse, self.log, self.notifier.watchdog_s
        )
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
        sync.start()
        self.rescans = Rescans(self.request_full, self.log)
        self.rescans.start(s.daemon.rescan_interval)
        try:
            self._loop()
        finally:
            code = self._shutdown(sync)
        return code

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Plain attributes only (see the module docstring). Setting `_signal` is the
        # stop: the engine and apply read it through `stopping`.
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._signal = signum

    def wake_main(self) -> None:
        """Wake the main thread (any thread): it looks at its flags at once."""
        with contextlib.suppress(OSError):  # full: it wakes anyway; closed: it has ended
            os.write(self._wake_w, b"w")

    def _loop(self) -> None:
        now = time.monotonic()
        self.next_heartbeat = now + self.settings.daemon.heartbeat_interval
        self.next_ping = now
        while self._signal is None:
            try:
                self._turn()
            except Exception as exc:  # a bug: say so, go on
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
        sync = self.sync
        assert sync is not None
        if self._reload and sync.handoff is None:  # else: once the last one is taken over
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
        until = min(self.next_heartbeat, now + TICK_S)
        if self.notifier.watchdog_s is not None:
            until = min(until, self.next_ping)
        return max(0.01, until - now)

    def _facts(self) -> dict[str, Any]:
        """How things stand, from what the sync thread keeps (never the ledger)."""
        sync = self.sync
        assert sync is not None
        now = time.monotonic()
        counts = sync.counts
        by_state = counts.by_state if counts is not None else {}
        age = None if sync.last_good is None else round(now - sync.last_good, 1)
        return {
            "pending": len(self.pending),
            "in_flight": sync.engine.in_flight,
            "quarantined": by_state.get("failed", 0),
            "synced": by_state.get("synced", 0),
            "counts_age_s": None if counts is None else round(now - counts.at, 1),
            "synced_since_start": sync.synced_since_start,
            "last_good_cycle_age_s": age,
            "watcher": self.watcher.active if self.watcher is not None else "off",
            "paused_for_s": round(max(0.0, sync.outage_until - now), 1),
            # drift found by reviews, not yet mended, by kind ({}: none; None: no review yet)
            "drift": sync.drift,
            "last_review_age_s": None
            if sync.reviewed_at is None
            else round(now - sync.reviewed_at, 1),
        }

    def _status(self) -> None:
        f = self._facts()
        line = f"{f['synced']} synced, {f['pending']} pending, {f['quarantined']} quarantined"
        if f["paused_for_s"]:
            line += f", paused {f['paused_for_s']:.0f}s after errors"
        if f["drift"]:
            line += f", context drift: {sum(f['drift'].values())} (see context_drift)"
        self.notifier.send(STATUS=line)

    def _heartbeat(self) -> None:
        self.log.info("heartbeat", **self._facts())
        self._status()

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
        assert self.sync is not None
        self.sync.hand_over(Reload(new, fresh))

    def _shutdown(self, sync: SyncThread) -> int:
        self._closing = True  # also the stop flag, when no signal ended the loop
        name = signal.Signals(self._signal).name if self._signal else "none"
        self.log.info("daemon_stopping", signal=name)
        self.notifier.send(STOPPING="1", STATUS="stopping")
        if self.watcher is not None:
            self.watcher.stop()
        if self.rescans is not None:
            self.rescans.shutdown()
        self.requests.close()
        if not sync.join(self.settings.daemon.stop_timeout):
            # Calls still in flight past the bound: leave without them. The ledger is
            # consistent (one transaction per outcome); a call whose outcome was not
            # recorded is repeated once by the next start, and every call is idempotent.
            in_flight = sync.engine.in_flight
            self.log.warning("daemon_stopped", in_flight=in_flight, timed_out=True)
            self.notifier.close()
            sys.stderr.flush()
            os._exit(0)
        sync.close()  # and a reload never taken over
        self.log.info("daemon_stopped", synced_since_start=sync.synced_since_start)
        self.notifier.close()
        return 0


def run(config_path: str, settings: config.Settings) -> int:
    """`featsync run`: returns the exit code (0 after SIGTERM/SIGINT)."""
    return Daemon(config_path, settings).run()
