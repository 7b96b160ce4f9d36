"""Opening an SQLite file only to look: nothing is written, nothing is created.

``featsync status`` and ``reconcile --dry-run`` read the ledger and the embedded
store; they must work without write access and leave the disk as it was. SQLite's
``mode=ro`` still makes the ``-wal`` and ``-shm`` files of a WAL database when they are
missing (and cannot remove them again), so when there is no ``-wal`` file (no writer
since the last clean close) the file is opened ``immutable``; when there is one, a
writer may be at work, and ``mode=ro`` reads through its WAL.
"""

from __future__ import annotations

import os
import urllib.parse


def read_only_uri(path: str) -> str:
    """An SQLite URI (for ``sqlite3.connect(..., uri=True)``) that only reads `path`."""
    mode = "mode=ro" if os.path.exists(path + "-wal") else "immutable=1"
    return f"file:{urllib.parse.quote(os.path.abspath(path))}?{mode}"
