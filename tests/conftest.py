"""Shared fixtures: a real folder, a real SQLite ledger and a real embedded context."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from featsync import config
from featsync.aspose import AsposeContext, ClientSettings
from featsync.engine import CycleReport, Engine
from featsync.ledger import SqlLedger
from featsync.localcontext import LocalContext
from featsync.model import ImageData, ImageFeatures, SearchResult, Secret
from featsync.samples import textured_bytes


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """A test must not leave threads running behind it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not extra, f"leaked threads: {extra}"


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """Logs from in-process runs go nowhere unless a test captures them."""
    structlog.configure(
        processors=[structlog.processors.KeyValueRenderer()],
        logger_factory=structlog.ReturnLoggerFactory(),
    )
    yield
    structlog.reset_defaults()


class CountingContext:
    """The real embedded context, with each call it receives counted (a spy, not a fake)."""

    def __init__(self, inner: LocalContext) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def add_features(self, image_id: str, image: ImageData) -> int | None:
        self.calls["add"] += 1
        return self.inner.add_features(image_id, image)

    def update_features(self, image_id: str, image: ImageData) -> int | None:
        self.calls["update"] += 1
        return self.inner.update_features(image_id, image)

    def delete_features(self, image_id: str) -> None:
        self.calls["delete"] += 1
        self.inner.delete_features(image_id)

    def get_features(self, image_id: str) -> ImageFeatures:
        return self.inner.get_features(image_id)

    def find_similar(self, **kw: Any) -> list[SearchResult]:
        return self.inner.find_similar(**kw)

    def find_duplicates(self, threshold: float) -> list[list[SearchResult]]:
        return self.inner.find_duplicates(threshold)

    def identity(self) -> str:
        return self.inner.identity()

    def close(self) -> None:
        self.inner.close()


@dataclass
class Cycle:
    report: CycleReport
    calls: Counter[str]
    logs: list[MutableMapping[str, Any]]

    def events(self, name: str) -> list[MutableMapping[str, Any]]:
        return [e for e in self.logs if e["event"] == name]


@dataclass
class Workspace:
    """A config file, its image folder, ledger and embedded context, all in a temp dir."""

    base: Path
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def images(self) -> Path:
        return self.base / "images"

    @property
    def config_path(self) -> Path:
        return self.base / "featsync.toml"

    def write_config(self, **sections: dict[str, Any]) -> None:
        self.overrides = sections
        lines: list[str] = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def settings(self) -> config.Settings:
        return config.load(str(self.config_path))

    def image(self, rel: str, seed: int, fmt: str = "JPEG") -> Path:
        path = self.images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(textured_bytes(seed, fmt))
        return path

    def ledger(self) -> SqlLedger:
        return SqlLedger(self.settings().ledger.url)

    def context(self) -> LocalContext:
        return LocalContext(self.settings().context.path)

    def remote_ids(self) -> set[str]:
        ctx = self.context()
        try:
            return set(ctx.image_ids())
        finally:
            ctx.close()

    def cycle(self, *, dry_run: bool = False, confirm_deletes: bool = False) -> Cycle:
        settings = self.settings()
        ledger = SqlLedger(settings.ledger.url)
        ctx = CountingContext(LocalContext(settings.context.path))
        try:
            with capture_logs() as logs:
                engine = Engine(settings, ledger, ctx, structlog.get_logger())
                report = engine.cycle(dry_run=dry_run, confirm_deletes=confirm_deletes)
        finally:
            ctx.close()
            ledger.close()
        return Cycle(report, ctx.calls, logs)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    w = Workspace(tmp_path)
    w.images.mkdir()
    w.write_config(sync={"folder": "images"})
    return w


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `cond` until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def set_mtime_past(path: Path, seconds: float = 60.0) -> None:
    """Age a file so its stat is trusted (files modified within 2 s are always re-read)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


# -- featsync serve as a real subprocess --------------------------------------------------

CLIENT_ID = "featsync-tests"
CLIENT_SECRET = "test-secret-7d1f0c5a9e"  # noqa: S105 (a test credential for a loopback server)


@dataclass
class Server:
    """`featsync serve` on a free loopback port, its log in `log_path`."""

    url: str
    proc: subprocess.Popen[str]
    data: Path
    log_path: Path

    @property
    def api(self) -> str:
        return self.url + "/v3.0"

    @property
    def token_url(self) -> str:
        return self.url + "/connect/token"

    def log_events(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(x) for x in lines if x.startswith("{")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_server(data: Path, *args: str, port: int = 0, timeout: float = 30.0) -> Server:
    env = dict(os.environ, FEATSYNC_CLIENT_ID=CLIENT_ID, FEATSYNC_CLIENT_SECRET=CLIENT_SECRET)
    data.mkdir(parents=True, exist_ok=True)
    log_path = data.parent / f"{data.name}-serve-{time.monotonic_ns()}.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "featsync",
                "serve",
                "--port",
                str(port),
                "--data",
                str(data),
                "--log-format",
                "json",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            text=True,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = ""
    while not line.startswith("serving on "):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"featsync serve did not start: {log_path.read_text()}")
        ready, _, _ = select.select([proc.stdout], [], [], remaining)
        if ready:
            line = proc.stdout.readline()
    return Server(line.split()[-1], proc, data, log_path)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One plain `featsync serve` for the session; each test makes its own context."""
    srv = start_server(tmp_path_factory.mktemp("serve") / "data", "--access-log")
    yield srv
    srv.stop()


def client_for(srv: Server, context_id: str = "", **kw: Any) -> AsposeContext:
    settings = ClientSettings(
        base_url=srv.api,
        auth_url=srv.token_url,
        context_id=context_id,
        trust_env=False,
        **{"max_retries": 3, "backoff_max": 2.0, **kw},
    )
    return AsposeContext(settings, CLIENT_ID, Secret(CLIENT_SECRET), structlog.get_logger())


def new_context(srv: Server, **kw: Any) -> AsposeContext:
    """A client on a search context of its own."""
    maker = client_for(srv)
    try:
        context_id = maker.create_context()
    finally:
        maker.close()
    return client_for(srv, context_id, **kw)


# -- where features go, and daemons that do not outlive their test ----------------------


@dataclass
class Backend:
    """Where featsync sends features: the embedded context, or a context on `featsync
    serve` (the workspace's config points at it)."""

    name: str
    context: dict[str, Any]  # the config's [context]
    env: dict[str, str]
    remote: Callable[[], set[str]]  # the image IDs the context holds


@pytest.fixture(params=["embedded", "serve"])
def backend(request: pytest.FixtureRequest, ws: Workspace) -> Backend:
    if request.param == "embedded":
        return Backend("embedded", {}, {}, ws.remote_ids)
    from tests.test_aspose import CREDS, served_ids, use_server

    srv: Server = request.getfixturevalue("server")
    context_id = use_server(ws, srv)
    return Backend(
        "serve", dict(ws.overrides["context"]), CREDS, lambda: served_ids(srv, context_id)
    )


@pytest.fixture
def daemons(ws: Workspace) -> Iterator[Any]:
    """`featsync run` processes started by the test (tests.test_daemon.Daemons)."""
    from tests.test_daemon import Daemons

    d = Daemons(ws)
    yield d
    d.close()
