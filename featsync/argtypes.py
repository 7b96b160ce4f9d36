"""argparse types the commands share: a similarity and a whole number in a range."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def percent(text: str) -> float:
    """A similarity from 0 to 100 (nan and the infinities are refused too)."""
    try:
        p = float(text)
    except ValueError:
        p = math.nan
    if not 0 <= p <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a similarity from 0 to 100")
    return p


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high` (no upper bound if None)."""
    span = f"of at least {low}" if high is None else f"from {low} to {high}"

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = low - 1
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {span}")
        return n

    return parse
