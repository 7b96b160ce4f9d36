"""Feature extraction in worker processes, so that no image can stop the sync.

Decoding and AKAZE are native code: a degenerate image can abort the process inside
OpenCV (a 500x1 image corrupts its heap) or keep it busy for minutes. They run in a
small pool of worker processes (featsync.localcontext.worker), each
talking to the pool over its own unix socket. A worker that dies, or does not answer
within the time limit (and is then killed), is that one image's rejection
(``ItemRejected``, with the signal and the last words it wrote on stderr); the pool
starts a new worker for the next image.

An image travels as bytes, or as an open file descriptor passed over the socket
(SCM_RIGHTS): the worker decodes straight from the file the sync opened and checked,
so a big file is never read whole into the syncing process.

The worker's side, and the framing both sides speak, are in
featsync.localcontext.worker.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from featsync.errors import ItemRejected, Transient
from featsync.localcontext.worker import recv_exact, recv_header, send_msg
from featsync.model import OpenImage

DEFAULT_TIME_LIMIT = 60.0  # seconds per image; a 250-megapixel PNG takes a few
START_LIMIT = 120.0  # seconds for a new worker to import its libraries and say it is ready


def default_workers(wanted: int) -> int:
    """Worker processes for `wanted` calls at once: never more than the CPUs."""
    return max(1, min(wanted, os.cpu_count() or 1))


# -- the pool, in the syncing process -----------------------------------------------------

# A worker's first act, before any import: ignore the stop signals that reach every
# process of a terminal's group (Ctrl-C) or of a systemd unit's cgroup (SIGTERM); the
# pool decides when a worker ends. It is started with them blocked (the mask is
# inherited), so that not even the interpreter's start-up is a window for them.
_IGNORED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_BOOT = (
    "import signal as s, sys; stops = (s.SIGINT, s.SIGTERM, s.SIGHUP); "
    "[s.signal(n, s.SIG_IGN) for n in stops]; s.pthread_sigmask(s.SIG_UNBLOCK, stops); "
    "from featsync.localcontext.worker import work; sys.exit(work(int(sys.argv[1])))"
)


class _Worker:
    """One worker process and the parent's end of its socket."""

    def __init__(self) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the worker)
        try:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except BaseException:
            self.stderr.close()
            raise
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _IGNORED)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self.stderr,
                start_new_session=True,  # nothing sent to our group reaches it
                # one thread for the math libraries: the pool is the parallelism, and
                # their per-CPU threads would eat into the worker's memory bound
                env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
            )
        except BaseException:
            parent.close()
            self.stderr.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            child.close()
        self.sock = parent
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self) -> None:
        """Wait for the worker's first word (its imports done), so that starting it never
        counts against an image's time limit; _NoStart if it does not come."""
        self.sock.settimeout(START_LIMIT)
        try:
            hello, _ = recv_header(self.sock)
        except (EOFError, OSError, ValueError):
            raise _NoStart from None
        if not hello.get("ready"):
            raise _NoStart
        self.ready = True

    def run(self, header: dict[str, Any], image: bytes | OpenImage, limit: float) -> bytes:
        """Send one job and return the descriptor bytes; raise _Died or _TooSlow."""
        sock = self.sock
        if not self.ready:
            self.wait_ready()
        sock.settimeout(limit)
        try:
            if isinstance(image, bytes):
                send_msg(sock, {**header, "size": len(image)})
                sock.sendall(image)
            else:
                send_msg(sock, {**header, "fd": True}, [image.fd])
            answer, _ = recv_header(sock)
            payload = recv_exact(sock, int(answer.get("bytes", 0)))
        except TimeoutError:
            raise _TooSlow from None
        except (EOFError, OSError, ValueError):
            raise _Died from None
        if answer.get("ok"):
            return payload
        raise ItemRejected(str(answer.get("error") or "the feature extractor refused the image"))

    def last_words(self) -> str:
        """The end of what the worker wrote on stderr (OpenCV's and glibc's complaints)."""
        try:
            self.stderr.seek(0, os.SEEK_END)
            size = self.stderr.tell()
            self.stderr.seek(max(0, size - 400))
            text = self.stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        return lines[-1][:200] if lines else ""

    def end(self) -> tuple[int | None, str]:
        """Kill the worker (if it still runs), reap it, close its files: its exit status
        and its last words."""
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover (SIGKILL cannot be refused)
            code = None
        words = self.last_words()
        self.stderr.close()
        return code, words


class _Died(Exception):
    pass


class _NoStart(Exception):
    pass


class _TooSlow(Exception):
    pass


def _how_it_died(code: int | None) -> str:
    if code is None:
        return "it did not exit"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


class Extractor:
    """A pool of extraction worker processes, shared by any number of threads.

    Workers start on first use and are replaced after a crash or a timeout. A thread
    that finds every worker busy waits for one (at most `max_wait` seconds, if set:
    then Transient, "busy"); only the work itself counts against `time_limit`. A worker
    that dies on an image is given one more try on a fresh worker before the image is
    blamed, so a worker killed from outside (the OOM killer, an operator) costs no
    image its sync.
    """

    def __init__(
        self,
        workers: int,
        time_limit: float = DEFAULT_TIME_LIMIT,
        max_pixels: int | None = None,
        min_side: int | None = None,
        max_wait: float | None = None,
    ) -> None:
        from featsync.localcontext.features import DEFAULT_MAX_PIXELS, MIN_SIDE

        self.workers = max(1, workers)
        self.time_limit = time_limit
        self.max_wait = max_wait
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        # Below MIN_SIDE OpenCV may crash (the worker dies, the image is rejected all
        # the same); only the tests lower it, to crash a worker for real.
        self.min_side = MIN_SIDE if min_side is None else min_side
        self._idle: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
        for _ in range(self.workers):
            self._idle.put(None)  # a slot; its process starts when first needed
        self._lock = threading.Lock()
        self._busy: set[_Worker] = set()
        self._closed = False
        self.crashes = 0  # workers lost to a crash or a timeout (tests and benchmarks read it)

    def __repr__(self) -> str:
        return f"Extractor(workers={self.workers}, time_limit={self.time_limit:g})"

    def extract(self, image: bytes | OpenImage, name: str) -> Any:
        """AKAZE descriptors of `image`, shape (n, 61); ItemRejected with the reason."""
        import numpy as np

        from featsync.localcontext.features import DESCRIPTOR_BYTES

        header = {"name": name, "max_pixels": self.max_pixels, "min_side": self.min_side}
        worker = self._take()
        try:
            for last_try in (False, True):
                worker = self._ready(worker)
                try:
                    payload = worker.run(header, image, self.time_limit)
                    break
                except (_Died, _TooSlow) as exc:
                    code, words = self._lose(worker)
                    worker = None
                    if self._closed:
                        raise Transient("the feature extractor was stopped") from None
                    if isinstance(exc, _TooSlow):
                        self.crashes += 1
                        raise ItemRejected(
                            f"the feature extractor took longer than {self.time_limit:g} s "
                            f"on image {name!r} (stopped)"
                        ) from None
                    if last_try:
                        self.crashes += 1
                        raise ItemRejected(_crashed(name, code, words)) from None
        finally:
            self._give_back(worker)
        rows = np.frombuffer(payload, dtype=np.uint8)
        return rows.reshape(-1, DESCRIPTOR_BYTES)

    def _ready(self, worker: _Worker | None) -> _Worker:
        """`worker` if it still lives (an idle one may have been killed: no image's
        fault), else a new one, started and ready; Transient if none can be had."""
        if worker is not None and worker.alive():
            self._mark_busy(worker)
            return worker
        if worker is not None:
            self._lose(worker)
        try:
            worker = _Worker()
        except OSError as exc:
            raise Transient(f"cannot start a feature extractor: {exc.strerror or exc}") from None
        self._mark_busy(worker)
        try:
            worker.wait_ready()
        except _NoStart:
            _code, words = self._lose(worker)
            raise Transient(
                "the feature extractor could not start" + (f": {words}" if words else "")
            ) from None
        return worker

    def _mark_busy(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.add(worker)

    def _lose(self, worker: _Worker) -> tuple[int | None, str]:
        with self._lock:
            self._busy.discard(worker)
        return worker.end()

    def _take(self) -> _Worker | None:
        """A free slot (a worker, or None: start one), once one is free; Transient
        once the extractor is closed (also for a caller that was waiting), or after
        `max_wait` seconds."""
        deadline = None if self.max_wait is None else time.monotonic() + self.max_wait
        while True:
            if self._closed:
                raise Transient("the feature extractor was stopped")
            if deadline is not None and time.monotonic() >= deadline:
                raise Transient(
                    f"every feature extractor is busy (waited {self.max_wait:g} s); try again later"
                )
            try:
                slot = self._idle.get(timeout=0.5)
            except queue.Empty:
                continue
            if self._closed:
                if slot is not None:
                    slot.end()
                self._idle.put(None)
                raise Transient("the feature extractor was stopped")
            return slot

    def _give_back(self, worker: _Worker | None) -> None:
        # Under the lock, so that close() (which drains the queue after setting _closed
        # under it) cannot miss a live worker put back meanwhile.
        with self._lock:
            closing = self._closed and worker is not None
            if worker is not None:
                self._busy.discard(worker)
            self._idle.put(None if closing else worker)
        if closing and worker is not None:
            worker.end()

    def close(self) -> None:
        """Stop every worker: idle ones now, busy ones as their jobs end (their callers
        get Transient)."""
        with self._lock:
            self._closed = True
            busy = list(self._busy)
        for worker in busy:  # the caller sees EOF, ends it and gives back None
            with contextlib.suppress(OSError):
                worker.sock.shutdown(socket.SHUT_RDWR)
        while True:
            try:
                idle = self._idle.get_nowait()
            except queue.Empty:
                break
            if idle is not None:
                idle.end()


def _crashed(name: str, code: int | None, words: str) -> str:
    tail = f": {words}" if words else ""
    return f"the feature extractor crashed on image {name!r} twice ({_how_it_died(code)}{tail})"
