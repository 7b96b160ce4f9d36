"""structlog set-up, done once at the entry point.

JSON lines off a TTY (journald, files, pipes), a readable console on a TTY. Logs go
to stderr; stdout is kept for what a command prints as its answer (a plan, a status).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


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
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
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
