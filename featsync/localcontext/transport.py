"""The connection layer of `featsync serve`: waitress, set up to hold up against hostile
clients.

- Room for many connections: the limit is high (1000 by default; the soft RLIMIT_NOFILE
  is raised toward the hard one to fit it, or the limit lowered to what fits), and
  waitress polls with ``poll()``, as ``select()`` fails past descriptor 1024.
- A connection idle for ``idle_timeout_s`` is closed; so is one whose request line and
  headers have not all arrived ``header_timeout_s`` after their first byte (a client
  trickling a byte at a time is never idle, and would otherwise keep its connection).
- A body is read only once the headers show it is welcome (the ``Gate``): waitress
  otherwise buffers a whole body, to memory and then to temp files, before the
  application sees the request. A refused request is answered at once and its body is
  read and dropped, never stored, until the client stops sending (at most ``MAX_BODY``
  bytes or ``DRAIN_S`` seconds). Draining rather than closing at once lets a client that
  sends its whole body before it reads (most do) see the answer instead of a reset.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from waitress import create_server
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer
from waitress.utilities import Error

MAX_BODY = 64 * 1024 * 1024
DRAIN_S = 10.0  # how long a refused request's body is read and dropped, at most
SPARE_FDS = 64  # descriptors beside the connections: stores, logs, temp buffers


@dataclass(frozen=True, slots=True)
class Limits:
    connection_limit: int = 1000
    idle_timeout_s: int = 30  # waitress counts whole seconds
    header_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Head:
    """What is known of a request once its headers are in, before its body."""

    method: str
    path: str
    query: str
    authorization: str
    body_size: int | None  # None: chunked, size unknown

    def param(self, name: str) -> str | None:
        values = parse_qs(self.query).get(name)
        return values[0] if values else None


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str  # the HTTP reason phrase
    body: bytes  # JSON


Gate = Callable[[Head], Refusal | None]  # None: the body may be read


class _Refused(Error):  # type: ignore[misc]  # waitress is untyped
    """A refusal as waitress's error task writes it: a JSON body, then the connection closes."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.body)
        self.refusal = refusal
        self.code, self.reason = refusal.status, refusal.reason

    def to_response(self, ident: str | None = None) -> tuple[str, list[tuple[str, str]], bytes]:
        headers = [("Content-Type", "application/json")]
        if self.refusal.status == 401:
            headers.append(("WWW-Authenticate", "Bearer"))
        return f"{self.refusal.status} {self.refusal.reason}", headers, self.refusal.body


class _GuardedParser(HTTPRequestParser):  # type: ignore[misc]  # waitress is untyped
    """waitress's request parser, asking the gate once the headers are in."""

    completed: bool
    headers_finished: bool

    def __init__(self, adj: Any, channel: _GuardedChannel) -> None:
        super().__init__(adj)
        self.channel = channel
        self.started = time.monotonic()

    def received(self, data: bytes) -> int:
        headers_were_in = self.headers_finished
        consumed: int = super().received(data)
        if headers_were_in or not self.headers_finished or self.completed:
            return consumed  # still in the headers, in the body, or no body to wait for
        refusal = self.channel.gate(self._head())
        if refusal is None:
            return consumed
        self.error = _Refused(refusal)
        self.completed = True
        self.expect_continue = False  # no "100 Continue": the client must not send the body
        self.connection_close = True
        self.channel.drain()
        return len(data)  # the rest of this read is body: dropped

    def _head(self) -> Head:
        h = self.headers
        return Head(
            method=self.command,
            path=self.path,
            query=self.query,
            authorization=h.get("AUTHORIZATION", ""),
            body_size=None if self.chunked else self.content_length,
        )


class _GuardedChannel(HTTPChannel):  # type: ignore[misc]  # waitress is untyped
    """waitress's connection, with the gate, the header deadline and the drain."""

    gate: Gate
    header_timeout_s: float
    draining_until: float | None = None  # a refused request's body is being dropped
    drained = 0
    write_shut = False

    def parser_class(self, adj: Any) -> _GuardedParser:
        return _GuardedParser(adj, self)

    def drain(self) -> None:
        self.draining_until = time.monotonic() + DRAIN_S

    def received(self, data: bytes) -> bool:
        if self.draining_until is None:
            return bool(super().received(data))
        self.drained += len(data)  # a refused body: counted, never kept
        return True

    def readable(self) -> bool:
        now = time.monotonic()
        if self.draining_until is not None:
            if now > self.draining_until or self.drained > MAX_BODY:
                self.will_close = True
            return not self.will_close
        request = self.request
        if (
            isinstance(request, _GuardedParser)
            and not request.headers_finished
            and now - request.started > self.header_timeout_s
        ):
            self.will_close = True  # too slow to say what it wants
            return False
        return bool(super().readable())

    def writable(self) -> bool:
        if self.draining_until is not None and not self.will_close:
            # the answer, then its end (once); never just because it will close later
            answered = self.close_when_flushed and not self.write_shut
            return bool(self.total_outbufs_len) or answered
        return bool(super().writable())

    def handle_write(self) -> None:
        if self.draining_until is None or self.will_close or not self.close_when_flushed:
            super().handle_write()
            return
        self._flush_exception(self._flush_some)  # the answer goes out; reading goes on
        if not self.total_outbufs_len and not self.write_shut:
            self.write_shut = True
            with contextlib.suppress(OSError):
                self.socket.shutdown(socket.SHUT_WR)  # the client sees the answer end


def fit_connection_limit(wanted: int, threads: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE toward the hard one so `wanted` connections fit.

    Returns (connections that fit, the soft limit now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare = SPARE_FDS + 4 * threads
    need = wanted + spare
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY:
        return wanted, soft
    return max(1, min(wanted, soft - spare)), soft


def build(
    app: Any, host: str, port: int, threads: int, gate: Gate, limits: Limits
) -> tuple[Any, int]:
    """A waitress server for `app`, guarded by `gate`; (the server, its bound port)."""
    listeners: dict[int, Any] = {}
    server: Any = create_server(
        app,
        map=listeners,
        host=host,
        port=port,
        threads=threads,
        ident="featsync",
        max_request_body_size=MAX_BODY,
        connection_limit=limits.connection_limit,
        channel_timeout=limits.idle_timeout_s,
        cleanup_interval=max(1, min(10, limits.idle_timeout_s // 2)),
        asyncore_use_poll=True,
    )
    channel = type(
        "GuardedChannel",
        (_GuardedChannel,),
        {"gate": staticmethod(gate), "header_timeout_s": limits.header_timeout_s},
    )
    bound = []
    for listener in list(listeners.values()):
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = channel
            # waitress sets TCP_NODELAY on its sockets by default; make sure it stays so
            # (without it small requests on loopback wait ~40 ms for delayed ACKs).
            nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if nodelay not in listener.adj.socket_options:
                listener.socket.setsockopt(*nodelay)
            bound.append(int(listener.effective_port))
    return server, bound[0]
