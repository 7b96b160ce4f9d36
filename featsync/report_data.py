"""What `featsync report` reads from the ledger and the backups: totals, the features
distribution, weak and failing images, drops in features between versions, the last
updates' changes, exact duplicates and the activity per day. Read-only: its own SELECTs
over the ledger's engine (opened read-only by the caller) and the backups' store opened
read-only; nothing is written, no lock is taken. Times stay Unix seconds here
(featsync.report turns them into ISO 8601 for --json)."""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from featsync.backups import Backup, BackupStore
from featsync.lifecycle import match
from featsync.model import Kind, State
from featsync.schema import cycles, history, images

if TYPE_CHECKING:
    from featsync.ledger import SqlLedger

LISTED = 50  # rows per list (drops, changes): the worst; the totals count them all
SENT = (Kind.ADD.value, Kind.UPDATE.value)


# Unix times a datetime can hold (years 1 to 9999): a hand-edited or damaged ledger may
# hold any value, or text, where a time or a count belongs; the report shows "-" for it.
_EARLIEST, _LATEST = -62135596800.0, 253402300799.0


def moment(value: Any) -> float | None:
    """A time from the ledger as Unix seconds; None when it is none, or not a time."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if _EARLIEST <= value <= _LATEST else None


def number(value: Any) -> int | None:
    """A count or a version from the ledger as an int; None when it is none, or not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def text(value: Any) -> str | None:
    return None if value is None else str(value)


def percentile(ordered: Sequence[int], p: float) -> int | None:
    """The nearest-rank percentile of sorted values (None when there are none)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def histogram(values: Sequence[int], bins: int = 20) -> list[dict[str, int]]:
    """Equal-width bins [low, high) over the values (the last bin includes its top)."""
    if not values:
        return []
    low, high = min(values), max(values)
    width = max(1, math.ceil((high - low + 1) / bins))
    counts: dict[int, int] = {}
    for v in values:
        counts[(v - low) // width] = counts.get((v - low) // width, 0) + 1
    n = (high - low) // width + 1
    return [
        {"low": low + i * width, "high": low + (i + 1) * width, "count": counts.get(i, 0)}
        for i in range(n)
    ]


def distribution(counts: Sequence[int]) -> dict[str, Any]:
    ordered = sorted(counts)
    return {
        "images": len(ordered),
        "min": ordered[0] if ordered else None,
        "p5": percentile(ordered, 5),
        "median": percentile(ordered, 50),
        "p95": percentile(ordered, 95),
        "max": ordered[-1] if ordered else None,
        "mean": round(sum(ordered) / len(ordered), 1) if ordered else None,
        "histogram": histogram(ordered),
    }


def day_of(ts: float) -> str:
    """The UTC day of a Unix time, "2026-12-02"."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).date().isoformat()


def gather(ledger: SqlLedger, backup_path: str, min_features: int) -> dict[str, Any]:
    """Every figure the ledger and the backups give (no context, no files)."""
    counts = ledger.counts(min_features)
    withheld = ledger.withheld_ids()
    failed, marks = ledger.in_flux()
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(images.c.image_id, images.c.features_count, images.c.relpath).where(
                images.c.state == State.SYNCED.value
            )
        ).all()
        data: dict[str, Any] = {
            "failures": _failures(conn),
            "exact_duplicates": _exact_duplicates(conn),
            "activity": _activity(conn),
            "verify": _verify(conn, marks, ledger.review_cursor()),
        }
        drops, updated = _drops(conn)
        changes, backups = _backup_changes(backup_path, _last_updates(conn))
    synced = [(str(r[0]), number(r[1]), text(r[2])) for r in rows]
    known = [r[1] for r in synced if r[1] is not None]
    weak = sorted(
        (r for r in synced if r[1] is not None and r[1] < min_features),
        key=lambda r: (r[1], r[0]),
    )
    data.update(
        totals={
            "synced": counts.get(State.SYNCED.value, 0),
            "weak": counts.get("weak", 0),
            "failed": counts.get(State.FAILED.value, 0),
            "withheld": len(withheld),
            "deleted": counts.get(State.DELETED.value, 0),
            "drift_marks": marks,
            "features_unknown": len(synced) - len(known),
        },
        context_identity=ledger.context_identity(),
        last_cycle=_cycle(ledger.last_cycle()),
        min_features=min_features,
        features=distribution(known),
        weak=[{"image_id": r[0], "features_count": r[1], "relpath": r[2]} for r in weak],
        withheld_deletes=sorted(withheld),
        drops={"images_with_a_drop": updated, "worst": drops},
    )
    data["last_update_changes"], data["backups"] = changes, backups
    data["verify"]["failed_rows"] = failed
    return data


def _failures(conn: sa.Connection) -> list[dict[str, Any]]:
    rows = conn.execute(
        sa.select(
            images.c.image_id,
            images.c.last_error,
            images.c.error_kind,
            images.c.attempts,
            images.c.next_attempt_at,
            images.c.failed_action,
            images.c.updated_at,
            images.c.relpath,
        )
        .where(images.c.state == State.FAILED.value)
        .order_by(images.c.attempts.desc(), images.c.image_id)
    ).all()
    return [
        {
            "image_id": str(r.image_id),
            "error": text(r.last_error),
            "error_kind": text(r.error_kind),
            "attempts": number(r.attempts),
            "next_attempt_at": moment(r.next_attempt_at),
            "action": text(r.failed_action),
            "failed_at": moment(r.updated_at),
            "relpath": text(r.relpath),
        }
        for r in rows
    ]


def _cycle(row: dict[str, Any] | None) -> dict[str, Any] | None:
    """The last full cycle, each value as its kind says (a bad one: None)."""
    if row is None:
        return None
    out = dict(row)
    for key in ("added", "updated", "deleted", "failed", "id"):
        if key in out:
            out[key] = number(out[key])
    for key in ("started_at", "finished_at"):
        if key in out:
            out[key] = moment(out[key])
    return out


def _exact_duplicates(conn: sa.Connection) -> dict[str, Any]:
    """One content hash under several image IDs that the context holds (synced rows)."""
    shared = (
        sa.select(images.c.digest)
        .where(images.c.state == State.SYNCED.value, images.c.digest != "")
        .group_by(images.c.digest)
        .having(sa.func.count() > 1)
    )
    rows = conn.execute(
        sa.select(images.c.digest, images.c.image_id)
        .where(images.c.state == State.SYNCED.value, images.c.digest.in_(shared))
        .order_by(images.c.digest, images.c.image_id)
    ).all()
    groups: dict[str, list[str]] = {}
    for digest, image_id in rows:
        groups.setdefault(str(digest), []).append(str(image_id))
    ordered = sorted(groups.items(), key=lambda g: (-len(g[1]), g[1][0]))
    return {
        "groups": len(ordered),
        "images": sum(len(ids) for ids in groups.values()),
        "extra_copies": sum(len(ids) - 1 for ids in groups.values()),
        "list": [{"hash": d, "image_ids": ids} for d, ids in ordered],
    }


def _activity(conn: sa.Connection) -> list[dict[str, Any]]:
    """Per UTC day: adds, updates, deletes (history), and failed actions (the full
    cycles' counts: an image failing in three cycles counts three times)."""
    days: dict[str, dict[str, Any]] = {}

    def day(ts: float) -> dict[str, Any]:
        d = day_of(ts)
        if d not in days:
            days[d] = {"day": d, "added": 0, "updated": 0, "deleted": 0, "failed": 0}
        return days[d]

    names = {Kind.ADD.value: "added", Kind.UPDATE.value: "updated", Kind.DELETE.value: "deleted"}
    for action, at in conn.execute(sa.select(history.c.action, history.c.at)):
        ts = moment(at)
        if action in names and ts is not None:
            day(ts)[names[action]] += 1
    for finished, failed in conn.execute(sa.select(cycles.c.finished_at, cycles.c.failed)):
        ts, n = moment(finished), number(failed)
        if n and ts is not None:
            day(ts)["failed"] += n
    return [days[d] for d in sorted(days)]


def _verify(conn: sa.Connection, marks: int, cursor: str) -> dict[str, Any]:
    """What the last verify or review left in the ledger: its drift marks not yet mended
    (and when the newest was made) and the daemon's review cursor. The ledger keeps no
    time of a verify that found nothing."""
    from featsync.ledger_review import MARK_PREFIX

    rows = conn.execute(
        sa.select(images.c.image_id, images.c.last_error, images.c.updated_at)
        .where(
            images.c.state == State.FAILED.value,
            images.c.error_kind == "unknown",
            images.c.last_error.startswith(MARK_PREFIX),
        )
        .order_by(images.c.updated_at.desc(), images.c.image_id)
    ).all()
    kinds: dict[str, int] = {}
    for r in rows:
        kind = str(r.last_error)[len(MARK_PREFIX) :].split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    times = [t for t in (moment(r.updated_at) for r in rows) if t is not None]
    return {
        "drift_marks": marks,
        "drift_by_kind": kinds,
        "last_marked_at": max(times) if times else None,
        "marked": [
            {"image_id": str(r.image_id), "drift": text(r.last_error)} for r in rows[:LISTED]
        ],
        "review_cursor": cursor or None,
    }


def _drops(conn: sa.Connection) -> tuple[list[dict[str, Any]], int]:
    """The biggest drops in features count from one sent version of an image to its
    next (history), worst first; and how many images had any."""
    result = conn.execute(
        sa.select(history.c.image_id, history.c.version, history.c.features_count, history.c.at)
        .where(history.c.action.in_(SENT), history.c.features_count.is_not(None))
        .order_by(history.c.image_id, history.c.version)
    )
    worst: list[dict[str, Any]] = []
    images_with_a_drop: set[str] = set()
    before: tuple[str, int, int] | None = None
    for image_id, raw_version, raw_count, at in result:
        version, count = number(raw_version), number(raw_count)
        if version is None or count is None:
            continue  # not a version or a count: nothing to compare
        image_id = str(image_id)
        if before is not None and before[0] == image_id and count < before[2]:
            images_with_a_drop.add(image_id)
            worst.append(
                {
                    "image_id": image_id,
                    "from_version": before[1],
                    "to_version": version,
                    "from_count": before[2],
                    "to_count": count,
                    "drop": before[2] - count,
                    "at": moment(at),
                }
            )
            if len(worst) > 4 * LISTED:
                worst = _worst_drops(worst)
        before = (image_id, version, count)
    return _worst_drops(worst), len(images_with_a_drop)


def _worst_drops(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows.sort(key=lambda d: (-d["drop"], d["image_id"], d["to_version"]))
    return rows[:LISTED]


def _last_updates(conn: sa.Connection) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Each synced image whose last change was an update, with its last sent version and
    the version before (all that is compared), one image at a time: a ledger of 100,000
    updated images is never held whole."""
    last = (
        sa.select(history.c.image_id, sa.func.max(history.c.id).label("last_id"))
        .group_by(history.c.image_id)
        .subquery()
    )
    updated = (
        sa.select(history.c.image_id)
        .join(last, last.c.last_id == history.c.id)
        .where(history.c.action == Kind.UPDATE.value)
    )
    result = conn.execute(
        sa.select(
            history.c.image_id,
            history.c.version,
            history.c.digest,
            history.c.action,
            history.c.features_count,
            history.c.at,
        )
        .where(history.c.image_id.in_(updated), history.c.action.in_(SENT))
        .order_by(history.c.image_id, history.c.id)
    ).mappings()
    image_id: str | None = None
    rows: list[dict[str, Any]] = []
    for r in result:
        version = number(r["version"])
        if version is None:
            continue
        row = {
            "image_id": str(r["image_id"]),
            "version": version,
            "digest": text(r["digest"]),
            "action": r["action"],
            "features_count": number(r["features_count"]),
            "at": moment(r["at"]),
        }
        if row["image_id"] != image_id:
            if image_id is not None and rows:
                yield image_id, _last_two(rows)
            image_id, rows = row["image_id"], []
        rows.append(row)
    if image_id is not None and rows:
        yield image_id, _last_two(rows)


def _last_two(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the version before the last one, then the last one."""
    new = rows[-1]
    return [r for r in rows[:-1] if r["version"] == new["version"] - 1] + [new]


def _backup_changes(
    backup_path: str, last_updates: Iterable[tuple[str, list[dict[str, Any]]]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each last update's change in features count: the backup of the version before
    (what the context held, kept just before the update) against the count the update
    was recorded with; biggest relative change first. And the store's totals. The
    images are taken 500 at a time, only the worst changes kept."""
    store = BackupStore(backup_path, read_only=True)
    changes: list[dict[str, Any]] = []
    updated = compared = without = 0
    try:
        totals = store.totals()
        batches = iter(last_updates)
        while batch := list(itertools.islice(batches, 500)):
            updated += len(batch)
            records = _records(store, [image_id for image_id, _ in batch])
            for image_id, versions in batch:
                change = _change(image_id, versions, records.get(image_id, []))
                if change is None:
                    without += 1
                else:
                    compared += 1
                    changes.append(change)
            changes = _worst_changes(changes)
    finally:
        store.close()
    return {
        "updated_images": updated,
        "compared": compared,
        "without_backup": without,
        "worst": changes,
    }, totals


def _change(
    image_id: str, versions: list[dict[str, Any]], records: list[Backup]
) -> dict[str, Any] | None:
    new = versions[-1]
    old = match(versions[:-1], records).get(new["version"] - 1)
    if old is None or new["features_count"] is None:
        return None
    delta = new["features_count"] - old.features_count
    return {
        "image_id": image_id,
        "version": new["version"],
        "at": new["at"],
        "before": old.features_count,
        "after": new["features_count"],
        "change": delta,
        "relative": round(delta / old.features_count, 4) if old.features_count else None,
    }


def _worst_changes(changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    changes.sort(
        key=lambda c: (
            -(math.inf if c["relative"] is None else abs(c["relative"])),
            -abs(c["change"]),
            c["image_id"],
        )
    )
    return changes[:LISTED]


def _records(store: BackupStore, image_ids: Iterable[str]) -> dict[str, list[Backup]]:
    """The kept records (without features) of these image IDs, oldest first."""
    out: dict[str, list[Backup]] = {}
    ids = list(image_ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        sql = (
            "SELECT id, image_id, version, digest, reason, taken_at, features_count, size "  # noqa: S608 (only ? marks)
            f"FROM backups WHERE image_id IN ({marks}) ORDER BY image_id, taken_at, id"
        )
        for row in store.read(sql, chunk):
            b = Backup(*row)
            out.setdefault(b.image_id, []).append(b)
    return out
