"""The scanner: walk the folder, quick-check each file against the ledger, hash only
the candidates, and say plainly what it could not see.

A file whose (size, mtime_ns, inode) equal its ledger row is not read. A file that
changes while it is being hashed is *unsettled*: left alone this round. A name that
cannot be decoded, an unreadable file or folder is logged and makes the scan
incomplete — and an incomplete scan never leads to a delete (see plan.doubt).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import stat
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from featsync.model import LedgerRow, LocalFile, RootState, Snapshot, State

# A file modified this recently may change again within the same mtime tick without
# its stat changing (git's "racy clean" problem); its mtime is recorded as 0 so the
# next scan reads it again instead of trusting the stat.
RACY_WINDOW_NS = 2_000_000_000
_CHUNK = 1 << 20

Problem = Callable[..., None]  # a structlog-style logger method: (event, **fields)


@dataclass(frozen=True, slots=True)
class ScanRules:
    root: str
    extensions: frozenset[str]  # lower case, without the dot
    ignore: tuple[str, ...]  # glob patterns matched against each name in a path
    id_prefix: str = ""
    follow_symlinks: bool = False
    marker: str = ""


def image_id_for(relpath: str, prefix: str = "") -> str:
    """The image ID of a path relative to the root: POSIX separators, Unicode NFC."""
    if os.sep != "/":
        relpath = relpath.replace(os.sep, "/")
    if not relpath.isascii():
        relpath = unicodedata.normalize("NFC", relpath)
    return prefix + relpath


def ignore_matcher(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """One compiled regex for all ignore globs (fnmatch per name per pattern is slow)."""
    if not patterns:
        return lambda name: False
    rx = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda name: rx.match(name) is not None


def stat_key(st: os.stat_result, racy_cutoff_ns: int) -> tuple[int, int, int]:
    """(size, mtime_ns, inode) as the ledger records them; mtime 0 marks a racy file."""
    mtime = st.st_mtime_ns if st.st_mtime_ns < racy_cutoff_ns else 0
    return st.st_size, mtime, st.st_ino


class Unsettled(Exception):
    """The file changed while it was being read."""


def read_settled(path: str) -> tuple[bytes, os.stat_result]:
    """Read a whole file, making sure it did not change meanwhile."""
    with open(path, "rb") as fh:
        before = os.fstat(fh.fileno())
        data = fh.read()
        after = os.fstat(fh.fileno())
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(
        data
    ) != after.st_size:
        raise Unsettled(path)
    return data, after


def hash_settled(path: str, seen: os.stat_result) -> str | None:
    """SHA-256 of the file, or None if it is not what `seen` described any more."""
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
        after = os.fstat(fh.fileno())
    if (seen.st_size, seen.st_mtime_ns, seen.st_ino) != (
        after.st_size,
        after.st_mtime_ns,
        after.st_ino,
    ):
        return None
    return digest


def scan(
    rules: ScanRules,
    known: Mapping[str, LedgerRow],
    problem: Problem,
    now_ns: int | None = None,
) -> Snapshot:
    """Walk `rules.root` and return what is there, hashing only what may have changed."""
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
    ignored = ignore_matcher(rules.ignore)
    exts = rules.extensions
    prefix = rules.id_prefix
    follow = rules.follow_symlinks
    files: dict[str, LocalFile] = {}
    relpaths: dict[str, str] = {}
    unsettled: set[str] = set()
    unreadable: dict[str, str] = {}
    problems: list[str] = []
    visited = {(root_st.st_dev, root_st.st_ino)}
    deleted = State.DELETED

    def fail(path: str, why: str) -> None:
        problems.append(f"{path}: {why}")
        problem("scan_problem", path=path, error=why)

    stack: list[tuple[str, str]] = [("", root)]
    while stack:
        rel, path = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as exc:
            fail(path, f"cannot list folder: {exc.strerror or exc}")
            continue
        for entry in entries:
            name = entry.name
            if ignored(name):
                continue
            if not name.isascii():
                try:
                    name.encode("utf-8")
                except UnicodeEncodeError:
                    raw = os.fsencode(name)
                    fail(os.path.join(path, repr(raw)[2:-1]), "name is not valid UTF-8; rename it")
                    continue
            try:
                if entry.is_dir(follow_symlinks=follow):
                    if follow:
                        dst = entry.stat()
                        key = (dst.st_dev, dst.st_ino)
                        if key in visited:
                            continue  # a symlink loop or a second way into one folder
                        visited.add(key)
                    stack.append((rel + name + "/", entry.path))
                    continue
                dot = name.rfind(".")
                if dot < 0 or name[dot + 1 :].lower() not in exts:
                    continue
                if not entry.is_file(follow_symlinks=follow):
                    continue  # a symlink we do not follow, a socket, a fifo
                st = entry.stat(follow_symlinks=follow)
            except OSError as exc:
                fail(entry.path, f"cannot stat: {exc.strerror or exc}")
                continue
            relpath = rel + name
            image_id = image_id_for(relpath, prefix)
            if image_id in relpaths:
                fail(entry.path, f"same image ID {image_id!r} as {relpaths[image_id]!r}")
                continue
            relpaths[image_id] = relpath
            size, mtime, ino = st.st_size, st.st_mtime_ns, st.st_ino
            if mtime >= racy_cutoff:
                mtime = 0
            row = known.get(image_id)
            if (
                row is not None
                and row.mtime_ns == mtime
                and row.size == size
                and row.inode == ino
                and mtime != 0
                and row.state != deleted
            ):
                files[image_id] = LocalFile(image_id, relpath, size, mtime, ino, None)
                continue
            try:
                digest = hash_settled(entry.path, st)
            except OSError as exc:
                why = f"cannot read: {exc.strerror or exc}"
                unreadable[image_id] = why
                fail(entry.path, why)
                continue
            if digest is None:
                unsettled.add(image_id)
                problem("file_unsettled", image_id=image_id)
                continue
            files[image_id] = LocalFile(image_id, relpath, size, mtime, ino, digest)
    return Snapshot(
        root=root,
        root_state=RootState.OK,
        device=root_st.st_dev,
        marker_present=marker_present,
        files=files,
        unsettled=frozenset(unsettled),
        unreadable=unreadable,
        problems=tuple(problems),
    )
