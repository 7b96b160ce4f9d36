"""The embedded search context: real AKAZE features, matching and a SQLite store."""

from __future__ import annotations

from featsync.localcontext.context import LocalContext

__all__ = ["LocalContext"]
