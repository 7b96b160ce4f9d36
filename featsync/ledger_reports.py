"""What the ledger tells an operator: counts by state, weak images, failures, an
image's history, the last full cycle. Read-only queries, apart from the code that keeps
the ledger (featsync.ledger), whose SqlLedger has them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from featsync.model import Kind, State
from featsync.schema import cycles, history, images


class LedgerReports:
    """The read-only queries; a subclass gives the transactions (SqlLedger._tx)."""

    _tx: Callable[[], AbstractContextManager[Connection]]  # one transaction

    def counts(self, min_features: int | None = None) -> dict[str, int]:
        """Images by state; with `min_features`, also "weak": synced images whose
        features count is known and below it (they are counted as synced too)."""
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(images.c.state, sa.func.count()).group_by(images.c.state)
            ).all()
            weak = None
            if min_features is not None:
                weak = conn.execute(
                    sa.select(sa.func.count()).where(
                        images.c.state == State.SYNCED.value,
                        images.c.features_count < min_features,
                    )
                ).scalar()
        out = {s.value: 0 for s in State}
        out.update({state: n for state, n in rows})
        if weak is not None:
            out["weak"] = int(weak)
        return out

    def weak(self, min_features: int, limit: int = 20) -> list[dict[str, Any]]:
        """Synced images with fewer than `min_features` features, fewest first."""
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(images.c.image_id, images.c.features_count)
                .where(
                    images.c.state == State.SYNCED.value,
                    images.c.features_count < min_features,
                )
                .order_by(images.c.features_count, images.c.image_id)
                .limit(limit)
            ).all()
        return [{"image_id": r[0], "features_count": r[1]} for r in rows]

    def failures(self) -> list[dict[str, Any]]:
        cols = (
            images.c.image_id,
            images.c.last_error,
            images.c.error_kind,
            images.c.attempts,
            images.c.next_attempt_at,
            images.c.remote,
        )
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(*cols).where(images.c.state == State.FAILED).order_by(images.c.image_id)
            ).all()
        return [
            {
                "image_id": r.image_id,
                "error": r.last_error,
                "error_kind": r.error_kind,
                "attempts": r.attempts,
                "next_attempt_at": r.next_attempt_at,
            }
            for r in rows
        ]

    def history_of(self, image_id: str) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = (
                conn.execute(
                    sa.select(history).where(history.c.image_id == image_id).order_by(history.c.id)
                )
                .mappings()
                .all()
            )
        return [dict(r) for r in rows]

    def believed(self) -> list[tuple[str, str, bool, int | None]]:
        """(image ID, state, remote, features count) of every row: what `verify`
        compares with the context."""
        cols = (images.c.image_id, images.c.state, images.c.remote, images.c.features_count)
        with self._tx() as conn:
            rows = conn.execute(sa.select(*cols).order_by(images.c.image_id)).all()
        return [(r[0], r[1], bool(r[2]), r[3]) for r in rows]

    def last_cycle(self) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = (
                conn.execute(sa.select(cycles).order_by(cycles.c.id.desc()).limit(1))
                .mappings()
                .first()
            )
        return dict(row) if row is not None else None

    def version_digests(self, keys: Sequence[tuple[str, int]]) -> dict[str, str]:
        """The content hash of each (image ID, version) the context was sent (from the
        history: a failed row's own digest is what was tried, not what is held)."""
        out: dict[str, str] = {}
        wanted = dict(keys)
        ids = sorted(wanted)
        sent = (Kind.ADD.value, Kind.UPDATE.value)
        with self._tx() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows = conn.execute(
                    sa.select(history.c.image_id, history.c.version, history.c.digest).where(
                        history.c.image_id.in_(chunk), history.c.action.in_(sent)
                    )
                )
                for image_id, version, digest in rows:
                    if wanted.get(image_id) == version and digest:
                        out[image_id] = digest
        return out

    def gone_before(
        self, image_ids: Sequence[str], cutoff: float, unknown: bool = False
    ) -> set[str]:
        """Those of `image_ids` the ledger says were deleted before `cutoff` (the
        retention rule for images that are gone); with `unknown`, also those it does
        not know at all."""
        ids = sorted(set(image_ids))
        known: dict[str, tuple[str, float]] = {}
        with self._tx() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                for image_id, state, at in conn.execute(
                    sa.select(images.c.image_id, images.c.state, images.c.updated_at).where(
                        images.c.image_id.in_(chunk)
                    )
                ):
                    known[image_id] = (state, at)
        return {
            i
            for i in ids
            if (unknown and i not in known)
            or (i in known and known[i][0] == State.DELETED.value and known[i][1] < cutoff)
        }

    def current_digests(self) -> set[str]:
        """The content hash of every version the context holds by the ledger: of each
        synced image, and of the version a failed (not deleted) image still has there."""
        held = (
            sa.select(history.c.digest)
            .join(
                images,
                sa.and_(
                    images.c.image_id == history.c.image_id,
                    images.c.version == history.c.version,
                ),
            )
            .where(
                images.c.state != State.DELETED.value,
                history.c.action.in_((Kind.ADD.value, Kind.UPDATE.value)),
            )
        )
        synced = sa.select(images.c.digest).where(images.c.state == State.SYNCED.value)
        with self._tx() as conn:
            return {r[0] for r in conn.execute(sa.union(held, synced)) if r[0]}

    def relpath_of(self, image_id: str) -> str | None:
        """The path the image's file was last found at (relative to the root)."""
        with self._tx() as conn:
            return conn.execute(
                sa.select(images.c.relpath).where(images.c.image_id == image_id)
            ).scalar()
