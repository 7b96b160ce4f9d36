"""When the daemon's sync thread runs a full rescan: the requests posted to it, and the
timer that posts one every rescan_interval.

`Requests` is the sync thread's inbox. Any thread posts to it and returns at once: the
watcher (changed paths are waiting, or it lost track and wants a rescan), the timer,
the main thread (an overflow, a reload, the stop). Only the sync thread takes from it,
between cycles. A full rescan asked for while one runs is kept and runs right after
it; asked for many times before it starts, it runs once (with every reason).

The timer is APScheduler 3.x, set up so that no run is lost or stacked: its defaults
fail a sync daemon (sync-lessons 15): a run more than 1 s late is skipped silently,
and overlapping runs stack. Here the job has ``coalesce=True`` (late runs fold into
one), ``max_instances=1`` and ``misfire_grace_time=None`` (late is never too late);
the job only posts a request, so it never waits on a rescan; a listener logs missed
and failed runs as events.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
from collections.abc import Callable
from typing import Any

Job = Callable[[str], None]  # ask for a full rescan, given why


class Requests:
    """What the sync thread is asked to do. Thread-safe; never blocks a poster for
    longer than it takes to note the request."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._reasons: list[str] = []  # a full rescan is wanted, for these reasons
        self._poked = False
        self._closed = False

    def full(self, reason: str) -> bool:
        """Ask for a full rescan; False if one was already asked for (folded into it)."""
        with self._cond:
            first = not self._reasons
            if reason not in self._reasons:
                self._reasons.append(reason)
            self._cond.notify()
            return first

    def poke(self) -> None:
        """Something may be due (paths went quiet, a reload waits, a stop): look now."""
        with self._cond:
            self._poked = True
            self._cond.notify()

    def close(self) -> None:
        """No more cycles: wakes the sync thread for good."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    @property
    def closed(self) -> bool:
        return self._closed

    def take_full(self) -> list[str]:
        """The reasons a full rescan is wanted (empty: it is not); the request is served."""
        with self._cond:
            reasons, self._reasons = self._reasons, []
            return reasons

    def wait(self, timeout: float) -> None:
        """Until something is posted, or `timeout` seconds."""
        with self._cond:
            if not (self._reasons or self._poked or self._closed):
                self._cond.wait(timeout)
            self._poked = False


class Rescans:
    """The timer: a full rescan at start, then every `interval` seconds."""

    def __init__(self, job: Job, log: Any) -> None:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self.job = job
        self.log = log
        # The listener reports what matters, as structured events; APScheduler's own
        # log lines would only repeat it, unstructured.
        logging.getLogger("apscheduler").addHandler(logging.NullHandler())
        logging.getLogger("apscheduler").propagate = False
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=dt.UTC,
        )

    def start(self, interval: float) -> None:
        """Start: a rescan every `interval` seconds (the daemon asks for the first one
        itself, before anything else can be served)."""
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED

        self.scheduler.add_listener(self._event, EVENT_JOB_MISSED | EVENT_JOB_ERROR)
        self.scheduler.start()
        self.every(interval)

    def every(self, interval: float) -> None:
        """(Re)schedule the periodic rescan, the next one `interval` seconds from now,
        with up to 5% (at most 60 s) of jitter, so that many daemons started together do
        not rescan together."""
        from apscheduler.triggers.interval import IntervalTrigger

        jitter = int(min(60.0, interval * 0.05)) or None
        self.scheduler.add_job(
            self.job,
            IntervalTrigger(seconds=interval, jitter=jitter),
            args=["schedule"],
            id="rescan",
            name="full rescan",
            replace_existing=True,
        )

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.scheduler.shutdown(wait=False)

    def _event(self, event: Any) -> None:
        from apscheduler.events import EVENT_JOB_MISSED

        if event.code == EVENT_JOB_MISSED:
            self.log.warning("rescan_missed", job=event.job_id, due=str(event.scheduled_run_time))
        else:
            self.log.error("rescan_failed", job=event.job_id, error=repr(event.exception))
