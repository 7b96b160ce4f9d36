"""What every `--json` prints: numbers as numbers, times as ISO 8601 with a timezone."""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from typing import Any


def iso(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC ("2026-12-02T21:51:40.250+00:00"); None stays None."""
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def finite(data: Any) -> Any:
    """`data` with every float that is not a number (NaN, an infinity) as None: JSON has
    no such numbers, and a script's parser refuses Python's `NaN`."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite(v) for v in data]
    return data


def emit(data: Any) -> None:
    """Print one JSON document on stdout (indented: read by people as well as jq)."""
    text = json.dumps(finite(data), indent=2, ensure_ascii=False, allow_nan=False)
    sys.stdout.write(text + "\n")
