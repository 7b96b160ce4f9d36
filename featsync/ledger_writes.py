"""The ledger's writes of what happened to each image: an outcome (and its history
row), the intent written before an add is sent, refreshed stat keys, files that could
not be read, forgotten rows, and a cycle's summary. Apart from the code that opens and
reads the ledger (featsync.ledger), whose SqlLedger has them; the calling thread of
apply is their one writer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from featsync.model import Kind, LocalFile, Outcome, State
from featsync.schema import cycles, history, images
from featsync.sqlitefiles import waits_when_locked


class LedgerWrites:
    """What is written per image and per cycle; a subclass gives the transactions
    (SqlLedger._tx)."""

    _tx: Callable[[], AbstractContextManager[Connection]]  # one transaction

    @waits_when_locked
    def record(self, outcome: Outcome, now: float, next_attempt_at: float | None) -> None:
        """Write one action's outcome (and a history row if it changed the context)."""
        a = outcome.action
        with self._tx() as conn:
            if outcome.done is None:
                self._record_failure(conn, outcome, now, next_attempt_at)
                return
            version = a.version + 1
            digest = outcome.digest
            if outcome.done is Kind.DELETE:
                # the content that went: the delete guard's window tells a move by it
                digest = conn.execute(
                    sa.select(images.c.digest).where(images.c.image_id == a.image_id)
                ).scalar()
                values: dict[str, Any] = {
                    "state": State.DELETED,
                    "remote": False,
                    "version": version,
                    "attempts": 0,
                    "next_attempt_at": None,
                    "last_error": None,
                    "error_kind": None,
                    "features_count": None,
                    "failed_action": None,
                    "withheld_at": None,
                    "updated_at": now,
                }
                conn.execute(images.update().where(images.c.image_id == a.image_id).values(values))
            else:
                assert outcome.digest is not None
                values = {
                    "size": outcome.size,
                    "mtime_ns": outcome.mtime_ns,
                    "inode": outcome.inode,
                    "digest": outcome.digest,
                    "version": version,
                    "state": State.SYNCED,
                    "remote": True,
                    "attempts": 0,
                    "next_attempt_at": None,
                    "last_error": None,
                    "error_kind": None,
                    "features_count": outcome.features_count,
                    "failed_action": None,
                    "withheld_at": None,
                    "updated_at": now,
                    "synced_at": now,
                }
                if a.file is not None:
                    values["relpath"] = a.file.relpath
                self._upsert(conn, a.image_id, values, now)
            conn.execute(
                history.insert().values(
                    image_id=a.image_id,
                    version=version,
                    digest=digest,
                    action=outcome.done.value,
                    features_count=outcome.features_count,
                    at=now,
                )
            )

    def _record_failure(
        self, conn: Connection, outcome: Outcome, now: float, next_attempt_at: float | None
    ) -> None:
        a = outcome.action
        # A transient error (network, busy server) is no fault of the image: it does not
        # count as a try, so an outage does not push every image's next try far away.
        # The count is the action's, not the row's + 1: a changed file starts afresh.
        waits = outcome.error_kind in ("transient", "backup")  # no fault of the image
        tries = a.attempts if waits else a.attempts + 1
        values: dict[str, Any] = {
            "state": State.FAILED,
            "attempts": tries,
            "next_attempt_at": next_attempt_at,
            "last_error": outcome.error,
            "error_kind": outcome.error_kind,
            "failed_action": a.kind.value,
            "updated_at": now,
        }
        if a.kind is Kind.ADD:
            # An add that reached the context and got no answer (a timeout, a dropped
            # connection, an error after the call) may have added the features: the
            # row says "may hold" (remote), so a delete follows if the file goes.
            values["remote"] = outcome.reached or a.held
        if a.file is not None:
            values["relpath"] = a.file.relpath
        if outcome.digest is not None:  # remember what was tried, so an unchanged file waits
            values.update(
                size=outcome.size,
                mtime_ns=outcome.mtime_ns,
                inode=outcome.inode,
                digest=outcome.digest,
            )
        self._upsert(conn, a.image_id, values, now, new_remote=outcome.reached or a.held)

    @waits_when_locked
    def record_intents(
        self, adds: Sequence[tuple[str, str]], now: float
    ) -> dict[str, dict[str, Any] | None]:
        """Adds about to be sent, as (image ID, path): from now on the context may hold
        each, and its row says so before the call, so that a crash or a lost answer
        cannot leave features in the context that the ledger does not know of (the next
        cycle sends it again if the file is there, a delete if it is gone; "not found"
        is done). One transaction for the batch. Returns each row as it was (None:
        there was none), for `undo_intent`."""
        if not adds:
            return {}
        values: dict[str, Any] = {
            "state": State.FAILED,
            "remote": True,
            "next_attempt_at": None,
            "last_error": "sent to the search context; no answer recorded yet",
            "error_kind": "unknown",
            "failed_action": Kind.ADD.value,
            "updated_at": now,
        }
        ids = [image_id for image_id, _ in adds]
        set_values: dict[str, Any] = {"relpath": sa.bindparam("b_relpath")}
        set_values.update({k: sa.bindparam(k) for k in values})
        with self._tx() as conn:
            found = conn.execute(sa.select(images).where(images.c.image_id.in_(ids)))
            before: dict[str, dict[str, Any] | None] = {r.image_id: dict(r._mapping) for r in found}
            known = [{"b_id": i, "b_relpath": rel, **values} for i, rel in adds if i in before]
            if known:
                conn.execute(
                    images.update()
                    .where(images.c.image_id == sa.bindparam("b_id"))
                    .values(set_values),
                    known,
                )
            fresh = [
                {
                    **values,
                    "image_id": i,
                    "relpath": rel,
                    "size": 0,
                    "mtime_ns": 0,
                    "inode": 0,
                    "digest": "",
                    "version": 0,
                    "attempts": 0,
                    "created_at": now,
                }
                for i, rel in adds
                if i not in before
            ]
            if fresh:
                conn.execute(images.insert(), fresh)
        return {i: before.get(i) for i in ids}

    @waits_when_locked
    def undo_intent(self, image_id: str, before: dict[str, Any] | None) -> None:
        """The add was not sent after all (a stop, a file that changed first): the row
        goes back to what it was."""
        with self._tx() as conn:
            where = images.c.image_id == image_id
            if before is None:
                conn.execute(images.delete().where(where))
            else:
                conn.execute(images.update().where(where).values(before))

    def _upsert(
        self,
        conn: Connection,
        image_id: str,
        values: dict[str, Any],
        now: float,
        new_remote: bool = True,
    ) -> None:
        done = conn.execute(images.update().where(images.c.image_id == image_id).values(values))
        if done.rowcount:
            return
        fresh: dict[str, Any] = {
            "image_id": image_id,
            "size": 0,
            "mtime_ns": 0,
            "inode": 0,
            "digest": "",
            "version": 0,
            "state": State.FAILED,
            "remote": new_remote,
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
        }
        fresh.update(values)
        conn.execute(images.insert().values(fresh))

    @waits_when_locked
    def record_restat(self, files: Sequence[LocalFile], now: float) -> None:
        """Content unchanged, stat changed (a touch, a copy back): refresh the quick-check keys."""
        if not files:
            return
        stmt = (
            images.update()
            .where(images.c.image_id == sa.bindparam("b_id"))
            .values(
                size=sa.bindparam("b_size"),
                mtime_ns=sa.bindparam("b_mtime"),
                inode=sa.bindparam("b_inode"),
                updated_at=now,
            )
        )
        params = [
            {"b_id": f.image_id, "b_size": f.size, "b_mtime": f.mtime_ns, "b_inode": f.inode}
            for f in files
        ]
        with self._tx() as conn:
            conn.execute(stmt, params)

    @waits_when_locked
    def record_unreadable(
        self,
        problems: Sequence[tuple[str, str]],
        now: float,
        wait: Callable[[int], float] = lambda _tries: 0.0,
        paths: dict[str, str] | None = None,
    ) -> None:
        """Files that exist but could not be read: failed, with the reason, no call made.
        Each waits `wait(tries)` seconds before the daemon looks at it again by itself
        (a change to the file, or a full rescan, looks sooner)."""
        with self._tx() as conn:
            for image_id, why in problems:
                tries = 1 + (
                    conn.execute(
                        sa.select(images.c.attempts).where(images.c.image_id == image_id)
                    ).scalar()
                    or 0
                )
                pause = wait(tries)
                values: dict[str, Any] = {
                    "state": State.FAILED,
                    "attempts": tries,
                    "last_error": why,
                    "error_kind": "unreadable",
                    "failed_action": "read",
                    "updated_at": now,
                    "next_attempt_at": now + pause if pause else None,
                }
                if paths and image_id in paths:
                    values["relpath"] = paths[image_id]
                self._upsert(conn, image_id, values, now, new_remote=False)

    @waits_when_locked
    def forget(self, image_ids: Sequence[str], now: float) -> None:
        """Images that failed before the context ever held them and are gone now."""
        if not image_ids:
            return
        with self._tx() as conn:
            conn.execute(
                images.update()
                .where(images.c.image_id.in_(list(image_ids)))
                .values(
                    state=State.DELETED,
                    remote=False,
                    attempts=0,
                    next_attempt_at=None,
                    last_error=None,
                    error_kind=None,
                    failed_action=None,
                    withheld_at=None,
                    updated_at=now,
                )
            )

    @waits_when_locked
    def record_cycle(self, **fields: Any) -> None:
        with self._tx() as conn:
            conn.execute(cycles.insert().values(**fields))
