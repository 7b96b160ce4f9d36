"""The backups' retention rules, applied after a cycle that changed something (for
the images it touched; for all of them at most once an hour) and by `featsync backup
prune`:

- at most `keep_versions` records per image ID, the newest by time;
- nothing kept of an image the ledger says was deleted more than `keep_deleted_days`
  ago (an ID the ledger does not know at all is no evidence: a lost ledger, a first
  cycle cut short, another configuration's backups; `backup prune --unknown` drops
  those, if their newest record is that old);
- beyond `max_size` bytes, the oldest records go first. The image copies of what the
  context holds now are not counted against it (they cannot be freed: each is the
  way back from the next change), only those kept for older versions;
- image copies that no kept record and no current version refers to go (a copy kept
  within the last hour stays: its send may be under way), and so do temporary files
  a crash left behind.

Every rule works in small transactions: workers of a running daemon write to the
same store, and must not wait long for it.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from featsync.backups import BackupStore

FULL_PRUNE_EVERY_S = 3600.0  # a cycle's own prune looks at every image at most this often
RECENT_COPY_S = 3600.0  # a copy this young is never pruned (its send may be under way)
_CHUNK = 200  # rows per transaction


@dataclass(slots=True)
class Pruned:
    """What one prune removed, by rule."""

    versions: int = 0  # beyond keep_versions of their image
    gone: int = 0  # of images deleted more than keep_deleted_days ago
    size: int = 0  # the oldest, while the backups were over max_size
    images: int = 0  # image copies nothing refers to
    temp_files: int = 0  # left by a crash while copying
    freed: int = 0  # bytes
    over_cap: int = 0  # bytes still over max_size after pruning all it may

    def any(self) -> bool:
        return bool(self.versions or self.gone or self.size or self.images or self.temp_files)


Gone = Callable[[Sequence[str], float], set[str]]  # IDs the ledger deleted before a time


def prune(
    store: BackupStore,
    keep_versions: int,
    keep_deleted_days: float,
    max_size: int,
    gone_before: Gone,
    current_digests: Callable[[], set[str]],
    now: float,
    touched: Sequence[str] | None = None,
) -> Pruned:
    """Apply the rules above; `touched`: only keep_versions, for these images."""
    out = Pruned()
    _versions(store, keep_versions, touched, out)
    if touched is not None:
        return out
    _gone(store, now - keep_deleted_days * 86400, gone_before, out)
    current = current_digests()
    _size(store, max_size, current, out)
    _images(store, current, now, out)
    _temp_files(store, now, out)
    with store.tx() as db:
        db.execute(
            "INSERT INTO meta VALUES ('full_prune_at', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(now),),
        )
    if out.any():
        # space back to the file system, where the file allows it
        with contextlib.suppress(Exception), store.tx() as db:
            db.execute("PRAGMA incremental_vacuum")
    return out


def full_prune_due(store: BackupStore, now: float) -> bool:
    with store.tx() as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'full_prune_at'").fetchone()
    return row is None or now - float(row[0]) >= FULL_PRUNE_EVERY_S


def _delete(store: BackupStore, ids: list[int]) -> None:
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        with store.tx() as db:
            db.execute(f"DELETE FROM backups WHERE id IN ({','.join('?' * len(chunk))})", chunk)  # noqa: S608


def _versions(store: BackupStore, keep: int, touched: Sequence[str] | None, out: Pruned) -> None:
    """Of each image (of `touched` only, if given), the records kept are the newest
    `keep` by time and, whatever their age, the first record of each of the `keep`
    newest labels (version and content hash): the one `lifecycle.match` takes for that
    version's backup, which a later record under the same label (a change by hand, a
    retried update that had landed) must not push out."""
    groups: list[list[str] | None] = [None]
    if touched is not None:
        ids = sorted(set(touched))
        groups = [ids[i : i + 500] for i in range(0, len(ids), 500)]
    victims: list[tuple[int, int]] = []
    for chunk in groups:
        where = "" if chunk is None else f" WHERE image_id IN ({','.join('?' * len(chunk))})"
        sql = (
            f"SELECT image_id, id, size, version, digest FROM backups{where} "  # noqa: S608
            "ORDER BY image_id, taken_at, id"
        )
        image: list[tuple[int, int, tuple[int, str]]] = []
        current = None
        for image_id, backup_id, size, version, digest in store.cursor(sql, chunk or []):
            if image_id != current:
                victims += _beyond(image, keep)
                image, current = [], image_id
            image.append((backup_id, size, (version, digest)))
        victims += _beyond(image, keep)
    _delete(store, [v[0] for v in victims])
    out.versions += len(victims)
    out.freed += sum(v[1] for v in victims)


def _beyond(records: list[tuple[int, int, tuple[int, str]]], keep: int) -> list[tuple[int, int]]:
    """The (id, size) of one image's records (oldest first) that the rule lets go."""
    first: dict[tuple[int, str], int] = {}
    for backup_id, _size, label in records:
        first.setdefault(label, backup_id)
    newest_labels = sorted(first.items(), key=lambda kv: kv[1])[-keep:]
    kept = {backup_id for _label, backup_id in newest_labels}
    kept.update(backup_id for backup_id, _size, _label in records[-keep:])
    return [(backup_id, size) for backup_id, size, _label in records if backup_id not in kept]


def _gone(store: BackupStore, cutoff: float, gone_before: Gone, out: Pruned) -> None:
    """Images the ledger says were deleted before `cutoff`."""
    stale = [
        r[0]
        for r in store.cursor(
            "SELECT image_id FROM backups GROUP BY image_id HAVING MAX(taken_at) < ?", [cutoff]
        )
    ]
    gone = sorted(gone_before(stale, cutoff)) if stale else []
    for start in range(0, len(gone), _CHUNK):
        chunk = gone[start : start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        with store.tx() as db:
            n, size = db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM backups WHERE image_id IN ({marks})",  # noqa: S608
                chunk,
            ).fetchone()
            db.execute(f"DELETE FROM backups WHERE image_id IN ({marks})", chunk)  # noqa: S608
        out.gone += n
        out.freed += size


def _size(store: BackupStore, max_size: int, current: set[str], out: Pruned) -> None:
    """The oldest records, until the records and the copies only they keep fit."""
    with store.tx() as db:
        (records,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM backups").fetchone()
    copies = {
        digest: size
        for digest, size in store.cursor("SELECT digest, size FROM kept_images")
        if digest not in current
    }
    over = records + sum(copies.values()) - max_size
    if over <= 0:
        return
    victims: list[int] = []
    taken: Counter[str] = Counter()  # victims' image copies, by how many victims hold them
    freed = records_freed = 0
    for backup_id, size, digest in store.cursor(
        "SELECT id, size, digest FROM backups ORDER BY taken_at, id"
    ):
        if freed >= over:
            break
        victims.append(backup_id)
        freed += size
        records_freed += size
        if digest in copies:
            taken[digest] += 1
            with store.tx() as db:
                (refs,) = db.execute(
                    "SELECT COUNT(*) FROM backups WHERE digest = ?", (digest,)
                ).fetchone()
            if refs == taken[digest]:  # its last record goes: the copy goes with it
                freed += copies.pop(digest)
    _delete(store, victims)
    out.size += len(victims)
    out.freed += records_freed  # the copies freed are counted by _images, which removes them
    out.over_cap = max(0, over - freed)


def _images(store: BackupStore, current: set[str], now: float, out: Pruned) -> None:
    """Copies nothing refers to. Each goes with its note in one transaction, which a
    worker's keep_image (it notes first) waits for: it then makes the copy anew."""
    referenced = {r[0] for r in store.cursor("SELECT DISTINCT digest FROM backups")}
    old = now - RECENT_COPY_S
    candidates = [
        (digest, size)
        for digest, size, kept_at in store.cursor("SELECT digest, size, kept_at FROM kept_images")
        if kept_at < old and digest not in referenced and digest not in current
    ]
    for start in range(0, len(candidates), _CHUNK):
        with store.tx() as db:
            for digest, size in candidates[start : start + _CHUNK]:
                done = db.execute(
                    "DELETE FROM kept_images WHERE digest = ? AND kept_at < ?", (digest, old)
                )
                if done.rowcount:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(store.image_path(digest))
                    out.images += 1
                    out.freed += size


def _temp_files(store: BackupStore, now: float, out: Pruned) -> None:
    """Half copies a crash left (``<digest>.<pid>.<thread>.tmp``), an hour old or more."""
    try:
        shards = os.scandir(store.images_dir)
    except FileNotFoundError:
        return
    with shards:
        for shard in shards:
            if not shard.is_dir(follow_symlinks=False):
                continue
            with os.scandir(shard.path) as entries:
                for e in entries:
                    if not e.name.endswith(".tmp"):
                        continue
                    with contextlib.suppress(OSError):
                        st = e.stat(follow_symlinks=False)
                        if now - st.st_mtime >= RECENT_COPY_S:
                            os.unlink(e.path)
                            out.temp_files += 1
                            out.freed += st.st_size


def log_pruned(log: Any, pruned: Pruned, max_size: int) -> None:
    if pruned.any():
        log.info(
            "backups_pruned",
            versions=pruned.versions,
            gone=pruned.gone,
            over_size=pruned.size,
            image_copies=pruned.images,
            temp_files=pruned.temp_files,
            freed_bytes=pruned.freed,
        )
    if pruned.over_cap:
        log.warning(
            "backups_over_size",
            over_bytes=pruned.over_cap,
            max_size=max_size,
            reason="every backup that may go went; the image copies kept within the last "
            "hour are still over [backup] max_size",
        )
