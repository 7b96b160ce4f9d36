"""structlog set-up, done once at the entry point.

JSON lines off a TTY (journald, files, pipes), a readable console on a TTY. Logs go
to stderr; stdout is kept for what a command prints as its answer (a plan, a status).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

from featsync.escapes import printable

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


# One line per image sent (or left for the next cycle): while a live progress line
# shows (featsync.progress), these are debug events, shown only with [log] level =
# "debug"; off a terminal they stay info events in the JSON log, as ever.
PER_IMAGE = frozenset({"image_added", "image_updated", "image_deleted", "image_deferred"})


class _Above:
    """Where log lines go while a progress line is live: above it (a function of one
    whole line), else straight to the stream."""

    def __init__(self) -> None:
        self.route: Callable[[str], None] | None = None


_above = _Above()


def route_above(route: Callable[[str], None] | None) -> None:
    """While a progress line is live: print log lines through `route` (above it), and
    show the per-image events only at debug level. None: back to the plain stream."""
    _above.route = route


class _Through:
    """A text stream that writes to `out`, or through the live line's route while one
    is shown (whole lines: print() writes the message and its newline apart)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._partial = ""

    def write(self, text: str) -> int:
        route = _above.route
        if route is None and not self._partial:
            return self.out.write(text)
        self._partial += text
        if "\n" in self._partial:
            lines, _, self._partial = self._partial.rpartition("\n")
            if route is None:
                self.out.write(lines + "\n")
            else:
                route(lines)
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()


def _per_image_quiet(show: bool) -> Callable[[Any, str, MutableMapping[str, Any]], Any]:
    def processor(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
        if _above.route is not None and event.get("event") in PER_IMAGE:
            if not show:
                raise structlog.DropEvent
            event["level"] = "debug"
        return event

    return processor


# Fields whose line breaks are meant (a traceback): not escaped on the console
_MULTILINE = frozenset({"exception", "stack"})


def _console_safe(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    """For the console renderer only (JSON escapes by itself): text from file names and
    servers with its control characters escaped, so that it can neither drive the
    terminal nor forge a line."""
    for key, value in event.items():
        if isinstance(value, str) and key not in _MULTILINE:
            event[key] = printable(value)
    return event


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _per_image_quiet(LEVELS[level] <= logging.DEBUG),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *([] if use_json else [_console_safe]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=_Through(out)),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get() -> Any:
    return structlog.get_logger("featsync")


class _ToStructlog(logging.Handler):
    """Re-emits a stdlib logging record (waitress, Flask, warnings) as one featsync event."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
            if record.exc_info:
                fields["exc_info"] = record.exc_info  # rendered as an "exception" field
            level = min(max(record.levelno // 10 * 10, logging.DEBUG), logging.CRITICAL)
            get().log(level, "library_log", **fields)
        except Exception:
            self.handleError(record)


def capture_stdlib(level: str = "info") -> None:
    """Send what libraries log through the stdlib (and Python's warnings) to the
    structlog output configured above, so that output stays one format."""
    root = logging.getLogger()
    root.handlers[:] = [_ToStructlog()]
    root.setLevel(LEVELS[level])
    logging.captureWarnings(True)
