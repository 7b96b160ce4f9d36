"""What a person at a terminal sees of long work: one live line on stderr.

The work tells a `Sink` where it stands (phase, done, total, failed so far); on a
terminal a `Bar` draws that as a tqdm line (done / total, rate, ETA, failures), one
per phase, and log lines written meanwhile go above it (featsync.logs routes them).
Off a terminal the sink is `nothing`: the JSON logs are the whole output, as before.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

from tqdm import tqdm

from featsync import logs
from featsync.escapes import printable


class Sink(Protocol):
    """Told where a piece of work stands: `phase` ("scan", "send", "verify", "export"),
    `done` of `total` (None: not known yet, as while a folder is scanned), `failed`
    of them so far."""

    def __call__(self, phase: str, done: int, total: int | None, failed: int) -> None: ...


def nothing(phase: str, done: int, total: int | None, failed: int) -> None:
    """The sink off a terminal."""


# What each phase counts, as the bar's unit
UNITS = {
    "scan": "entries",  # folders listed and files read
    "send": "images",
    "verify": "images",
    "list": "images",
    "export": "backups",
}
LABELS = {
    "scan": "scanning",
    "send": "sending",
    "verify": "checking",
    "list": "checking orphans",
    "export": "exporting",
}
_KNOWN = (
    "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} "
    "[{elapsed}, {rate_fmt}, ETA {remaining}{postfix}]"
)
_UNKNOWN = "{desc}: {n_fmt}{unit} [{elapsed}, {rate_fmt}{postfix}]"


class Bar:
    """A live line on `stream` (a terminal), one per phase: a new phase ends the last
    one's line as it stood. Called from one thread at a time (the one doing the work);
    log lines from any thread go above it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._bar: tqdm[Any] | None = None
        self._phase = ""
        self._failed = -1
        self._lock = threading.Lock()  # a log line from another thread vs. a redraw

    def __call__(self, phase: str, done: int, total: int | None, failed: int) -> None:
        with self._lock:
            bar = self._bar
            if (
                bar is None
                or phase != self._phase
                or (total is not None) != (bar.total is not None)
            ):
                self._end()
                bar = self._bar = self._open(phase, total)
                self._phase, self._failed = phase, -1
            if total is not None and bar.total != total:
                bar.total = total
            if failed != self._failed:
                self._failed = failed
                bar.set_postfix_str(f"{failed} failed" if phase != "scan" else "", refresh=False)
            bar.update(done - bar.n)  # tqdm redraws at most every 0.1 s

    def _open(self, phase: str, total: int | None) -> tqdm[Any]:
        size = size_of(self.stream)
        return tqdm(
            total=total,
            desc=LABELS.get(phase, phase),
            unit=" " + UNITS.get(phase, "items"),  # "12 images", "40.2 images/s"
            file=self.stream,
            bar_format=_KNOWN if total is not None else _UNKNOWN,
            # the terminal it draws on (not stdout's: `reconcile --json | jq`)
            ncols=size.columns,
            nrows=size.lines,
            leave=True,  # the last state stays on screen: what was done, at what rate
            mininterval=0.1,
        )

    def _end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def above(self, text: str) -> None:
        """Print `text` (whole lines) above the live line, which is drawn again below."""
        with self._lock:
            if self._bar is None:
                self.stream.write(text + "\n")
                self.stream.flush()
            else:
                self._bar.clear()
                self.stream.write(text + "\n")
                self._bar.refresh()

    def close(self) -> None:
        with self._lock:
            self._end()


def size_of(stream: TextIO) -> os.terminal_size:
    """The size of the terminal `stream` writes to; where it says 0 (a new
    pseudo-terminal says 0x0, where tqdm draws nothing: it hides bars past the last
    row) or cannot say, $COLUMNS / $LINES, else 80x24."""
    try:
        columns, lines = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):  # no file descriptor, or no terminal
        columns = lines = 0
    return os.terminal_size(
        (columns or _env_int("COLUMNS") or 80, lines or _env_int("LINES") or 24)
    )


def _env_int(name: str) -> int:
    try:
        return max(0, int(os.environ.get(name, "")))
    except ValueError:
        return 0


def on_terminal() -> bool:
    """Whether a person is watching: stderr is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced, or closed
        return False


@contextmanager
def shown(enabled: bool = True) -> Iterator[Sink]:
    """A live line on stderr while the block runs, if stderr is a terminal (and
    `enabled`); else `nothing`. Log lines meanwhile are printed above it."""
    if not (enabled and on_terminal()):
        yield nothing
        return
    bar = Bar(sys.stderr)
    logs.route_above(bar.above)
    try:
        yield bar
    finally:
        # the line first: a line logged meanwhile (another thread) still goes above
        # where it stood, whole, as Bar.above writes once the line is gone
        bar.close()
        logs.route_above(None)


def summary_line(text: str) -> None:
    """The one plain line at the end of a run, for the person at the terminal."""
    if on_terminal():
        print(printable(text), file=sys.stderr, flush=True)
