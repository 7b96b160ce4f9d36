"""An image's life, for the operator: `history`, `features get --version` and `features
diff` (and `restore`, in featsync.restore). Each reads the ledger and the backups
read-only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from featsync import jsonout
from featsync.backup_worker import Backups
from featsync.backups import Backup, BackupStore
from featsync.config import Settings
from featsync.errors import NotFound
from featsync.looks import EXIT_NOT_IN_STEP, EXIT_OK, when
from featsync.model import ImageFeatures, Kind, SearchContext, State

SENT = (Kind.ADD.value, Kind.UPDATE.value)


@dataclass(frozen=True, slots=True)
class Looked:
    """What the ledger and the backups know of one image ID."""

    image_id: str
    versions: list[dict[str, Any]]  # the ledger's history rows, oldest first
    state: str | None  # the ledger's state now (None: never synced)
    version: int  # the ledger's version now
    relpath: str | None
    backups: dict[int, Backup]  # sent version -> the record that is its backup
    others: list[Backup]  # records kept that are no sent version's backup
    images: set[str]  # content hashes whose image copy is kept


def look(settings: Settings, image_id: str) -> Looked:
    from featsync.ledger import SqlLedger

    ledger = SqlLedger(settings.ledger.url, read_only=True)
    try:
        versions = ledger.history_of(image_id)
        row = ledger.rows_for([image_id]).get(image_id)
        relpath = ledger.relpath_of(image_id)
    finally:
        ledger.close()
    store = BackupStore(settings.backup.path, read_only=True)
    try:
        records = store.records(image_id)
        digests = [v["digest"] for v in versions] + [b.digest for b in records]
        images = store.kept_images(d for d in digests if d)
    finally:
        store.close()
    backups = match(versions, records)
    matched = {b.id for b in backups.values()}
    return Looked(
        image_id,
        versions,
        None if row is None else row.state,
        0 if row is None else row.version,
        relpath,
        backups,
        [b for b in records if b.id not in matched],
        images,
    )


def back_up_by_hand(settings: Settings, context: SearchContext, image_id: str, reason: str) -> str:
    """`features update` / `features delete` by hand keep what they replace, too."""
    if not settings.backup.enabled:
        return "not backed up ([backup] enabled = false)"
    from featsync.ledger import SqlLedger

    ledger = SqlLedger(settings.ledger.url, read_only=True)
    try:
        row = ledger.rows_for([image_id]).get(image_id)
        version = 0 if row is None else row.version
        digest = ledger.version_digests([(image_id, version)]).get(image_id)
    finally:
        ledger.close()
    store = BackupStore(settings.backup.path)
    try:
        return Backups(None, settings.backup.required, images=False, store=store).before(
            context, image_id, version, digest, reason
        )
    finally:
        store.close()


# -- history -----------------------------------------------------------------------------


def history(settings: Settings, image_id: str, as_json: bool) -> int:
    """Every version of one image ID: when, what, its content hash and features count,
    and whether its features backup and its image copy are kept."""
    seen = look(settings, image_id)
    if not seen.versions and not seen.others:
        print(f"featsync: {image_id!r}: no history in the ledger (never synced)", file=sys.stderr)
        return EXIT_NOT_IN_STEP
    out: list[dict[str, Any]] = []
    for h in seen.versions:
        sent = h["action"] in SENT
        out.append(
            {
                "version": h["version"],
                "at": h["at"],  # made ISO 8601 for --json below
                "action": h["action"],
                "hash": h["digest"],
                "features_count": h["features_count"],
                "backup": sent and h["version"] in seen.backups,
                "image_kept": sent and bool(h["digest"]) and h["digest"] in seen.images,
            }
        )
    # Records that are no sent version's backup: what the context held under this ID
    # before featsync's first add (an "already there"), a change by hand, a record kept
    # before a lost ledger, or the new features of a retried update that had landed.
    strays = [b.as_json() for b in seen.others]
    if as_json:
        versions = [{**v, "at": jsonout.iso(v["at"])} for v in out]
        others = [{**b, "taken_at": jsonout.iso(b["taken_at"])} for b in strays]
        doc = {"image_id": image_id, "versions": versions, "other_backups": others}
        jsonout.emit(doc)
        return EXIT_OK
    for v in out:
        count = "-" if v["features_count"] is None else f"{v['features_count']} features"
        digest = (v["hash"] or "-")[:16]
        kept = []
        if v["backup"]:
            kept.append("features backup")
        if v["image_kept"]:
            kept.append("image copy")
        print(
            f"v{v['version']:<4} {when(v['at'])}  {v['action']:<7} {digest:<16}  {count:<14}"
            + ("  kept: " + ", ".join(kept) if kept else "")
        )
    for b in strays:
        print(
            f"other backup #{b['id']} taken {when(b['taken_at'])} before a {b['reason']} "
            f"(the ledger at v{b['version']}): {b['features_count']} features"
        )
    return EXIT_OK


# -- features get --version / features diff ------------------------------------------------


def features_of(
    settings: Settings, image_id: str, version: int | None
) -> tuple[ImageFeatures, str]:
    """The record of `version` (None: what the context holds now), and where it came
    from. Raises NotFound naming what is kept."""
    seen = None
    if version is not None:
        seen = look(settings, image_id)
        b = seen.backups.get(version)
        if b is not None:
            store = BackupStore(settings.backup.path, read_only=True)
            try:
                feats = store.features(b.id)
            finally:
                store.close()
            if feats is not None:
                return feats, f"v{version}, backed up {when(b.taken_at)} before its {b.reason}"
        if not (version == seen.version and seen.state == State.SYNCED):
            kept = ", ".join(f"v{v}" for v in sorted(seen.backups)) or "none"
            holds = (
                f"the context holds v{seen.version}"
                if seen.state == State.SYNCED
                else "the ledger says the context holds no version of it now"
            )
            raise NotFound(
                f"{image_id!r}: no features of version {version} are kept "
                f"(backups kept: {kept}; {holds})"
            )
    from featsync import logs
    from featsync.wiring import open_context

    context = open_context(settings, logs.get(), read_only=True)
    try:
        held = context.get_features(image_id)
    finally:
        context.close()
    now = seen.version if seen is not None else None
    return held, "held by the context now" + (f" (v{now})" if now else "")


def features_get(settings: Settings, image_id: str, version: int | None) -> int:
    feats, _source = features_of(settings, image_id, version)
    print(json.dumps(feats.as_json(), indent=2))
    return EXIT_OK


def features_diff(
    settings: Settings, image_id: str, from_v: int | None, to_v: int | None, as_json: bool
) -> int:
    """Compare two versions: counts, the share of descriptors unchanged, and (embedded
    context) their similarity on the 0-100 scale. Default: the newest backup against
    what the context holds now."""
    if from_v is None or to_v is None:
        seen = look(settings, image_id)
        if to_v is None and seen.state != State.SYNCED:
            if not seen.backups:
                raise NotFound(f"{image_id!r}: not held by the context, and no backup is kept")
            if len(seen.backups) < 2:
                raise NotFound(
                    f"{image_id!r}: not held by the context now (deleted, or failing) and "
                    f"one backup is kept (v{max(seen.backups)}): nothing to compare it with"
                )
            to_v = max(seen.backups)
        older = [v for v in seen.backups if to_v is None or v < to_v]
        if from_v is None:
            if not older:
                raise NotFound(f"{image_id!r}: no older features backup to compare with is kept")
            from_v = max(older)
    a, a_from = features_of(settings, image_id, from_v)
    b, b_from = features_of(settings, image_id, to_v)
    report = compare(a, b, settings.context.kind == "local")
    report.update(image_id=image_id, **{"from": a_from, "to": b_from})
    if as_json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(f"{image_id}: {a_from} -> {b_from}")
    delta = report["features_count_to"] - report["features_count_from"]
    print(
        f"features: {report['features_count_from']} -> {report['features_count_to']} "
        f"({delta:+d}); length {report['feature_length_in_bits']} bits"
    )
    same = report["descriptors_unchanged"]
    if same is None:
        print("descriptors: not comparable one by one (different lengths, or opaque data)")
        print(f"identical records: {'yes' if report['identical'] else 'no'}")
    else:
        print(
            f"descriptors unchanged: {same} of {report['features_count_from']} "
            f"({report['share_unchanged']:.1%})"
        )
    if report["similarity"] is not None:
        print(f"similarity: {report['similarity']} (0-100, the embedded context's measure)")
    return EXIT_OK


def compare(a: ImageFeatures, b: ImageFeatures, similar: bool) -> dict[str, Any]:
    """The numbers of `features diff`."""
    rows_a, rows_b = _rows(a), _rows(b)
    same: int | None = None
    share: float | None = None
    if rows_a is not None and rows_b is not None:
        pool: dict[bytes, int] = {}
        for r in rows_b:
            pool[r] = pool.get(r, 0) + 1
        same = 0
        for r in rows_a:
            if pool.get(r, 0) > 0:
                pool[r] -= 1
                same += 1
        share = same / len(rows_a) if rows_a else None  # nothing there to be unchanged
    similarity = None
    same_width = a.feature_length_in_bits == b.feature_length_in_bits
    if similar and same_width and rows_a is not None and rows_b is not None:
        import numpy as np

        from featsync.localcontext import matching

        width = a.feature_length_in_bits // 8

        def arr(rows: list[bytes]) -> Any:
            return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, width)

        similarity = matching.similarity(arr(rows_a), arr(rows_b))
    return {
        "features_count_from": a.features_count,
        "features_count_to": b.features_count,
        "feature_length_in_bits": a.feature_length_in_bits,
        "descriptors_unchanged": same,
        "share_unchanged": share,
        "identical": a.features == b.features,
        "similarity": similarity,
    }


def _rows(f: ImageFeatures) -> list[bytes] | None:
    """The descriptors one by one, when the record is `count` descriptors of the stated
    length (the embedded context's layout); None for an opaque blob."""
    bits = f.feature_length_in_bits
    if bits <= 0 or bits % 8 or len(f.features) != f.features_count * (bits // 8):
        return None
    w = bits // 8
    return [f.features[i : i + w] for i in range(0, len(f.features), w)]


def match(versions: Sequence[Mapping[str, Any]], records: Sequence[Backup]) -> dict[int, Backup]:
    """Which kept record is the backup of each sent version in `versions` (the ledger's
    history rows): the earliest with that version and that version's content hash (any
    hash, when the history has none), preferring one whose features count is the one
    the version was recorded with (when known)."""
    out: dict[int, Backup] = {}
    for h in versions:
        if h["action"] not in ("add", "update"):
            continue
        same = [
            r
            for r in records  # oldest first
            if r.version == h["version"] and (not h["digest"] or r.digest == h["digest"])
        ]
        counted = [r for r in same if r.features_count == h.get("features_count")]
        if counted or same:
            out[h["version"]] = (counted or same)[0]
    return out
