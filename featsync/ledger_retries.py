"""The ledger's failed images and their next tries: which are due (and by which path
the daemon looks at each again), and clearing their waits (`featsync retry`). Apart
from the code that keeps the ledger (featsync.ledger), whose SqlLedger has them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from featsync.model import State
from featsync.scan import image_id_for
from featsync.schema import images
from featsync.sqlitefiles import waits_when_locked


class LedgerRetries:
    """Failed images' tries; a subclass gives the transactions (SqlLedger._tx)."""

    _tx: Callable[[], AbstractContextManager[Connection]]  # one transaction

    @waits_when_locked
    def failed_due(self, now: float) -> tuple[list[str], float | None]:
        """Failed image IDs whose next try is due, and when the next one after them is."""
        due = sa.func.coalesce(images.c.next_attempt_at, 0.0)
        with self._tx() as conn:
            ids = conn.execute(
                sa.select(images.c.image_id)
                .where(images.c.state == State.FAILED.value, due <= now)
                .order_by(images.c.image_id)
            ).scalars()
            found = list(ids)
            later = conn.execute(
                sa.select(sa.func.min(due)).where(images.c.state == State.FAILED.value, due > now)
            ).scalar()
        return found, later

    @waits_when_locked
    def due_paths(self, now: float, id_prefix: str) -> list[str]:
        """Paths (relative to the root, as found on disk) of the failed images whose next
        try is due: what the daemon looks at again (see `due_work`)."""
        return self.due_work(now, id_prefix)[0]

    @waits_when_locked
    def due_work(self, now: float, id_prefix: str) -> tuple[list[str], list[tuple[str, float]]]:
        """The failed images whose next try is due: the paths a targeted cycle judges
        them by, and (image ID, updated_at) of those no path reaches, which only a full
        cycle can judge.

        A path reaches a row when it gives back the row's ID: its relpath, or for a row
        from before paths were kept, its ID without the prefix. A row with neither (an
        ID added behind featsync's back and marked by `verify --repair`, an NFD one, one
        outside the prefix) would otherwise be handed to a targeted cycle by a path that
        maps to another ID, and stay due for ever."""
        due = sa.func.coalesce(images.c.next_attempt_at, 0.0)
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(images.c.image_id, images.c.relpath, images.c.updated_at)
                .where(
                    images.c.state == State.FAILED.value,
                    due <= now,
                    # a withheld delete waits for its file or a confirm, not for a turn
                    images.c.withheld_at.is_(None),
                )
                .order_by(images.c.image_id)
            ).all()
        paths: list[str] = []
        unreached: list[tuple[str, float]] = []
        for image_id, relpath, updated_at in rows:
            path = relpath
            if not path and image_id.startswith(id_prefix):
                path = image_id[len(id_prefix) :]
            if path and image_id_for(path, id_prefix) == image_id:
                paths.append(path)
            else:
                unreached.append((image_id, float(updated_at or 0.0)))
        return paths, unreached

    @waits_when_locked
    def retry(self, image_ids: Sequence[str] | None, now: float) -> list[str]:
        """Clear the wait of these failed images (None: of every failed image), so the
        next cycle tries them; returns the IDs whose wait was cleared."""
        where = [images.c.state == State.FAILED.value]
        if image_ids is not None:
            where.append(images.c.image_id.in_(list(image_ids)))
        with self._tx() as conn:
            ids = list(
                conn.execute(
                    sa.select(images.c.image_id).where(*where).order_by(images.c.image_id)
                ).scalars()
            )
            if ids:
                conn.execute(
                    images.update().where(*where).values(next_attempt_at=None, updated_at=now)
                )
        return ids
