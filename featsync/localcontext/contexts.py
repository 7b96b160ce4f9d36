"""What `featsync serve` keeps: the tokens it handed out, the search contexts in its data
folder (one ``<id>.search`` LocalContext file each, opened on first use, so they
survive a restart) and the storage of images saved by the ``/image`` operations.
Errors are ``ApiError``s carrying the HTTP status and the Aspose error code.

A storage name is checked before anything is written: each path component at most 255
bytes as UTF-8 (what file systems allow), no file where the name needs a folder and no
folder where it needs a file. An image is written to a staging file first and moved
into storage only once its features are stored, so a refusal leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
import time
import uuid

from featsync.localcontext.context import LocalContext
from featsync.localcontext.extractor import Extractor, default_workers

_CONTEXT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_NAME_BYTES = 255  # one path component, as UTF-8
MAX_PATH_BYTES = 4000  # the whole storage path, under PATH_MAX (4096)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Tokens:
    """Bearer tokens handed out by the token endpoint, each with its expiry."""

    def __init__(self, lifetime_s: float) -> None:
        self.lifetime_s = lifetime_s
        self._lock = threading.Lock()
        self._expiry: dict[str, float] = {}

    def issue(self) -> str:
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._expiry = {t: e for t, e in self._expiry.items() if e > now}  # forget old ones
            self._expiry[token] = now + self.lifetime_s
        return token

    def valid(self, token: str) -> bool:
        with self._lock:
            expiry = self._expiry.get(token)
        return expiry is not None and time.monotonic() < expiry

    def authorizes(self, header: str) -> bool:
        """Whether an ``Authorization`` header carries a valid bearer token."""
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and self.valid(token.strip())


class Contexts:
    """The search contexts in the data folder, opened on first use. They share one
    feature extractor (its worker processes), which closes with them."""

    def __init__(self, data_dir: str, extractor: Extractor | None = None) -> None:
        self.extractor = extractor or Extractor(default_workers(4))
        self.data_dir = data_dir
        self.storage_dir = os.path.join(data_dir, "storage")
        self.staging_dir = os.path.join(data_dir, "staging")  # same file system: atomic moves
        os.makedirs(self.storage_dir, exist_ok=True)
        os.makedirs(self.staging_dir, exist_ok=True)
        for left in os.listdir(self.staging_dir):  # what a crash left behind
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.staging_dir, left))
        self._storage_lock = threading.Lock()
        self._lock = threading.Lock()
        self._open: dict[str, LocalContext] = {}

    def _path(self, context_id: str) -> str:
        if not _CONTEXT_ID.fullmatch(context_id):
            raise ApiError(404, "ContextNotFound", f"search context {context_id!r} not found")
        return os.path.join(self.data_dir, f"{context_id}.search")

    def create(self) -> str:
        context_id = str(uuid.uuid4())
        with self._lock:
            self._open[context_id] = self._context(self._path(context_id))
        return context_id

    def get(self, context_id: str) -> LocalContext:
        path = self._path(context_id)
        with self._lock:
            ctx = self._open.get(context_id)
            if ctx is None:
                if not os.path.exists(path):
                    raise ApiError(
                        404, "ContextNotFound", f"search context {context_id!r} not found"
                    )
                ctx = self._open[context_id] = self._context(path)
            return ctx

    def delete(self, context_id: str) -> None:
        path = self._path(context_id)
        with self._lock:
            ctx = self._open.pop(context_id, None)
            if ctx is not None:
                ctx.close()
            if not os.path.exists(path):
                raise ApiError(404, "ContextNotFound", f"search context {context_id!r} not found")
            for suffix in ("", "-wal", "-shm", ".index"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
            folder, base = os.path.split(path)
            for left in os.listdir(folder):  # a save killed in the middle left these
                if left.startswith(base + ".index.tmp-"):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, left))

    def _context(self, path: str) -> LocalContext:
        return LocalContext(path, self.extractor)

    def close(self) -> None:
        with self._lock:
            for ctx in self._open.values():
                ctx.close()
            self._open.clear()
        self.extractor.close()

    # -- storage (images saved by the /image operations, read by imageId) -------------

    def storage_path(self, name: str) -> str:
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts or ".." in parts or "\0" in name:
            raise ApiError(400, "BadRequest", f"not a storage path: {name[:80]!r}")
        for part in parts:
            if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"storage path {name[:80]!r} has a name longer than "
                    f"{MAX_NAME_BYTES} bytes (as UTF-8)",
                )
        path = os.path.join(self.storage_dir, *parts)
        if len(os.fsencode(path)) > MAX_PATH_BYTES:
            raise ApiError(400, "BadRequest", f"storage path {name[:80]!r} is too long")
        return path

    def read_storage(self, name: str) -> bytes:
        try:
            with open(self.storage_path(name), "rb") as fh:
                return fh.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ApiError(404, "FileNotFound", f"file {name!r} not found in storage") from None

    def _clash(self, name: str) -> str | None:
        """Why `name` cannot be stored as a file, or None."""
        path = self.storage_path(name)
        rel = os.path.relpath(path, self.storage_dir).split(os.sep)
        for n in range(1, len(rel)):
            folder = os.path.join(self.storage_dir, *rel[:n])
            if os.path.lexists(folder) and not os.path.isdir(folder):
                return f"{'/'.join(rel[:n])!r} is a file in storage, not a folder"
        if os.path.isdir(path):
            return f"{'/'.join(rel)!r} is a folder in storage"
        return None

    def stage(self, name: str, data: bytes) -> Staged:
        """Check that `name` can be stored, and write `data` to a staging file for it."""
        why = self._clash(name)
        if why is not None:
            raise ApiError(400, "BadRequest", f"cannot store {name!r} in storage: {why}")
        part = os.path.join(self.staging_dir, f"{uuid.uuid4().hex}.part")
        try:
            with open(part, "wb") as fh:
                fh.write(data)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(part)
            raise
        return Staged(self, name, part)

    def _commit(self, staged: Staged) -> None:
        with self._storage_lock:  # the check and the move, as one step
            why = self._clash(staged.name)
            if why is not None:
                raise ApiError(400, "BadRequest", f"cannot store {staged.name!r} in storage: {why}")
            path = self.storage_path(staged.name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(staged.part, path)

    def delete_storage(self, name: str) -> None:
        try:
            os.remove(self.storage_path(name))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ApiError(404, "FileNotFound", f"file {name!r} not found in storage") from None

    def storage_folder(self, name: str) -> list[str]:
        folder = self.storage_path(name)
        if not os.path.isdir(folder):
            raise ApiError(404, "FileNotFound", f"folder {name!r} not found in storage")
        base = name.strip("/")
        return [
            f"{base}/{n}"
            for n in sorted(os.listdir(folder))
            if not n.endswith(".part") and os.path.isfile(os.path.join(folder, n))
        ]


class Staged:
    """An image written to the staging folder, on its way into storage under `name`."""

    def __init__(self, contexts: Contexts, name: str, part: str) -> None:
        self._contexts, self.name, self.part = contexts, name, part
        self.done = False

    def commit(self) -> None:
        """Move it into storage (400 if a clash appeared meanwhile)."""
        self._contexts._commit(self)
        self.done = True

    def discard(self) -> None:
        """Remove the staging file unless it was committed; safe to call twice."""
        if not self.done:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.part)
            self.done = True
