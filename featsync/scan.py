"""The scanner: walk the folder, quick-check each file against the ledger, hash only
the candidates, and say plainly what it could not see.

A file whose (size, mtime_ns, inode) equal its ledger row is not read. A file that
changes while it is being hashed is *unsettled*: left alone this round. A name that
cannot be decoded, an unreadable file or folder is logged and makes the scan
incomplete — and an incomplete scan never leads to a delete (see plan.doubt).
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
import stat
import time
import unicodedata
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from stat import S_ISREG

from featsync.model import LocalFile, QuickKey, RootState, Snapshot

# A file modified this recently may change again within the same mtime tick without
# its stat changing (git's "racy clean" problem); its mtime is recorded as 0 so the
# next scan reads it again instead of trusting the stat.
RACY_WINDOW_NS = 2_000_000_000
_CHUNK = 1 << 20
# Inode numbers are unsigned 64-bit; some file systems (FUSE, NFS, overlay) hand out
# ones above 2**63, which a signed 64-bit database column cannot hold. They are stored
# as the signed number with the same bits: one-to-one, so equality still means equality.
_INT64_MAX = (1 << 63) - 1


def signed_inode(ino: int) -> int:
    return ino - (1 << 64) if ino > _INT64_MAX else ino


Problem = Callable[..., None]  # a structlog-style logger method: (event, **fields)


@dataclass(frozen=True, slots=True)
class ScanRules:
    root: str
    extensions: frozenset[str]  # lower case, without the dot
    ignore: tuple[str, ...]  # glob patterns matched against each name in a path
    id_prefix: str = ""
    follow_symlinks: bool = False
    marker: str = ""
    max_file_size: int | None = None  # bigger files are not read (apply rejects them)


def image_id_for(relpath: str, prefix: str = "") -> str:
    """The image ID of a path relative to the root: POSIX separators, Unicode NFC."""
    if os.sep != "/":
        relpath = relpath.replace(os.sep, "/")
    if not relpath.isascii():
        relpath = unicodedata.normalize("NFC", relpath)
    return prefix + relpath


def _glob_alternatives(patterns: tuple[str, ...]) -> str:
    return "|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)


def ignore_regex(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One compiled regex for all ignore globs (fnmatch per name per pattern is slow)."""
    if not patterns:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile(_glob_alternatives(patterns))


def wanted_regex(extensions: frozenset[str], ignore: tuple[str, ...]) -> re.Pattern[str]:
    """Matches the names of files to sync: not ignored, with one of the extensions.

    One regex call per file instead of an ignore check plus an extension check: this
    runs once per file on every rescan.
    """
    exts = "|".join(sorted(re.escape(e) for e in extensions)) or "(?!)"
    not_ignored = f"(?!{_glob_alternatives(ignore)})" if ignore else ""
    return re.compile(rf"{not_ignored}.*\.(?i:{exts})\Z", re.DOTALL)


def scope_parents(
    paths: Iterable[str], ignored: Callable[[str], object]
) -> dict[str, frozenset[str]] | None:
    """Group the paths of a targeted scan by their parent folder ("" for the root, else
    ending in "/"), leaving out paths inside ignored folders; None if a path is the
    root itself (then only a full scan will do)."""
    parents: dict[str, set[str]] = {}
    wanted = {p.strip("/") for p in paths}
    if wanted & {"", "."}:
        return None
    for path in wanted:
        parent, _, name = path.rpartition("/")
        # a path inside another scoped folder is seen with it (and only once)
        parts = parent.split("/") if parent else []
        if any("/".join(parts[: i + 1]) in wanted for i in range(len(parts))):
            continue
        if parent and any(ignored(part) is not None for part in parent.split("/")):
            continue
        parents.setdefault(parent + "/" if parent else "", set()).add(name)
    return {parent: frozenset(names) for parent, names in parents.items()}


def stat_key(st: os.stat_result, racy_cutoff_ns: int) -> tuple[int, int, int]:
    """(size, mtime_ns, inode) as the ledger records them; mtime 0 marks a racy file."""
    mtime = st.st_mtime_ns if st.st_mtime_ns < racy_cutoff_ns else 0
    return st.st_size, mtime, signed_inode(st.st_ino)


class Changed(Exception):
    """The file at the path is not the one the scan saw: gone, replaced by another file,
    a symbolic link, a FIFO or a device. The next scan judges it afresh."""


_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def open_checked(
    path: str,
    follow_symlinks: bool,
    inode: int,
    size: int,
    mtime_ns: int,
    device: int = 0,
) -> tuple[int, os.stat_result]:
    """Open a file the scan saw, without trusting the path a second time.

    O_NONBLOCK, so a FIFO swapped in cannot hang the open; O_NOFOLLOW unless symlinks
    are followed, so a symlink swapped in cannot lead outside the folder; then fstat
    the descriptor: a regular file, with the inode, size (and mtime and device, when
    given: 0 means unknown) the scan saw, or Changed. Read only from the descriptor.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise Changed("it vanished since the scan") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise Changed("it is a symbolic link now") from None
        if exc.errno == errno.ENXIO:  # a unix socket (or a device without its driver)
            raise Changed("it is not a regular file now") from None
        raise
    try:
        st = os.fstat(fd)
        kind = stat.S_IFMT(st.st_mode)
        if kind != stat.S_IFREG:
            raise Changed(f"it is {_KINDS.get(kind, 'not a regular file')} now")
        if signed_inode(st.st_ino) != inode or (device and st.st_dev != device):
            raise Changed("another file took its name since the scan")
        if st.st_size != size or (mtime_ns and st.st_mtime_ns != mtime_ns):
            raise Changed("it changed since the scan")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


# OS errors that say the machine is short of something, not that the file is bad.
SHORT_OF = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.ENOSPC})


def digest_of(fd: int) -> str:
    """SHA-256 of an open file from its start, read in chunks (memory stays flat)."""
    os.lseek(fd, 0, os.SEEK_SET)
    with open(fd, "rb", buffering=0, closefd=False) as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def still_same(fd: int, seen: os.stat_result) -> bool:
    """Whether the open file is as `seen` said: size, mtime and ctime (a writer that
    puts the mtime back, as `cp -p` or `touch -r` do, still moves the ctime)."""
    now = os.fstat(fd)
    return (now.st_size, now.st_mtime_ns, now.st_ctime_ns) == (
        seen.st_size,
        seen.st_mtime_ns,
        seen.st_ctime_ns,
    )


def hash_open(fd: int, seen: os.stat_result) -> str | None:
    """SHA-256 of the open file, or None if it changed while it was read."""
    digest = digest_of(fd)
    return digest if still_same(fd, seen) else None


def unhashed(st: os.stat_result) -> str:
    """What stands for the digest of a file too big to read: it changes with the stat."""
    return f"unhashed:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def hash_settled(path: str, seen: os.stat_result, follow_symlinks: bool = False) -> str | None:
    """SHA-256 of the file, or None if it is not what `seen` described any more."""
    try:
        fd, st = open_checked(
            path, follow_symlinks, signed_inode(seen.st_ino), seen.st_size, seen.st_mtime_ns
        )
    except Changed:
        return None
    try:
        return hash_open(fd, st)
    finally:
        os.close(fd)


def scan(
    rules: ScanRules,
    known: Container[QuickKey],
    problem: Problem,
    now_ns: int | None = None,
    scope: Iterable[str] | None = None,
    tick: Callable[[], None] | None = None,
    hold: Callable[[str], bool] | None = None,
) -> Snapshot:
    """Walk `rules.root` and return what is there, hashing only what may have changed.

    `known` holds the quick-check keys of the ledger's synced images (Ledger.quick_keys):
    a file whose (image ID, size, mtime_ns, inode) is among them is listed in
    ``Snapshot.unchanged`` without being read; every other file is hashed.

    With a `scope` (paths relative to the root, "/"-separated, as the OS names them),
    only those files and folders (each with all below it) are looked at: a targeted
    scan after watch events. A scoped path that is gone is simply not in the snapshot.
    `tick` is called for every folder listed and every file hashed (the daemon's
    sign of progress; it may raise to abandon the scan). A file for which `hold` says
    true (the daemon: it had an event within the quiet period) is left unsettled.
    """
    root = rules.root
    try:
        root_st = os.stat(root)
    except FileNotFoundError:
        return Snapshot(root, RootState.MISSING, None, False, {})
    except OSError as exc:
        problem("scan_problem", path=root, error=f"cannot stat folder: {exc.strerror}")
        return Snapshot(root, RootState.MISSING, None, False, {})
    if not stat.S_ISDIR(root_st.st_mode):
        return Snapshot(root, RootState.NOT_A_DIRECTORY, root_st.st_dev, False, {})
    marker_present = bool(rules.marker) and os.path.exists(os.path.join(root, rules.marker))

    racy_cutoff = (now_ns if now_ns is not None else time.time_ns()) - RACY_WINDOW_NS
    ignored_dir = ignore_regex(rules.ignore).match
    wanted = wanted_regex(rules.extensions, rules.ignore).match
    posix = os.sep == "/"
    prefix = rules.id_prefix
    follow = rules.follow_symlinks
    too_big = rules.max_file_size
    unchanged: list[str] = []
    files: dict[str, LocalFile] = {}
    relpaths: dict[str, str] = {}  # image ID -> path, for files that are not unchanged
    unsettled: set[str] = set()
    unreadable: dict[str, str] = {}
    problems: list[str] = []
    visited = {(root_st.st_dev, root_st.st_ino)}

    def fail(path: str, why: str) -> None:
        problems.append(f"{path}: {why}")
        problem("scan_problem", path=path, error=why)

    def decodable(path: str, name: str) -> bool:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raw = os.fsencode(name)
            fail(os.path.join(path, repr(raw)[2:-1]), "name is not valid UTF-8; rename it")
            return False
        return True

    def first_visit(entry: os.DirEntry[str]) -> bool:
        """False for a symlink loop or a second way into one folder."""
        st = entry.stat()
        key = (st.st_dev, st.st_ino)
        if key in visited:
            return False
        visited.add(key)
        return True

    # (path relative to the root, path, only these names or None for all)
    stack: list[tuple[str, str, frozenset[str] | None]] = [("", root, None)]
    parents = None if scope is None else scope_parents(scope, ignored_dir)
    if parents is not None:
        stack = [(rel, os.path.join(root, rel), names) for rel, names in parents.items()]
    while stack:
        rel, path, only = stack.pop()
        if tick is not None:
            tick()
        # IDs of ASCII names in here are base + name (no normalising needed)
        base = prefix + rel if posix and rel.isascii() else None
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as exc:
            gone = isinstance(exc, FileNotFoundError | NotADirectoryError)
            if not (gone and only is not None):  # a scoped path's folder gone: so are they
                fail(path, f"cannot list folder: {exc.strerror or exc}")
            continue
        if only is not None:
            entries = [e for e in entries if e.name in only]
        # This loop runs once per file on every rescan, so it is kept flat: an
        # unchanged file costs one regex match, one stat and one set lookup.
        for entry in entries:
            name = entry.name
            try:
                if entry.is_dir(follow_symlinks=follow):
                    if (
                        ignored_dir(name) is None
                        and (name.isascii() or decodable(path, name))
                        and (not follow or first_visit(entry))
                    ):
                        stack.append((rel + name + "/", entry.path, None))
                    continue
                if wanted(name) is None:
                    continue
                if base is not None and name.isascii():
                    image_id = base + name
                elif decodable(path, name):
                    image_id = image_id_for(rel + name, prefix)
                else:
                    continue
                st = entry.stat(follow_symlinks=follow)
            except OSError as exc:
                fail(entry.path, f"cannot stat: {exc.strerror or exc}")
                continue
            # A key in `known` is that of a regular file when it was synced; the same
            # inode with the same size and mtime cannot be anything else now.
            ino = st.st_ino
            if ino > _INT64_MAX:
                ino -= 1 << 64  # as signed_inode(), inline: this runs once per file
            if (image_id, st.st_size, st.st_mtime_ns, ino) in known:
                unchanged.append(image_id)
                continue
            if not S_ISREG(st.st_mode):
                continue  # a symlink we do not follow, a socket, a fifo
            relpath = rel + name
            if image_id in relpaths:
                fail(entry.path, f"same image ID {image_id!r} as {relpaths[image_id]!r}")
                continue
            relpaths[image_id] = relpath
            if hold is not None and hold(relpath):
                unsettled.add(image_id)  # still being written, by the watcher's account
                continue
            if tick is not None:
                tick()
            if too_big is not None and st.st_size > too_big:
                digest: str | None = unhashed(st)  # never read; apply says why
            else:
                try:
                    digest = hash_settled(entry.path, st, follow)
                except OSError as exc:
                    why = f"cannot read: {exc.strerror or exc}"
                    unreadable[image_id] = why
                    fail(entry.path, why)
                    continue
            if digest is None:
                unsettled.add(image_id)
                problem("file_unsettled", image_id=image_id)
                continue
            mtime = st.st_mtime_ns if st.st_mtime_ns < racy_cutoff else 0
            files[image_id] = LocalFile(
                image_id, relpath, st.st_size, mtime, ino, digest, st.st_dev
            )

    same = frozenset(unchanged)
    # Two names with one image ID (NFC and NFD spellings of one name), one of them
    # unchanged: keep that one, report the other. (Rare, so looked for once here
    # rather than with a dict insert per unchanged file.)
    for image_id in same.intersection(relpaths):
        fail(
            os.path.join(root, relpaths[image_id]),
            f"same image ID {image_id!r} as another name in the folder",
        )
        files.pop(image_id, None)
        unsettled.discard(image_id)
        unreadable.pop(image_id, None)
    return Snapshot(
        root=root,
        root_state=RootState.OK,
        device=root_st.st_dev,
        marker_present=marker_present,
        files=files,
        unchanged=same,
        unsettled=frozenset(unsettled),
        unreadable=unreadable,
        unreadable_paths={i: relpaths[i] for i in unreadable},
        problems=tuple(problems),
    )
