"""A plan as a person reads it (`reconcile --dry-run`) and as a script does (`--json`).

Each action says why it is planned: a new file, content changed (old and new digest),
a file gone, the retry of a failed image, or a rename (a delete whose content an add
brings back under another ID: both are still sent, the context has no rename; only
this display pairs them). The ledger rows of the planned IDs tell the why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from featsync.escapes import printable
from featsync.model import Action, Kind, LedgerRow, Plan, RootState, Snapshot, State
from featsync.plan import renames

CONFIRM = "featsync reconcile --confirm-deletes"
RESYNC = "to be sent again: the context was replaced (resync)"


@dataclass(frozen=True, slots=True)
class Step:
    """One planned action with the reason for it."""

    kind: str  # add, update, delete
    image_id: str
    path: str | None  # the file's path under the folder (None for a delete: it is gone)
    reason: str
    old_digest: str | None = None
    new_digest: str | None = None
    rename: str | None = None  # the other side of a rename: the ID it came from or went to

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "image_id": self.image_id,
            "path": self.path,
            "reason": self.reason,
        }
        if self.old_digest is not None or self.new_digest is not None:
            out["old_digest"], out["new_digest"] = self.old_digest, self.new_digest
        if self.rename is not None:
            out["renamed_from" if self.kind == Kind.ADD.value else "renamed_to"] = self.rename
        return out


def why(a: Action, row: LedgerRow | None) -> Step:
    """The reason for one action, from the ledger row it starts from (None: no row)."""
    path = a.file.relpath if a.file is not None else None
    new = a.file.digest if a.file is not None else None
    kind = a.kind.value
    if a.kind is Kind.DELETE:
        reason = "file gone"
        if row is not None and row.state == State.FAILED.value:
            reason += f" (after {row.attempts} failed tries of its last change)"
        return Step(kind, a.image_id, None, reason)
    if row is None or row.state == State.DELETED.value:
        return Step(kind, a.image_id, path, "new file")
    if row.state == State.FAILED.value and not row.digest and not row.attempts:
        # what `--resync` leaves (no digest, nothing tried yet): not a content change
        return Step(kind, a.image_id, path, RESYNC)
    if row.digest != new:
        return Step(kind, a.image_id, path, "content changed", row.digest, new)
    if row.state == State.FAILED.value:
        failed = row.failed_action or kind
        return Step(kind, a.image_id, path, f"retry of a failed {failed} ({row.attempts} tries)")
    return Step(kind, a.image_id, path, "not known to be in the context yet")


def steps(p: Plan, rows: Mapping[str, LedgerRow]) -> tuple[list[Step], list[tuple[Step, Step]]]:
    """(steps that are no rename, (delete, add) pairs of renames): each action once."""
    digests = {i: r.digest for i, r in rows.items()}
    pairs = renames(p.actions, digests)
    paired = {id(a) for pair in pairs for a in pair}
    single = [why(a, rows.get(a.image_id)) for a in p.actions if id(a) not in paired]
    shown = []
    for gone, new in pairs:
        g, n = why(gone, rows.get(gone.image_id)), why(new, rows.get(new.image_id))
        reason = "renamed (same content)"
        shown.append(
            (
                Step(g.kind, g.image_id, None, reason, rename=n.image_id),
                Step(n.kind, n.image_id, n.path, reason, rename=g.image_id),
            )
        )
    return single, shown


def release(p: Plan) -> str | None:
    """How withheld deletes are released: `--confirm-deletes`, unless the folder itself
    is in doubt (missing, another device, no marker, an incomplete scan), which no
    confirmation overrides."""
    if not p.withheld:
        return None
    if p.doubtful:
        return "once the folder can be trusted again (see the reason); no option overrides it"
    return CONFIRM


def describe(p: Plan, rows: Mapping[str, LedgerRow] | None = None) -> list[str]:
    """The plan as lines a person reads (what --dry-run prints): actions grouped by
    kind under a heading with their count, renames as `rename OLD -> NEW`, then a
    summary line, and how to release withheld deletes if some are."""
    single, pairs = steps(p, rows or {})
    lines: list[str] = []

    def group(title: str, body: list[str]) -> None:
        if body:
            lines.append(f"{title} ({len(body)}):")
            lines.extend("  " + b for b in body)

    for kind in (Kind.ADD, Kind.UPDATE):
        group(kind.value, [_line(s) for s in single if s.kind == kind.value])
    group("rename", [f"rename  {g.image_id} -> {n.image_id}" for g, n in pairs])
    group("delete", [_line(s) for s in single if s.kind == Kind.DELETE.value])
    group("forget", [f"forget  {i}" for i in p.forget])
    group("withheld delete", [f"withheld delete {a.image_id}" for a in p.withheld])
    group("waiting", [f"waiting {i}" for i in p.waiting])
    group("unreadable", [f"unreadable {i}: {why}" for i, why in p.unreadable])
    summary = (
        f"plan: {p.count(Kind.ADD)} add, {p.count(Kind.UPDATE)} update, "
        f"{p.count(Kind.DELETE)} delete, {p.unchanged} unchanged, {len(p.withheld)} withheld"
    )
    if p.withheld_reason:
        summary += f" ({p.withheld_reason})"
    if pairs:
        summary += f"; {len(pairs)} rename(s) among them (each sent as a delete and an add)"
    lines.append(summary)
    how = release(p)
    if how == CONFIRM:
        lines.append(f"to send the withheld deletes: {CONFIRM}")
    elif how is not None:
        lines.append(f"the withheld deletes are sent {how}")
    # IDs, paths and reasons come from file names: no control character reaches the
    # terminal raw, no name splits a line
    return [printable(x) for x in lines]


def _line(s: Step) -> str:
    reason = s.reason
    if s.old_digest is not None and s.new_digest is not None:
        reason += f": {s.old_digest[:12]} -> {s.new_digest[:12]}"
    return f"{s.kind:<7} {s.image_id}  ({reason})"


def as_json(p: Plan, rows: Mapping[str, LedgerRow], complete: bool) -> dict[str, Any]:
    """The plan for a script (`reconcile --dry-run --json`)."""
    single, pairs = steps(p, rows)
    every = [*single, *(s for pair in pairs for s in pair)]
    order = {Kind.ADD.value: 0, Kind.UPDATE.value: 1, Kind.DELETE.value: 2}
    every.sort(key=lambda s: (order[s.kind], s.image_id))
    return {
        "dry_run": True,
        "complete": complete,
        "counts": {
            "add": p.count(Kind.ADD),
            "update": p.count(Kind.UPDATE),
            "delete": p.count(Kind.DELETE),
            "rename": len(pairs),
            "unchanged": p.unchanged,
            "withheld": len(p.withheld),
            "forget": len(p.forget),
            "waiting": len(p.waiting),
            "unreadable": len(p.unreadable),
        },
        "actions": [s.as_json() for s in every],
        "renames": [
            {
                "from": g.image_id,
                "to": n.image_id,
                "path": n.path,
                "digest": rows[g.image_id].digest,
            }
            for g, n in pairs
        ],
        "withheld": {
            "image_ids": [a.image_id for a in p.withheld],
            "reason": p.withheld_reason,
            "release": release(p),
        },
        "forget": list(p.forget),
        "waiting": list(p.waiting),
        "unreadable": [{"image_id": i, "error": e} for i, e in p.unreadable],
    }


def problems(snapshot: Snapshot) -> list[str]:
    """Why the scan was incomplete (empty if it was not): the folder itself, then what
    the scan could not read."""
    out = []
    if snapshot.root_state is not RootState.OK:
        state = snapshot.root_state.value.replace("_", " ")
        out.append(f"folder {snapshot.root!r}: {state}")
    return out + list(snapshot.problems)
