"""What the ledger remembers of the search context as a whole, apart from the rows of
single images' outcomes (featsync.ledger): which context it mirrors (the binding, a
resync, the IDs adopted from a context that can list them) and the delete guard's
memory (deletes withheld until confirmed, the rolling window, the last confirm).
SqlLedger inherits it; it needs the ledger's transactions and meta table."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from featsync.model import Kind, State
from featsync.schema import history, images, meta
from featsync.sqlitefiles import waits_when_locked

_IN_CHUNK = 500  # image IDs per IN (...) query


class LedgerMemory:
    """The context binding and the delete guard's memory; a subclass gives the
    transactions and the meta table (SqlLedger)."""

    _tx: Callable[[], AbstractContextManager[Connection]]
    _meta: Callable[[str], str | None]
    _set_meta: Callable[[str, str], None]
    _upsert: Callable[..., None]

    def context_identity(self) -> str | None:
        """The search context this ledger mirrors (SearchContext.identity), if recorded."""
        return self._meta("context")

    def bind_context(self, identity: str) -> None:
        self._set_meta("context", identity)

    @waits_when_locked
    def resync(self, identity: str, now: float) -> int:
        """Mirror another context from now on: nothing is known to be in it. Every image
        is marked not held and not synced (the next cycle adds each file, forgets the
        gone ones), in one transaction with the new binding; returns how many."""
        with self._tx() as conn:
            done = conn.execute(
                images.update()
                .where(images.c.state != State.DELETED.value)
                .values(
                    state=State.FAILED,
                    remote=False,
                    digest="",
                    mtime_ns=0,
                    attempts=0,
                    next_attempt_at=None,
                    last_error="not yet sent to the search context (resync)",
                    error_kind="transient",
                    failed_action=None,
                    withheld_at=None,
                    updated_at=now,
                )
            )
            conn.execute(meta.delete().where(meta.c.key == "context"))
            conn.execute(meta.insert().values(key="context", value=identity))
        return int(done.rowcount or 0)

    # -- writes ----------------------------------------------------------------

    @waits_when_locked
    def withhold(self, image_ids: Sequence[str], now: float) -> None:
        """The delete guard held back these deletes: keep them held back (persisted)
        until the files come back or an operator confirms deletes."""
        with self._tx() as conn:
            for start in range(0, len(image_ids), _IN_CHUNK):
                chunk = list(image_ids[start : start + _IN_CHUNK])
                conn.execute(
                    images.update()
                    .where(images.c.image_id.in_(chunk), images.c.withheld_at.is_(None))
                    .values(withheld_at=now)
                )

    @waits_when_locked
    def adopt(self, held: Iterable[str], now: float) -> int:
        """The context holds these image IDs: rows that do not say so now say "may
        hold", with no known content (a lost or new ledger: the next cycle sends each
        again whose file is there and deletes the others, through the delete guard).
        Returns how many rows changed."""
        values: dict[str, Any] = {
            "state": State.FAILED,
            "remote": True,
            "digest": "",
            "mtime_ns": 0,
            "next_attempt_at": None,
            "last_error": "held by the search context, unknown to the ledger",
            "error_kind": "unknown",
            "failed_action": None,
            "updated_at": now,
        }
        ids = sorted(set(held))
        changed = 0
        with self._tx() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                known = {
                    r[0]: r[1]
                    for r in conn.execute(
                        sa.select(images.c.image_id, images.c.remote).where(
                            images.c.image_id.in_(chunk)
                        )
                    )
                }
                for image_id in chunk:
                    if known.get(image_id):
                        continue  # the ledger knows it is held
                    self._upsert(conn, image_id, dict(values), now)
                    changed += 1
        return changed

    @waits_when_locked
    def withheld_ids(self) -> list[str]:
        """Image IDs whose deletes are withheld (persisted)."""
        with self._tx() as conn:
            return list(
                conn.execute(
                    sa.select(images.c.image_id).where(images.c.withheld_at.is_not(None))
                ).scalars()
            )

    @waits_when_locked
    def release_withheld(self, image_ids: Sequence[str]) -> None:
        """These files are back: their deletes are no longer withheld."""
        with self._tx() as conn:
            for start in range(0, len(image_ids), _IN_CHUNK):
                conn.execute(
                    images.update()
                    .where(images.c.image_id.in_(list(image_ids[start : start + _IN_CHUNK])))
                    .values(withheld_at=None)
                )

    @waits_when_locked
    def recent_changes(self, since: float) -> tuple[int, int]:
        """(deletes, adds) sent since `since` and after the last confirm by an operator
        (adds: of content new to the context, and 0 while the ledger's whole history
        lies within the window):
        the delete guard's rolling window, so that pacing deletes over many cycles, or
        adding a new set of images before removing the old one, gains nothing. A delete
        whose content the context still holds (under any ID: a move, or a file back)
        is no loss and does not count."""
        start = max(since, float(self._meta("deletes_confirmed_at") or 0.0))
        still = sa.exists().where(
            images.c.digest == history.c.digest,
            images.c.remote.is_(True),
            images.c.state == State.SYNCED.value,
        )
        with self._tx() as conn:
            deletes = conn.execute(
                sa.select(sa.func.count())
                .select_from(history)
                .where(
                    history.c.action == Kind.DELETE.value,
                    history.c.at > start,
                    # content unknown (adopted, changed while sent): it counts
                    sa.or_(history.c.digest.is_(None), history.c.digest == "", ~still),
                )
            ).scalar()
            # A ledger whose history starts within the window is on its first sync:
            # its adds are all it holds, not a new set beside an old one.
            older = conn.execute(sa.select(sa.exists().where(history.c.at <= start))).scalar()
            went = history.alias("went")
            adds = (
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(history)
                    .where(
                        history.c.action == Kind.ADD.value,
                        history.c.at > start,
                        # an add of content deleted within the window is a move (NOT IN
                        # an uncorrelated set: 7 ms at 20,000 adds, where a correlated
                        # NOT EXISTS took 3.7 s)
                        history.c.digest.not_in(
                            sa.select(went.c.digest).where(
                                went.c.action == Kind.DELETE.value,
                                went.c.at > start,
                                went.c.digest.is_not(None),
                            )
                        ),
                    )
                ).scalar()
                if older
                else 0
            )
        return int(deletes or 0), int(adds or 0)

    def confirm_deletes(self, now: float) -> None:
        """An operator confirmed deletes: earlier ones no longer count in the window."""
        self._set_meta("deletes_confirmed_at", repr(now))
