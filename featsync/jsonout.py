"""What every `--json` prints: numbers as numbers, times as ISO 8601 with a timezone."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any


def iso(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC ("2026-12-02T21:51:40.250+00:00"); None stays None."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def emit(data: Any) -> None:
    """Print one JSON document on stdout (indented: read by people as well as jq)."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
