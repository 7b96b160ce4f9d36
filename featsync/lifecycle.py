"""An image's life, for the operator: `history`, `features get --version` and `features
diff`, `restore`. Each reads the ledger and the backups read-only; `restore` writes
one file into the folder (the ordinary sync then sends it) and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from featsync.backups import Backups, BackupStore
from featsync.config import Settings
from featsync.errors import NotFound
from featsync.looks import EXIT_NOT_IN_STEP, EXIT_OK, when
from featsync.model import ImageFeatures, Kind, SearchContext, State

_SENT = (Kind.ADD.value, Kind.UPDATE.value)


@dataclass(frozen=True, slots=True)
class Looked:
    """What the ledger and the backups know of one image ID."""

    image_id: str
    versions: list[dict[str, Any]]  # the ledger's history rows, oldest first
    state: str | None  # the ledger's state now (None: never synced)
    version: int  # the ledger's version now
    relpath: str | None
    backups: dict[int, Any]  # version -> featsync.backups.Backup
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
        backups = {b.version: b for b in store.versions(image_id)}
        digests = [v["digest"] for v in versions] + [b.digest for b in backups.values()]
        images = store.kept_images(d for d in digests if d)
    finally:
        store.close()
    return Looked(
        image_id,
        versions,
        None if row is None else row.state,
        0 if row is None else row.version,
        relpath,
        backups,
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
        return Backups(store, settings.backup.required, images=False).before(
            context, image_id, version, digest, reason
        )
    except NotFound:
        return "nothing held, nothing to back up"
    finally:
        store.close()


# -- history -----------------------------------------------------------------------------


def history(settings: Settings, image_id: str, as_json: bool) -> int:
    """Every version of one image ID: when, what, its content hash and features count,
    and whether its features backup and its image copy are kept."""
    seen = look(settings, image_id)
    if not seen.versions and not seen.backups:
        print(f"featsync: {image_id!r}: no history in the ledger (never synced)", file=sys.stderr)
        return EXIT_NOT_IN_STEP
    out: list[dict[str, Any]] = []
    for h in seen.versions:
        sent = h["action"] in _SENT
        out.append(
            {
                "version": h["version"],
                "at": h["at"],
                "action": h["action"],
                "hash": h["digest"],
                "features_count": h["features_count"],
                "backup": sent and h["version"] in seen.backups,
                "image_kept": sent and bool(h["digest"]) and h["digest"] in seen.images,
            }
        )
    known = {h["version"] for h in seen.versions if h["action"] in _SENT}
    # Backups of versions the ledger never sent: what the context held under this ID
    # before featsync's first add (an "already there"), or before a lost ledger.
    strays = [b.as_json() for v, b in sorted(seen.backups.items()) if v not in known]
    if as_json:
        doc = {"image_id": image_id, "versions": out, "other_backups": strays}
        print(json.dumps(doc, indent=2, ensure_ascii=False))
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
            f"backup of v{b['version']} taken {when(b['taken_at'])} before its {b['reason']}: "
            f"{b['features_count']} features the ledger had not sent"
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
        if version in seen.backups:
            store = BackupStore(settings.backup.path, read_only=True)
            try:
                feats = store.features(image_id, version)
            finally:
                store.close()
            if feats is not None:
                b = seen.backups[version]
                return feats, f"v{version}, backed up {when(b.taken_at)} before its {b.reason}"
        if not (version == seen.version and seen.state == State.SYNCED):
            kept = ", ".join(f"v{v}" for v in sorted(seen.backups)) or "none"
            raise NotFound(
                f"{image_id!r}: no features of version {version} are kept (backups kept: "
                f"{kept}; the context holds v{seen.version}"
                + ("" if seen.state == State.SYNCED else ", by the ledger, nothing")
                + ")"
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
    if from_v is None:
        seen = look(settings, image_id)
        older = [v for v in seen.backups if to_v is None or v < to_v]
        if not older:
            raise NotFound(f"{image_id!r}: no features backup to compare with is kept")
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
        share = same / len(rows_a) if rows_a else 1.0
    similarity = None
    if similar and rows_a is not None and rows_b is not None:
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


# -- restore -----------------------------------------------------------------------------


def restore(
    settings: Settings,
    image_id: str,
    version: int | None,
    to: str | None,
    dry_run: bool,
    force: bool,
) -> int:
    """Put the kept image file of `version` back (by default the version before the
    last change): the sync then sends it, backing up what it replaces."""
    seen = look(settings, image_id)
    sent = [h for h in seen.versions if h["action"] in _SENT and h["digest"]]
    if not sent:
        print(
            f"featsync: {image_id!r}: the ledger never sent it; nothing to restore", file=sys.stderr
        )
        return EXIT_NOT_IN_STEP
    if version is None:
        pick = _default_version(seen, sent)
    else:
        found = [h for h in sent if h["version"] == version]
        if found:
            pick = found[0]
        else:
            versions = ", ".join(f"v{h['version']}" for h in sent)
            print(
                f"featsync: {image_id!r} has no version {version} that was sent (sent: {versions})",
                file=sys.stderr,
            )
            return EXIT_NOT_IN_STEP
    v, digest = pick["version"], pick["digest"]
    if digest not in seen.images:
        features = ", ".join(f"v{n}" for n in sorted(seen.backups)) or "none"
        print(
            f"featsync: cannot restore {image_id!r} v{v}: no image copy of it is kept "
            f"([backup] images was off when it was sent, or its copy was pruned). Kept: "
            f"features backups of {features}"
            + (f" (`featsync features get {image_id} --version N`)" if seen.backups else "")
            + "; a file can only be restored from an image copy",
            file=sys.stderr,
        )
        return EXIT_NOT_IN_STEP
    target = _target(settings, seen, to)
    if target is None:
        print(
            f"featsync: the ledger does not know where {image_id!r}'s file was (it was "
            "synced before featsync kept paths); name the file with --to PATH",
            file=sys.stderr,
        )
        return EXIT_NOT_IN_STEP
    source = BackupStore(settings.backup.path, read_only=True).image_path(digest)
    existing = _digest_of(target)
    if existing == digest:
        print(f"{target} already holds {image_id} v{v}; nothing to do")
        return EXIT_OK
    if existing is not None and not force:
        print(
            f"featsync: {target} exists with other content (hash {existing[:16]}); not "
            "overwritten: add --force to replace it (the sync then backs up the features "
            "it replaces)",
            file=sys.stderr,
        )
        return EXIT_NOT_IN_STEP
    if dry_run:
        what = "replace" if existing is not None else "create"
        print(f"would {what} {target} with {image_id} v{v} (hash {digest[:16]})")
        return EXIT_OK
    _put(source, target, digest, replace=existing is not None)
    print(
        f"restored {image_id} v{v} (hash {digest[:16]}) to {target}; the next cycle sends "
        "it (a running daemon: within seconds; else `featsync reconcile`)"
    )
    return EXIT_OK


def _default_version(seen: Looked, sent: list[dict[str, Any]]) -> dict[str, Any]:
    """The newest sent version whose content is not what the ledger holds now: the one
    before an update, the last one before a delete."""
    current = next((h["digest"] for h in reversed(seen.versions)), None)
    if seen.state != State.DELETED:
        older = [h for h in sent if h["digest"] != current]
        if older:
            return older[-1]
    return sent[-1]


def _target(settings: Settings, seen: Looked, to: str | None) -> str | None:
    if to is not None:
        return os.path.abspath(to)
    if seen.relpath is None:
        return None
    return os.path.join(settings.sync.folder, seen.relpath)


def _digest_of(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def _put(source: str, target: str, digest: str, replace: bool) -> None:
    """Copy `source` to `target` whole or not at all: a hidden temporary file in the
    target's folder (the scan ignores it), checked against `digest`, then renamed (or,
    when nothing may be replaced, linked: a file that appeared meanwhile is kept)."""
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".featsync-restore-", suffix=".tmp", dir=folder)
    try:
        h = hashlib.sha256()
        with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != digest:
            raise NotFound(f"the kept copy {source} is damaged (its hash is not {digest[:16]})")
        os.chmod(tmp, 0o666 & ~_umask())
        if replace:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise NotFound(f"{target} appeared meanwhile; not overwritten") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
