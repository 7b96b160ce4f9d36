"""What `featsync serve` keeps: the tokens it handed out, the search contexts in its data
folder (one ``<id>.search`` LocalContext file each, opened on first use, so they
survive a restart) and the storage of images saved by the ``/image`` operations.
Errors are ``ApiError``s carrying the HTTP status and the Aspose error code."""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
import uuid

from featsync.localcontext.context import LocalContext

_CONTEXT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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


class Contexts:
    """The search contexts in the data folder, opened on first use."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.storage_dir = os.path.join(data_dir, "storage")
        os.makedirs(self.storage_dir, exist_ok=True)
        self._lock = threading.Lock()
        self._open: dict[str, LocalContext] = {}

    def _path(self, context_id: str) -> str:
        if not _CONTEXT_ID.fullmatch(context_id):
            raise ApiError(404, "ContextNotFound", f"search context {context_id!r} not found")
        return os.path.join(self.data_dir, f"{context_id}.search")

    def create(self) -> str:
        context_id = str(uuid.uuid4())
        with self._lock:
            self._open[context_id] = LocalContext(self._path(context_id))
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
                ctx = self._open[context_id] = LocalContext(path)
            return ctx

    def delete(self, context_id: str) -> None:
        path = self._path(context_id)
        with self._lock:
            ctx = self._open.pop(context_id, None)
            if ctx is not None:
                ctx.close()
            if not os.path.exists(path):
                raise ApiError(404, "ContextNotFound", f"search context {context_id!r} not found")
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)

    def close(self) -> None:
        with self._lock:
            for ctx in self._open.values():
                ctx.close()
            self._open.clear()

    # -- storage (images saved by the /image operations, read by imageId) -------------

    def storage_path(self, name: str) -> str:
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise ApiError(400, "BadRequest", f"not a storage path: {name!r}")
        return os.path.join(self.storage_dir, *parts)

    def read_storage(self, name: str) -> bytes:
        try:
            with open(self.storage_path(name), "rb") as fh:
                return fh.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ApiError(404, "FileNotFound", f"file {name!r} not found in storage") from None

    def write_storage(self, name: str, data: bytes) -> None:
        path = self.storage_path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    def delete_storage(self, name: str) -> None:
        try:
            os.remove(self.storage_path(name))
        except FileNotFoundError:
            raise ApiError(404, "FileNotFound", f"file {name!r} not found in storage") from None

    def storage_folder(self, name: str) -> list[str]:
        folder = self.storage_path(name)
        if not os.path.isdir(folder):
            raise ApiError(404, "FileNotFound", f"folder {name!r} not found in storage")
        base = name.strip("/")
        return [f"{base}/{n}" for n in sorted(os.listdir(folder)) if not n.endswith(".part")]
