"""A feature-extraction worker process, and the framing it speaks with the pool.

The pool (featsync.localcontext.extractor) starts each worker as its own Python
process with one end of a unix socket. The worker imports OpenCV once, says it is
ready, then serves one job at a time: an image as bytes, or as an open file descriptor
passed with the job (SCM_RIGHTS), decoded straight from the file. Whatever the image
does to the decoder, the worker answers with descriptors or a reason; if it crashes
instead, only this process dies.

Framing, both ways: a 4-byte big-endian length, a JSON header, then the payload the
header announces (image bytes one way, descriptors the other).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
from typing import IO, Any

from featsync.errors import ItemRejected

_LEN = struct.Struct(">I")
_MAX_HEADER = 1 << 20
WORKER_MEMORY = 4 << 30  # bytes of address space per worker: an image past it is refused


# -- framing -----------------------------------------------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def send_msg(sock: socket.socket, header: dict[str, Any], fds: list[int] | None = None) -> None:
    raw = json.dumps(header).encode("utf-8")
    frame = _LEN.pack(len(raw)) + raw
    if fds:
        sent = socket.send_fds(sock, [frame], fds)
        if sent < len(frame):
            sock.sendall(frame[sent:])
    else:
        sock.sendall(frame)


def recv_header(sock: socket.socket, with_fd: bool = False) -> tuple[dict[str, Any], int | None]:
    fd: int | None = None
    if with_fd:
        first, fds, _flags, _addr = socket.recv_fds(sock, _LEN.size, 1)
        if not first:
            raise EOFError
        fd = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        head = first + recv_exact(sock, _LEN.size - len(first))
    else:
        head = recv_exact(sock, _LEN.size)
    (n,) = _LEN.unpack(head)
    if n > _MAX_HEADER:
        raise EOFError
    header = json.loads(recv_exact(sock, n))
    if not isinstance(header, dict):
        raise EOFError
    return header, fd


# -- the worker process --------------------------------------------------------------------


def _source(sock: socket.socket, header: dict[str, Any], fd: int | None) -> bytes | IO[bytes]:
    if header.get("fd"):
        if fd is None:
            raise ItemRejected("no file descriptor came with the job")
        with contextlib.suppress(OSError):  # not seekable: Pillow reads it whole
            os.lseek(fd, 0, os.SEEK_SET)
        return os.fdopen(fd, "rb")
    return recv_exact(sock, int(header.get("size", 0)))


def _orphan_watch(parent: int) -> None:
    """End the worker if the syncing process is gone (even by kill -9) while an image
    keeps it busy; an idle worker ends anyway when its socket closes."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def work(fd: int) -> int:
    """Serve jobs on socket `fd` until the pool closes it (the pool starts this, with
    the stop signals already ignored: see extractor._BOOT)."""
    import resource

    threading.Thread(target=_orphan_watch, args=(os.getppid(),), daemon=True).start()
    sock = socket.socket(fileno=fd)
    from featsync.localcontext import features  # the heavy imports, once per worker

    features.warm_up()
    # A bound on the worker's memory: an image that needs more fails with MemoryError
    # (its rejection), instead of the OOM killer choosing a process.
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = min(x for x in (soft, hard, WORKER_MEMORY) if x != resource.RLIM_INFINITY)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    send_msg(sock, {"ready": True})
    while True:
        try:
            header, job_fd = recv_header(sock, with_fd=True)
        except (EOFError, OSError, ValueError):
            return 0
        source: bytes | IO[bytes] | None = None
        try:
            source = _source(sock, header, job_fd)
            job_fd = None  # the file object owns it now
            desc = features.extract(
                source,
                str(header.get("name", "")),
                int(header.get("max_pixels") or features.DEFAULT_MAX_PIXELS),
                int(header.get("min_side", features.MIN_SIDE)),
            )
            data = desc.tobytes()
            answer: dict[str, Any] = {"ok": True, "bytes": len(data)}
        except ItemRejected as exc:
            answer, data = {"ok": False, "error": str(exc), "bytes": 0}, b""
        except Exception as exc:
            name = header.get("name", "")
            why = f"{type(exc).__name__}: {exc}"
            answer = {"ok": False, "error": f"feature extraction failed on {name!r}: {why}"}
            answer["bytes"], data = 0, b""
        finally:
            if job_fd is not None:
                os.close(job_fd)
            if source is not None and not isinstance(source, bytes):
                source.close()
        try:
            send_msg(sock, answer)
            sock.sendall(data)
        except OSError:
            return 0
