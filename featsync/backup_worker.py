"""Taking a backup: what apply's workers do before each update and delete (and before
an add that finds features already there), and what a failure to take one means. The
store itself is featsync.backups.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from featsync.backups import BackupStore
from featsync.errors import Fatal, ItemRejected, NotFound, Transient
from featsync.model import SearchContext

# The error kind of a change held back for its backup: retried like a transient failure
# (no try counted), but neither counted nor reset by the worker's outage breaker.
BACKUP_WAIT = "backup"


class BackupNotTaken(Transient):
    """The features could not be backed up: the change they guard waits (retried like a
    transient failure, but it says nothing about the service: adds go on)."""


class Backups:
    """What apply's workers need: the store, opened by the first worker that needs it
    (a cycle of plain adds may never: it then creates nothing), and the rules. A store
    that cannot be opened stays unopened (`unavailable` says why)."""

    def __init__(
        self,
        path: str | None,
        required: bool,
        images: bool,
        store: BackupStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.required = required
        self.images = images
        self.clock = clock
        self.unavailable = ""
        self._store = store
        self._lock = threading.Lock()

    @property
    def store(self) -> BackupStore | None:
        with self._lock:
            if self._store is None and not self.unavailable and self.path is not None:
                try:
                    self._store = BackupStore(self.path)
                except Fatal as exc:
                    self.unavailable = str(exc)
            return self._store

    @property
    def opened(self) -> BackupStore | None:
        """The store if a worker opened it (never opens it)."""
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def before(
        self, ctx: SearchContext, image_id: str, version: int, digest: str | None, reason: str
    ) -> str:
        """GET what the context holds for `image_id` and keep it, before `reason` (an
        update or a delete) replaces it. Returns what happened, for the log: "kept",
        "kept already", "nothing held" or "skipped: why" (when not required). Raises
        BackupNotTaken when a backup was required and could not be taken."""
        store = self.store
        if store is None:
            return self._not_taken(self.unavailable)
        try:
            held = ctx.get_features(image_id)
        except NotFound:
            return "nothing held"
        except Transient as exc:
            return self._not_taken(f"GET features failed: {exc}")
        except ItemRejected as exc:  # refused for this image: it waits, longer each time
            if self.required:
                raise ItemRejected(
                    f"features backup not taken (GET features refused: {exc}), so nothing "
                    "was replaced ([backup] required = true)"
                ) from exc
            return f"skipped: GET features refused: {exc}"
        try:
            kept = store.put(image_id, version, digest, reason, held, self.clock())
        except Fatal as exc:  # the store cannot be written (disk full, ...)
            return self._not_taken(str(exc))
        return "kept" if kept else "kept already"

    def keep_image(self, fd: int, size: int, digest: str) -> str | None:
        """A copy of the file about to be sent, if `images` is on. Best effort: a copy
        that cannot be made is a note in the log, and holds nothing back."""
        if not self.images or digest.startswith("unhashed:"):
            return None
        store = self.store
        if store is None:
            return f"image copy skipped: {self.unavailable}"
        try:
            store.keep_image(fd, size, digest, self.clock())
        except (OSError, ValueError, Fatal) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            where = store.image_path(digest)
            return f"image copy skipped: {where}: {why}"
        return None

    def _not_taken(self, why: str) -> str:
        if self.required:
            raise BackupNotTaken(
                f"features backup not taken ({why}), so nothing was replaced "
                "([backup] required = true)"
            )
        return f"skipped: {why}"
