"""`featsync restore`: put the kept image file of a version back into the folder; the
ordinary sync then sends it (backing up what it replaces). It writes that one file and
nothing else, and never over a different file without --force, nor over anything that
is not a regular file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import sys
import tempfile
from typing import Any

from featsync.config import Settings
from featsync.errors import NotFound
from featsync.lifecycle import SENT, Looked, look
from featsync.looks import EXIT_NOT_IN_STEP, EXIT_OK
from featsync.model import State
from featsync.wholefile import mode_for


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
    sent = [h for h in seen.versions if h["action"] in SENT and h["digest"]]
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
    source = os.path.join(settings.backup.path, "images", digest[:2], digest)
    try:
        existing = _digest_of(target)
    except NotFound as exc:
        print(f"featsync: {exc}", file=sys.stderr)
        return EXIT_NOT_IN_STEP
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
    root = os.path.realpath(settings.sync.folder)
    parent = os.path.realpath(os.path.dirname(target))
    inside = parent == root or parent.startswith(os.path.join(root, ""))
    then = (
        "the next cycle sends it (a running daemon: within seconds; else `featsync reconcile`)"
        if inside
        else f"it is outside [sync] folder ({settings.sync.folder}), so the sync will not send it"
    )
    if dry_run:
        what = "replace" if existing is not None else "create"
        print(f"would {what} {target} with {image_id} v{v} (hash {digest[:16]}); {then}")
        return EXIT_OK
    try:
        _put(source, target, digest, replace=existing is not None)
    except (NotFound, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"featsync: cannot restore to {target}: {why}", file=sys.stderr)
        return EXIT_NOT_IN_STEP
    print(f"restored {image_id} v{v} (hash {digest[:16]}) to {target}; {then}")
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
    folder = os.path.abspath(settings.sync.folder)
    path = os.path.normpath(os.path.join(folder, seen.relpath))
    if not path.startswith(os.path.join(folder, "")):
        return None  # a path from the ledger that leads out of the folder: not followed
    return path


_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFLNK: "a symbolic link",
}


def _digest_of(path: str) -> str | None:
    """The SHA-256 of the regular file at `path`; None if there is nothing there.
    Anything else (a directory, a FIFO, a symbolic link) is refused, never opened."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NotFound(f"{path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise NotFound(f"{path} is {kind}; not restored over it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise NotFound(f"{path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _put(source: str, target: str, digest: str, replace: bool) -> None:
    """Copy `source` to `target` whole or not at all: a hidden temporary file in the
    target's folder (the scan ignores it), checked against `digest`, then renamed (or,
    when nothing may be replaced, linked: a file that appeared meanwhile is kept).
    A replaced file's mode is kept; a new file gets the umask's."""
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    mode = mode_for(target, keep=replace)
    fd, tmp = tempfile.mkstemp(prefix=".featsync-restore-", suffix=".tmp", dir=folder)
    try:
        h = hashlib.sha256()
        with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        if h.hexdigest() != digest:
            raise NotFound(f"the kept copy {source} is damaged (its hash is not {digest[:16]})")
        if replace:
            os.replace(tmp, target)
        else:
            _create(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _create(tmp: str, target: str) -> None:
    """`tmp` becomes `target`, which must not exist: a hard link where the file system
    has them (atomic: a file that appeared meanwhile is never replaced), else a rename
    after one more look."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise NotFound(f"{target} appeared meanwhile; not overwritten") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(target):
            raise NotFound(f"{target} appeared meanwhile; not overwritten") from None
        os.rename(tmp, target)
