"""The planner: a pure function from (snapshot, ledger rows, policy, now) to a Plan.

It sorts every image ID into rclone's three piles — only in the folder (add), only
in the ledger (delete), in both (maybe update) — and then applies the delete guard
to the whole plan before anything is sent. No disk, clock or network here: time is a
parameter, so every rule can be tested with plain values.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping

from featsync.model import (
    Action,
    Kind,
    LedgerRow,
    LocalFile,
    Plan,
    Policy,
    RootState,
    Snapshot,
    State,
)


def retry_delay(attempts: int, policy: Policy) -> float:
    """Seconds to wait before the next try of an image that failed `attempts` times."""
    if attempts <= 0:
        return 0.0
    # The exponent is capped first so that huge attempt counts cannot overflow a float.
    growth = policy.retry_factor ** min(attempts - 1, 64)
    return min(policy.retry_cap_s, policy.retry_base_s * growth)


def is_due(row: LedgerRow, now: float) -> bool:
    return row.next_attempt_at is None or now >= row.next_attempt_at


def plan(snapshot: Snapshot, rows: Mapping[str, LedgerRow], policy: Policy, now: float) -> Plan:
    """Decide what to send so that the context matches the snapshot.

    `rows` must hold the ledger row of every image ID that is not in
    ``snapshot.unchanged`` (rows of unchanged images may be there too, or not: the
    engine leaves them out, so that a no-change rescan loads only their quick-check keys).
    """
    sends: list[Action] = []
    restat: list[LocalFile] = []
    waiting: list[str] = []
    read_but_same = 0  # read (stat changed, or never trusted) and found synced as it is
    deleted, synced = State.DELETED.value, State.SYNCED.value  # plain str: cheaper compares
    for image_id, f in snapshot.files.items():
        row = rows.get(image_id)
        if row is None or row.state == deleted:
            sends.append(Action(Kind.ADD, image_id, f, row.version if row else 0))  # fresh start
            continue
        same = f.digest == row.digest
        if same and (f.size, f.mtime_ns, f.inode) != (row.size, row.mtime_ns, row.inode):
            restat.append(f)
        if same and row.state == synced:
            read_but_same += 1
            continue
        if same and not is_due(row, now):
            waiting.append(image_id)
        else:
            # An add whose answer was lost is tried as an add again: it costs one call
            # if it never arrived, two ("already there", then update) if it did.
            remote = row.remote
            kind = Kind.UPDATE if remote and row.failed_action != Kind.ADD.value else Kind.ADD
            # a changed file starts its escalating wait afresh
            tries = row.attempts if same else 0
            sends.append(Action(kind, image_id, f, row.version, tries, remote))

    deletes: list[Action] = []
    forget: list[str] = []
    files, unchanged = snapshot.files, snapshot.unchanged
    for image_id, row in rows.items():
        if row.state == deleted or image_id in files or image_id in unchanged:
            continue
        if image_id in snapshot.unsettled or image_id in snapshot.unreadable:
            continue  # it exists; we just could not judge it this time
        if not row.remote:
            forget.append(image_id)
        elif (
            row.state == State.FAILED
            and row.failed_action == Kind.DELETE.value
            and not is_due(row, now)
        ):
            # Only a failed delete waits: a gone file whose add or update was rejected
            # is deleted now, not when that quarantine ends.
            waiting.append(image_id)
        else:
            deletes.append(Action(Kind.DELETE, image_id, None, row.version, row.attempts))

    sends.sort(key=lambda a: a.image_id)
    deletes.sort(key=lambda a: a.image_id)
    forget.sort()
    doubtful = doubt(snapshot, policy)
    held = held_count(rows, unchanged, policy)
    reason = doubtful
    withheld: tuple[Action, ...] = ()
    if reason is None and deletes and not policy.confirm_deletes:
        # Deletes withheld by an earlier cycle stay withheld until an operator
        # confirms them (or the files come back); the others are judged afresh.
        kept = [a for a in deletes if rows[a.image_id].withheld_at is not None]
        if kept:
            deletes = [a for a in deletes if rows[a.image_id].withheld_at is None]
            withheld = tuple(kept)
            since = min(rows[a.image_id].withheld_at or now for a in kept)
            reason = (
                f"{len(kept)} deletes withheld since {_when(since)} stay withheld until "
                "their files come back or `featsync reconcile --confirm-deletes`"
            )
        over = over_limits(deletes, sends, rows, held, policy) if deletes else None
        if over is not None:
            reason = over
            withheld, deletes = (*withheld, *deletes), []
    elif reason is not None:
        withheld, deletes = tuple(deletes), []
    if doubtful is not None:
        forget = []  # keep the failure records until the folder can be trusted again
    return Plan(
        actions=(*sends, *deletes),
        forget=tuple(forget),
        restat=tuple(restat),
        withheld=tuple(sorted(withheld, key=lambda a: a.image_id)),
        withheld_reason=reason if withheld else None,
        doubtful=doubtful is not None,
        held=held,
        unchanged=len(unchanged) + read_but_same,
        waiting=tuple(sorted(waiting)),
        unreadable=tuple(sorted(snapshot.unreadable.items())),
        unreadable_paths=tuple(sorted(snapshot.unreadable_paths.items())),
        unsettled=tuple(sorted(snapshot.unsettled)),
    )


def doubt(snapshot: Snapshot, policy: Policy) -> str | None:
    """Why the snapshot is no evidence that anything is gone, or None if it is."""
    if snapshot.root_state is RootState.MISSING:
        return f"folder {snapshot.root!r} is missing"
    if snapshot.root_state is RootState.NOT_A_DIRECTORY:
        return f"folder {snapshot.root!r} is not a directory"
    if policy.expected_device is not None and snapshot.device != policy.expected_device:
        return (
            f"folder {snapshot.root!r} is on device {snapshot.device}, not the recorded "
            f"{policy.expected_device} (not mounted?)"
        )
    if policy.marker and not snapshot.marker_present:
        return f"marker file {policy.marker!r} is missing from {snapshot.root!r}"
    if snapshot.problems:
        n, first = len(snapshot.problems), snapshot.problems[0]
        return f"scan incomplete: {n} problem(s), first: {first}"
    return None


def held_count(rows: Mapping[str, LedgerRow], unchanged: frozenset[str], policy: Policy) -> int:
    """How many images the context holds before this cycle sends anything."""
    if policy.held is not None:  # a targeted cycle sees a few rows; the ledger knows all
        return policy.held
    held = sum(1 for r in rows.values() if r.remote and r.image_id not in unchanged)
    return held + len(unchanged)  # unchanged images are synced, so held, in rows or not


def over_limits(
    deletes: list[Action],
    sends: list[Action],
    rows: Mapping[str, LedgerRow],
    held: int,
    policy: Policy,
) -> str | None:
    """Check the whole plan's deletes against the limits, before the first one is sent.

    They are judged against what the context held before this cycle (its adds do not
    dilute them), together with the deletes sent within the rolling window and the
    files already known to be gone that a later cycle will judge (pacing gains
    nothing). A delete whose content reappears under a new ID in the same plan is a
    move, not a loss: each new file excuses one delete of its content, no more.
    """
    added: Counter[str] = Counter(a.file.digest for a in sends if a.file is not None)
    del added[""]  # content unknown (never read, or sent while it changed): no match
    lost = 0
    for a in deletes:
        digest = rows[a.image_id].digest
        if added[digest] > 0:
            added[digest] -= 1
        else:
            lost += 1
    earlier = policy.recent_deletes + policy.pending_gone
    total = lost + earlier
    also = f" (with {earlier} more deleted lately or gone meanwhile)" if earlier else ""
    if total > policy.max_delete_count:
        return f"{total} deletes{also} exceed safety.max_delete_count = {policy.max_delete_count}"
    # What the context held before the window: new images added since do not dilute
    # the deletes (a new set copied in, then the old one removed).
    base = max(1, held + policy.recent_deletes - policy.recent_adds)
    if base and total / base > policy.max_delete_fraction:
        return (
            f"{total} deletes{also} of {base} images ({total / base:.0%}) exceed "
            f"safety.max_delete_fraction = {policy.max_delete_fraction}"
        )
    return None


def renames(actions: Iterable[Action], digests: Mapping[str, str]) -> list[tuple[Action, Action]]:
    """(delete, add) pairs of a plan that are a file renamed or moved: the delete's
    content (its ledger digest, from `digests`) is the add's file's. Each action is in
    one pair at most; the context has no rename, so both are still sent: only what a
    person reads pairs them. In the order of the deletes' IDs."""
    adds: dict[str, list[Action]] = {}
    for a in actions:
        if a.kind is Kind.ADD and a.file is not None and a.file.digest:
            adds.setdefault(a.file.digest, []).append(a)
    pairs = []
    for a in sorted(actions, key=lambda a: a.image_id):
        if a.kind is not Kind.DELETE:
            continue
        same = adds.get(digests.get(a.image_id, ""))
        if same:
            pairs.append((a, same.pop(0)))
    return pairs


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def assume_applied(rows: Mapping[str, LedgerRow], p: Plan, now: float) -> dict[str, LedgerRow]:
    """The ledger as it would be if every action in `p` succeeded (apply's model)."""
    out = dict(rows)
    for f in p.restat:
        out[f.image_id] = out[f.image_id]._replace(size=f.size, mtime_ns=f.mtime_ns, inode=f.inode)
    for image_id in p.forget:
        out[image_id] = out[image_id]._replace(state=State.DELETED)
    for a in p.actions:
        if a.kind is Kind.DELETE:
            out[a.image_id] = out[a.image_id]._replace(
                state=State.DELETED,
                remote=False,
                version=a.version + 1,
                attempts=0,
                next_attempt_at=None,
            )
            continue
        sent = a.file
        assert sent is not None
        out[a.image_id] = LedgerRow(
            a.image_id,
            sent.size,
            sent.mtime_ns,
            sent.inode,
            sent.digest,
            a.version + 1,
            State.SYNCED,
            True,
            0,
            None,
        )
    return out
