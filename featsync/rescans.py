"""The full-rescan schedule: APScheduler 3.x, set up so that no run is lost or stacked.

APScheduler's defaults fail a sync daemon (sync-lessons 15): a run more than 1 s late
is skipped silently, and overlapping runs stack. Here every job has
``coalesce=True`` (late runs fold into one), ``max_instances=1`` (a rescan still running
is not started again) and ``misfire_grace_time=None`` (late is never too late); one
worker thread runs them; a listener logs missed, failed and skipped runs as events.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

Job = Callable[[str], None]  # a full rescan, given why it runs


class Rescans:
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
        """Start: the first rescan at once, then every `interval` seconds."""
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED

        self.scheduler.add_listener(
            self._event, EVENT_JOB_MISSED | EVENT_JOB_ERROR | EVENT_JOB_MAX_INSTANCES
        )
        self.scheduler.start()
        self.every(interval)

    def every(self, interval: float) -> None:
        """(Re)schedule the periodic rescan, with up to 5% (at most 60 s) of jitter, so
        that many daemons started together do not rescan together."""
        from apscheduler.triggers.interval import IntervalTrigger

        jitter = int(min(60.0, interval * 0.05)) or None
        self.scheduler.add_job(
            self.job,
            IntervalTrigger(seconds=interval, jitter=jitter),
            args=["schedule"],
            id="rescan",
            name="full rescan",
            replace_existing=True,
            next_run_time=dt.datetime.now(dt.UTC),  # the first one at once
        )

    def now(self, reason: str) -> None:
        """A rescan as soon as the worker is free; requests before it starts fold into one."""
        with contextlib.suppress(Exception):  # the scheduler is shutting down
            self.scheduler.add_job(
                self.job,
                args=[reason],
                id="rescan_now",
                name="full rescan now",
                replace_existing=True,
            )

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.scheduler.shutdown(wait=False)

    def _event(self, event: Any) -> None:
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MISSED

        if event.code == EVENT_JOB_MISSED:
            self.log.warning("rescan_missed", job=event.job_id, due=str(event.scheduled_run_time))
        elif event.code == EVENT_JOB_ERROR:
            self.log.error("rescan_failed", job=event.job_id, error=repr(event.exception))
        else:
            self.log.info("rescan_skipped", job=event.job_id, reason="the previous one still runs")
