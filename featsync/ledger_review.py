"""What a review of the search context (`featsync verify`, the daemon's rolling review)
reads from and writes to the ledger: the rows it checks (a page after a cursor, a
random sample, the rows of given IDs), the cursor where the daemon's last review
stopped (in the meta table, so a restart continues there), the features counts it
learns (compare-and-set: only into the version it read), and the marks that hand each
drift to the ordinary sync. SqlLedger inherits it; it needs the ledger's transactions,
meta table and upsert."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from featsync.drift import Believed, Drift
from featsync.model import Kind, State
from featsync.schema import history, images
from featsync.sqlitefiles import waits_when_locked

_IN_CHUNK = 500  # image IDs per IN (...) query
_COLUMNS = (
    images.c.image_id,
    images.c.state,
    images.c.remote,
    images.c.features_count,
    images.c.version,
)
CURSOR_KEY = "review_cursor"


def _believed(r: Any) -> Believed:
    return Believed(r[0], r[1], bool(r[2]), r[3], int(r[4]))


class LedgerReview:
    """The review's reads and writes; a subclass gives the transactions (SqlLedger)."""

    _tx: Callable[[], AbstractContextManager[Connection]]
    _meta: Callable[[str], str | None]
    _set_meta: Callable[[str, str], None]
    _upsert: Callable[..., None]

    # -- reads -------------------------------------------------------------------------

    @waits_when_locked
    def believed_after(self, after: str, limit: int) -> list[Believed]:
        """Up to `limit` rows in image ID order, each after `after` ("" the start)."""
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(*_COLUMNS)
                .where(images.c.image_id > after)
                .order_by(images.c.image_id)
                .limit(limit)
            ).all()
        return [_believed(r) for r in rows]

    @waits_when_locked
    def believed_sample(self, n: int) -> list[Believed]:
        """`n` rows a GET can judge (synced or deleted) at random, in image ID order."""
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(*_COLUMNS)
                .where(images.c.state.in_([State.SYNCED.value, State.DELETED.value]))
                .order_by(sa.func.random())
                .limit(n)
            ).all()
        return sorted(_believed(r) for r in rows)

    @waits_when_locked
    def believed_of(self, image_ids: Iterable[str]) -> dict[str, Believed]:
        """The rows of these IDs (those that have one)."""
        ids = sorted(set(image_ids))
        out: dict[str, Believed] = {}
        with self._tx() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                found = conn.execute(sa.select(*_COLUMNS).where(images.c.image_id.in_(chunk)))
                out.update((r[0], _believed(r)) for r in found)
        return out

    @waits_when_locked
    def row_count(self) -> int:
        with self._tx() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(images)).scalar() or 0)

    def review_cursor(self) -> str:
        """The last image ID the daemon's rolling review checked ("" : the start)."""
        return self._meta(CURSOR_KEY) or ""

    def set_review_cursor(self, image_id: str) -> None:
        self._set_meta(CURSOR_KEY, image_id)

    @waits_when_locked
    def in_flux(self) -> tuple[int, int]:
        """Rows a check cannot judge, being in flux (failed: quarantined, waiting for a
        retry, or marked by a repair), and how many of them are drift marks no cycle
        has acted on yet (a withheld delete's mark included)."""
        marked = sa.and_(
            images.c.error_kind == "unknown", images.c.last_error.startswith(MARK_PREFIX)
        )
        with self._tx() as conn:
            failed, marks = conn.execute(
                sa.select(sa.func.count(), sa.func.count().filter(marked)).where(
                    images.c.state == State.FAILED.value
                )
            ).one()
        return int(failed or 0), int(marks or 0)

    @waits_when_locked
    def repair_outcomes(self, image_ids: Iterable[str]) -> dict[str, str]:
        """Where each of these IDs stands after a repair: "sent" (synced), "deleted",
        "withheld" (its delete is held back by the delete guard), "failed: <error>" or
        "waiting" (marked, not yet synced: a daemon will)."""
        ids = sorted(set(image_ids))
        cols = (
            images.c.image_id,
            images.c.state,
            images.c.withheld_at,
            images.c.last_error,
            images.c.error_kind,
        )
        out: dict[str, str] = {}
        with self._tx() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                for image_id, state, withheld, error, kind in conn.execute(
                    sa.select(*cols).where(images.c.image_id.in_(chunk))
                ):
                    if state == State.SYNCED.value:
                        out[image_id] = "sent"
                    elif state == State.DELETED.value:
                        out[image_id] = "deleted"
                    elif withheld is not None:
                        out[image_id] = "withheld"
                    elif kind == "unknown" and (error or "").startswith(MARK_PREFIX):
                        out[image_id] = "waiting"
                    else:
                        out[image_id] = f"failed: {error}"
        return out

    # -- writes ------------------------------------------------------------------------

    @waits_when_locked
    def fill_counts(self, counts: Sequence[tuple[str, int, int]]) -> int:
        """Features counts the context answered for rows that lack one (Aspose's adds
        return none), as (image ID, version read, count): written only where the row is
        still that version, synced and without a count (compare-and-set: a row synced
        again meanwhile keeps what its own sync recorded), and into that version's
        history row. Returns how many rows got one."""
        filled = 0
        with self._tx() as conn:
            for image_id, version, count in counts:
                done = conn.execute(
                    images.update()
                    .where(
                        images.c.image_id == image_id,
                        images.c.version == version,
                        images.c.state == State.SYNCED.value,
                        images.c.features_count.is_(None),
                    )
                    .values(features_count=count)
                )
                if done.rowcount:
                    filled += 1
                    conn.execute(
                        history.update()
                        .where(
                            history.c.image_id == image_id,
                            history.c.version == version,
                            history.c.features_count.is_(None),
                        )
                        .values(features_count=count)
                    )
        return filled

    @waits_when_locked
    def mark_drift(self, drifts: Sequence[Drift], now: float) -> int:
        """Hand each drift to the ordinary sync: its row says the context "may hold" the
        ID, with no known content (state failed, remote, digest "" and mtime 0, so the
        scan reads the file again) and due now. A cycle then sends the file if it is
        there (an add for a missing image; an update, which finds it held, for the
        others) and deletes the ID through the delete guard if it is not. Rows the
        ledger believed synced are marked too (unlike `adopt`). Returns how many."""
        with self._tx() as conn:
            for d in drifts:
                values: dict[str, Any] = {
                    "state": State.FAILED,
                    "remote": True,
                    "digest": "",
                    "mtime_ns": 0,
                    "attempts": 0,
                    "next_attempt_at": None,
                    "last_error": f"{MARK_PREFIX}{d.kind}: {d.detail}",
                    "error_kind": "unknown",
                    # a missing image is sent as an add (one call); the others hold
                    # features, so an update (one call) is right for them
                    "failed_action": Kind.ADD.value if d.kind == "missing" else None,
                    "updated_at": now,
                }
                self._upsert(conn, d.image_id, values, now)
        return len(drifts)


MARK_PREFIX = "verify found "  # the start of a drift mark's last_error
