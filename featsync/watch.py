"""The watcher: file system events become changed paths, and nothing more.

The handler runs in watchdog's observer thread. It does no hashing and no network:
it filters the event (only image names, nothing in ignored folders, never our own
reads), notes the path with the time and the file's size, and wakes the daemon. A
path is judged only after a quiet period with no events and an unchanged size, so
an editor's save or a slow copy is seen once, whole.

Anything that goes wrong here — an exception in the handler, watchdog reporting a
queue overflow or a dead watch, too many pending paths — turns into a request for a
full rescan, never into a silently stopped watcher (sync-lessons 3, 4, 7).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from featsync.scan import ScanRules, ignore_regex, wanted_regex

Clock = Callable[[], float]

# Events that mean "someone looked", not "something changed": featsync's own reads
# would otherwise wake it up again, forever.
_READS = frozenset({"opened", "closed_no_write"})

ROOT_CHANGED = "the watched folder itself was moved or deleted"
SYSCTL_HINT = (
    "raise the limit, e.g. `sysctl fs.inotify.max_user_watches=524288` (and "
    "fs.inotify.max_user_instances; persist it in /etc/sysctl.d/), or set "
    '[daemon] watcher = "polling"; until then only the periodic rescans see changes'
)


@dataclass(slots=True)
class _Entry:
    first: float  # when the path became pending
    last: float  # its latest event
    size: int | None  # its size at the latest event (None: gone, or a folder)


class Pending:
    """Changed paths (relative to the root) waiting to be judged. Thread-safe, bounded.

    A batch is released once the newest event is `quiet` seconds old (a burst of a
    thousand new files becomes one cycle), or, under a steady stream of events, once
    the oldest ready path has waited `max_delay`. A path is in a batch only when its
    own last event is `quiet` old and its size has not moved since.
    """

    def __init__(self, quiet: float, max_delay: float, limit: int, clock: Clock = time.monotonic):
        self.quiet = quiet
        self.max_delay = max_delay
        self.limit = limit
        self.clock = clock
        self._lock = threading.Lock()
        self._paths: dict[str, _Entry] = {}
        self._newest = 0.0
        self.overflowed = False  # more than `limit` paths: dropped, a full rescan is due

    def __len__(self) -> int:
        return len(self._paths)

    def mark(self, rel: str, size: int | None) -> bool:
        """Note an event on `rel`; True if the daemon should wake up for it.

        Only the first path of a batch (or an overflow) needs to: a later event never
        makes `next_due` earlier, so waking up for each of a burst's thousands of
        events would only cost a pass over the set each time.
        """
        now = self.clock()
        with self._lock:
            was_empty = not self._paths
            entry = self._paths.get(rel)
            if entry is None:
                if len(self._paths) >= self.limit:
                    self._paths.clear()
                    self.overflowed = True
                    return True
                self._paths[rel] = _Entry(now, now, size)
            else:
                entry.last, entry.size = now, size
            self._newest = now
            return was_empty

    def clear(self) -> None:
        with self._lock:
            self._paths.clear()

    def paths(self) -> list[str]:
        """The paths waiting now (not taken)."""
        with self._lock:
            return list(self._paths)

    def holds(self, rel: str) -> bool:
        """Whether `rel` is still settling (an event within the quiet period): a cycle
        leaves such a file alone, whatever triggered the cycle."""
        with self._lock:
            entry = self._paths.get(rel)
            return entry is not None and self.clock() - entry.last < self.quiet

    def take(self, size_of: Callable[[str], int | None]) -> list[str]:
        """The paths due now (removed from the set); `size_of` gives a path's size now."""
        now = self.clock()
        with self._lock:
            ready = [(rel, e) for rel, e in self._paths.items() if now - e.last >= self.quiet]
            if not ready:
                return []
            if now - self._newest < self.quiet and now - min(e.first for _, e in ready) < (
                self.max_delay
            ):
                return []
        due: list[str] = []
        for rel, entry in ready:
            size = size_of(rel)  # outside the lock: a stat may be slow on a network share
            with self._lock:
                if self._paths.get(rel) is not entry:
                    continue
                if size != entry.size:  # still growing without events (or events lost)
                    entry.last, entry.size = now, size
                    continue
                del self._paths[rel]
            due.append(rel)
        return due

    def next_due(self) -> float | None:
        """When `take` may next return something (monotonic clock), None if nothing waits."""
        with self._lock:
            if not self._paths:
                return None
            ready_at = min(e.last for e in self._paths.values()) + self.quiet
            first = min(e.first for e in self._paths.values())
            return max(ready_at, min(self._newest + self.quiet, first + self.max_delay))


class Handler:
    """watchdog's event handler (duck-typed: watchdog only calls `dispatch`)."""

    def __init__(
        self,
        rules: ScanRules,
        pending: Pending,
        wake: Callable[[], None],
        trouble: Callable[[str], None],
    ) -> None:
        self.root = os.path.abspath(rules.root)
        self.pending = pending
        self.wake = wake
        self.trouble = trouble  # asks for a full rescan, with the reason
        self._wanted = wanted_regex(rules.extensions, rules.ignore).match
        self._ignored = ignore_regex(rules.ignore).match

    def dispatch(self, event: Any) -> None:
        try:
            self._handle(event)
        except Exception as exc:  # an exception here would end watchdog's thread
            self.trouble(f"event handler failed on {event!r}: {type(exc).__name__}: {exc}")

    def _handle(self, event: Any) -> None:
        kind = event.event_type
        if kind in _READS or (event.is_directory and kind == "modified"):
            return  # a folder's "modified" only echoes its children's own events
        if kind in ("deleted", "moved") and os.fsdecode(event.src_path) == self.root:
            self.trouble(ROOT_CHANGED)
            return
        wake = self._mark(event.src_path, event.is_directory)
        if kind == "moved":
            wake |= self._mark(event.dest_path, event.is_directory)
        if wake:
            self.wake()

    def _mark(self, path: str | bytes, is_dir: bool) -> bool:
        path = os.fsdecode(path)
        if path == self.root:
            return False  # the folder's own changes: see _handle
        if not path.startswith(self.root + os.sep):
            return False
        rel = path[len(self.root) + 1 :]
        if os.sep != "/":
            rel = rel.replace(os.sep, "/")
        parent, _, name = rel.rpartition("/")
        if parent and any(self._ignored(part) for part in parent.split("/")):
            return False
        if is_dir:
            if self._ignored(name):
                return False
            size = None
        else:
            if self._wanted(name) is None:
                return False  # editor temp files, sidecars, ignored names
            try:
                size = os.lstat(path).st_size
            except OSError:
                size = None
        return self.pending.mark(rel, size)


class _WatchdogLog(logging.Handler):
    """watchdog reports queue overflows and failed watches only in its log."""

    def __init__(self, trouble: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.trouble = trouble

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # logging must never raise into watchdog
            self.trouble(f"watchdog: {record.getMessage()}")


def _changes() -> list[Any]:
    """The event kinds that can mean a change (watchdog then asks the kernel for no
    others: featsync's own reads raise no events at all)."""
    from watchdog import events as ev

    return [
        ev.FileCreatedEvent,
        ev.FileModifiedEvent,
        ev.FileClosedEvent,
        ev.FileAttribEvent,
        ev.FileDeletedEvent,
        ev.FileMovedEvent,
        ev.DirCreatedEvent,
        ev.DirDeletedEvent,
        ev.DirMovedEvent,
    ]


class Watcher:
    """A watchdog observer over the root: native (inotify), polling, or none."""

    def __init__(self, mode: str, polling_interval: float, handler: Handler, log: Any) -> None:
        self.mode = mode
        self.polling_interval = polling_interval
        self.handler = handler
        self.log = log
        self.observer: Any = None
        self.active = "off"  # the mode actually running
        self._log_hook = _WatchdogLog(handler.trouble)

    def start(self) -> str:
        """Start watching; returns the mode that runs ("native", "polling" or "off")."""
        if self.mode == "off":
            self.log.info("watcher_started", mode="off", folder=self.handler.root)
            return "off"
        wd_log = logging.getLogger("watchdog")
        if self._log_hook not in wd_log.handlers:
            wd_log.addHandler(self._log_hook)
        wd_log.propagate = False
        try:
            self.observer = self._observer(self.mode)
            self.observer.schedule(
                self.handler, self.handler.root, recursive=True, event_filter=_changes()
            )
            self.observer.start()
        except OSError as exc:
            self._stop_observer()
            limit = exc.errno in (errno.ENOSPC, errno.EMFILE)
            self.log.error(
                "watcher_failed",
                mode=self.mode,
                folder=self.handler.root,
                error=f"{exc.strerror or exc}",
                hint=SYSCTL_HINT if limit else "only the periodic rescans see changes",
            )
            self.active = "off"
            return "off"
        self.active = "polling" if self.mode == "polling" else "native"
        self.log.info("watcher_started", mode=self.active, folder=self.handler.root)
        return self.active

    def _observer(self, mode: str) -> Any:
        if mode == "polling":
            from watchdog.observers.polling import PollingObserver

            return PollingObserver(timeout=self.polling_interval)
        from watchdog.observers import Observer

        return Observer()

    def alive(self) -> bool:
        """False if a watch that should run has died (its threads ended)."""
        if self.active == "off" or self.observer is None:
            return True
        return bool(self.observer.is_alive()) and all(
            e.is_alive() for e in getattr(self.observer, "emitters", ())
        )

    def stop(self) -> None:
        self._stop_observer()
        self.active = "off"

    def _stop_observer(self) -> None:
        obs, self.observer = self.observer, None
        if obs is None:
            return
        try:
            obs.stop()
            if obs.is_alive():
                obs.join(timeout=5)
        except Exception as exc:  # stopping must not fail the daemon
            self.log.warning("watcher_stop_failed", error=f"{type(exc).__name__}: {exc}")
