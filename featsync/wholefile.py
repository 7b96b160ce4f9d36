"""A file written whole or not at all, with the mode a user expects.

A page, an export, a restored image: written to a hidden temporary file beside the
target, flushed to disk, then renamed over it, so a reader (or a crash) never finds
half of one. The rename would give the target the temporary file's 0600; instead a
replaced file keeps its own mode (a page made private stays private) and a new one
gets what ``open()`` would give it: 0666 less the umask.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from typing import IO


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (setting it
    to read it would, for an instant, give another thread's new files mode 0666)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def mode_for(path: str, keep: bool = True) -> int:
    """The mode `path` is to have when written anew: its own if it is a file there
    (and `keep`), else a new file's."""
    if keep:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode):
                return stat.S_IMODE(st.st_mode)
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def written_whole(path: str, prefix: str, suffix: str = ".tmp") -> Iterator[IO[str]]:
    """A text file to write that becomes `path` when the block ends without an error
    (and is removed when it raises). OSError from making it is the caller's to word."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fchmod(fh.fileno(), mode_for(path))
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
