"""Backups before every update and delete, history, features get/diff, restore, export,
list and prune: through `featsync` subprocesses against the embedded context and a real
`featsync serve`, with real files, ledgers and stores."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from featsync.backups import Backup, BackupStore
from featsync.engine import Engine
from featsync.errors import NotFound, Transient
from featsync.ledger import SqlLedger
from featsync.lifecycle import look
from featsync.localcontext import LocalContext
from featsync.model import ImageFeatures
from featsync.samples import textured_bytes
from tests.conftest import Backend, Server, Workspace, set_mtime_past
from tests.test_cli import featsync, json_lines

Held = Callable[[str], ImageFeatures | None]


@pytest.fixture
def held(request: pytest.FixtureRequest, ws: Workspace, backend: Backend) -> Held:
    """What the backend's context holds for an image ID, read from its store file."""

    def store_path() -> str:
        if backend.name == "embedded":
            return ws.settings().context.path
        srv: Server = request.getfixturevalue("server")
        return str(srv.data / f"{backend.context['context_id']}.search")

    def look(image_id: str) -> ImageFeatures | None:
        ctx = LocalContext(store_path(), read_only=True)
        try:
            return ctx.get_features(image_id)
        except NotFound:
            return None
        finally:
            ctx.close()

    return look


def _config(ws: Workspace, backend: Backend, **backup: Any) -> None:
    sections: dict[str, dict[str, Any]] = {"sync": {"folder": "images", "concurrency": 2}}
    if backend.context:
        sections["context"] = backend.context
    if backup:
        sections["backup"] = backup
    ws.write_config(**sections)


def _write(ws: Workspace, rel: str, seed: int) -> Path:
    path = ws.image(rel, seed)
    set_mtime_past(path)  # settled: the scan trusts it at once
    return path


def _sync(ws: Workspace, backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    r = featsync("reconcile", *args, cwd=ws.base, env=backend.env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _store(ws: Workspace) -> BackupStore:
    return BackupStore(ws.settings().backup.path, read_only=True)


def _backups(ws: Workspace, image_id: str) -> dict[int, ImageFeatures]:
    """The backup of each sent version, as `history` and `features get` match them."""
    seen = look(ws.settings(), image_id)
    store = _store(ws)
    try:
        out: dict[int, ImageFeatures] = {}
        for version, b in seen.backups.items():
            feats = store.features(b.id)
            assert feats is not None
            out[version] = feats
        return out
    finally:
        store.close()


def _records(ws: Workspace, image_id: str) -> list[tuple[Backup, ImageFeatures]]:
    """Every record kept for the image, oldest first."""
    store = _store(ws)
    try:
        out = []
        for b in store.records(image_id):
            feats = store.features(b.id)
            assert feats is not None
            out.append((b, feats))
        return out
    finally:
        store.close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_update_and_a_delete_each_leave_the_features_held_before(
    ws: Workspace, backend: Backend, held: Held
) -> None:
    _config(ws, backend)
    _write(ws, "a.jpg", 1)
    _write(ws, "b.jpg", 2)
    _write(ws, "c.jpg", 3)
    _sync(ws, backend)
    before_a, before_b = held("a.jpg"), held("b.jpg")
    assert before_a is not None and before_b is not None
    _write(ws, "a.jpg", 11)  # replaced
    (ws.images / "b.jpg").unlink()  # gone
    r = _sync(ws, backend)
    events = {e["event"]: e for e in json_lines(r.stderr) if e.get("image_id")}
    assert events["image_updated"]["backup"] == "kept"
    assert events["image_deleted"]["backup"] == "kept"
    assert _backups(ws, "a.jpg") == {1: before_a}
    assert _backups(ws, "b.jpg") == {1: before_b}
    assert held("a.jpg") != before_a and held("b.jpg") is None
    assert _backups(ws, "c.jpg") == {}  # unchanged: nothing taken, no call made
    b = {x.image_id: x for x, _ in _records(ws, "a.jpg") + _records(ws, "b.jpg")}
    assert (b["a.jpg"].reason, b["b.jpg"].reason) == ("update", "delete")
    ledger = ws.ledger()
    try:
        history = ledger.history_of("b.jpg")
    finally:
        ledger.close()
    assert b["b.jpg"].digest == history[0]["digest"] and b["b.jpg"].digest


def test_history_after_an_add_three_updates_and_a_delete(
    ws: Workspace, backend: Backend, held: Held
) -> None:
    _config(ws, backend, images=True)
    _write(ws, "keep1.jpg", 7)  # one delete of three: within the delete guard's limits
    _write(ws, "keep2.jpg", 8)
    seen: list[ImageFeatures | None] = []
    for seed in (1, 2, 3, 4):
        _write(ws, "x.jpg", seed)
        _sync(ws, backend)
        seen.append(held("x.jpg"))
    (ws.images / "x.jpg").unlink()
    _sync(ws, backend)
    r = featsync("history", "x.jpg", "--json", cwd=ws.base, env=backend.env)
    assert r.returncode == 0, r.stderr
    versions = json.loads(r.stdout)["versions"]
    assert [v["action"] for v in versions] == ["add", "update", "update", "update", "delete"]
    assert [v["version"] for v in versions] == [1, 2, 3, 4, 5]
    # keep_versions = 3: the backups of v2, v3, v4 are kept (v1's was pruned)
    assert [v["backup"] for v in versions] == [False, True, True, True, False]
    assert [v["image_kept"] for v in versions] == [True, True, True, True, False]
    assert _backups(ws, "x.jpg") == {2: seen[1], 3: seen[2], 4: seen[3]}
    text = featsync("history", "x.jpg", cwd=ws.base, env=backend.env).stdout
    assert "kept: features backup, image copy" in text


def test_retention_keeps_n_versions_drops_images_gone_long_ago_and_holds_a_size_cap(
    ws: Workspace,
) -> None:
    ws.write_config(sync={"folder": "images"}, backup={"keep_versions": 2, "max_size": 1 << 30})
    for seed in range(1, 6):
        _write(ws, "v.jpg", seed)
        _write(ws, "w.jpg", 100 + seed)
        r = _sync(ws, Backend("embedded", {}, {}, ws.remote_ids))
    assert sorted(_backups(ws, "v.jpg")) == [3, 4]
    pruned = [e for e in json_lines(r.stderr) if e["event"] == "backups_pruned"]
    assert pruned and pruned[0]["versions"] == 2  # v2 of each went in the last cycle
    # an image deleted long ago loses its backups; one deleted lately keeps them
    (ws.images / "w.jpg").unlink()
    _sync(ws, Backend("embedded", {}, {}, ws.remote_ids))
    assert sorted(_backups(ws, "w.jpg")) == [4, 5]
    db = sqlite3.connect(str(Path(ws.settings().backup.path) / "features.db"))
    with db:
        db.execute("UPDATE backups SET taken_at = taken_at - 91 * 86400")
    db.close()
    r = featsync("backup", "prune", cwd=ws.base)
    assert r.returncode == 0, r.stderr
    assert "0 of images gone" in r.stdout  # w.jpg was deleted today, whatever its backups' age
    ledger = sqlite3.connect(str(ws.base / "featsync-ledger.db"))
    with ledger:
        ledger.execute(
            "UPDATE images SET updated_at = updated_at - 91 * 86400 WHERE image_id = 'w.jpg'"
        )
    ledger.close()
    r = featsync("backup", "prune", cwd=ws.base)
    assert r.returncode == 0, r.stderr
    assert "2 of images gone over keep_deleted_days" in r.stdout
    assert _backups(ws, "w.jpg") == {} and sorted(_backups(ws, "v.jpg")) == [3, 4]  # v is held
    # the size cap: the oldest go first
    sizes = [b.size for b, _ in _records(ws, "v.jpg")]
    ws.write_config(sync={"folder": "images"}, backup={"keep_versions": 2, "max_size": 1024})
    r = featsync("backup", "prune", cwd=ws.base)
    assert r.returncode == 0 and all(s > 1024 for s in sizes), (r.stderr, sizes)
    assert "2 over max_size" in r.stdout
    assert _backups(ws, "v.jpg") == {}


def test_features_get_and_diff_of_two_versions(ws: Workspace, backend: Backend, held: Held) -> None:
    _config(ws, backend)
    _write(ws, "d.jpg", 5)
    _sync(ws, backend)
    first = held("d.jpg")
    _write(ws, "d.jpg", 6)
    _sync(ws, backend)
    second = held("d.jpg")
    assert first is not None and second is not None
    r = featsync("features", "get", "d.jpg", "--version", "1", cwd=ws.base, env=backend.env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == first.as_json()
    now = featsync("features", "get", "d.jpg", cwd=ws.base, env=backend.env)
    assert json.loads(now.stdout) == second.as_json()
    missing = featsync("features", "get", "d.jpg", "--version", "7", cwd=ws.base, env=backend.env)
    assert missing.returncode == 1 and "backups kept: v1" in missing.stderr
    d = featsync("features", "diff", "d.jpg", "--json", cwd=ws.base, env=backend.env)
    assert d.returncode == 0, d.stderr
    diff = json.loads(d.stdout)
    assert (diff["features_count_from"], diff["features_count_to"]) == (
        first.features_count,
        second.features_count,
    )
    assert diff["identical"] is False and diff["share_unchanged"] < 0.5
    if backend.name == "embedded":
        assert diff["similarity"] is not None and diff["similarity"] < 50
    # a version against itself: everything unchanged, similarity 100
    same = featsync(
        "features",
        "diff",
        "d.jpg",
        "--from",
        "2",
        "--to",
        "2",
        "--json",
        cwd=ws.base,
        env=backend.env,
    )
    again = json.loads(same.stdout)
    assert again["identical"] is True and again["share_unchanged"] == 1.0
    if backend.name == "embedded":
        assert again["similarity"] == 100.0


def test_restore_of_an_updated_and_of_a_deleted_image(
    ws: Workspace, backend: Backend, held: Held
) -> None:
    _config(ws, backend, images=True)
    old_u = _write(ws, "u.jpg", 21).read_bytes()
    old_g = _write(ws, "g.jpg", 22).read_bytes()
    _sync(ws, backend)
    features_u, features_g = held("u.jpg"), held("g.jpg")
    _write(ws, "u.jpg", 23)
    (ws.images / "g.jpg").unlink()
    _sync(ws, backend)
    assert held("u.jpg") != features_u and held("g.jpg") is None

    # never over a different file without --force
    r = featsync("restore", "u.jpg", cwd=ws.base, env=backend.env)
    assert r.returncode == 1 and "--force" in r.stderr
    dry = featsync("restore", "g.jpg", "--dry-run", cwd=ws.base, env=backend.env)
    assert dry.returncode == 0 and "would create" in dry.stdout
    assert not (ws.images / "g.jpg").exists()
    assert featsync("restore", "u.jpg", "--force", cwd=ws.base, env=backend.env).returncode == 0
    assert featsync("restore", "g.jpg", cwd=ws.base, env=backend.env).returncode == 0
    assert (ws.images / "u.jpg").read_bytes() == old_u
    assert (ws.images / "g.jpg").read_bytes() == old_g
    assert not [p for p in ws.images.iterdir() if p.name.startswith(".")]  # no leftovers
    _sync(ws, backend)
    assert held("u.jpg") == features_u and held("g.jpg") == features_g
    # the restore's own update backed up what it replaced (v2 of u.jpg)
    assert sorted(_backups(ws, "u.jpg")) == [1, 2]
    again = featsync("restore", "u.jpg", "--version", "1", cwd=ws.base, env=backend.env)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_restore_without_a_kept_image_says_why_and_what_was_kept(ws: Workspace) -> None:
    _write(ws, "n.jpg", 31)
    _sync(ws, Backend("embedded", {}, {}, ws.remote_ids))
    _write(ws, "n.jpg", 32)
    _sync(ws, Backend("embedded", {}, {}, ws.remote_ids))
    r = featsync("restore", "n.jpg", cwd=ws.base)
    assert r.returncode == 1
    assert "no image copy of it is kept" in r.stderr and "features backups of v1" in r.stderr
    assert (ws.images / "n.jpg").read_bytes() == textured_bytes(32, "JPEG")


def test_an_add_that_finds_features_already_there_backs_them_up(ws: Workspace) -> None:
    """A lost ledger, or features put there by hand: what the add replaces is kept."""
    path = _write(ws, "s.jpg", 41)
    other = ws.base / "other.jpg"
    other.write_bytes(textured_bytes(42, "JPEG"))
    ctx = ws.context()
    try:
        ctx.add_features("s.jpg", other.read_bytes())
        stranger = ctx.get_features("s.jpg")
    finally:
        ctx.close()
    ws.write_config(sync={"folder": "images"}, context={"kind": "local"})
    settings = ws.settings()
    ledger = SqlLedger(settings.ledger.url)
    ledger.bind_context(LocalContext(settings.context.path, read_only=True).identity())
    ledger.close()  # bound, not adopted: the add meets "already there"
    _sync(ws, Backend("embedded", {}, {}, ws.remote_ids))
    kept = _records(ws, "s.jpg")
    assert [(b.version, b.reason, f) for b, f in kept] == [(0, "replace", stranger)]
    assert path.exists()


def test_features_update_and_delete_by_hand_back_up_first(ws: Workspace) -> None:
    _write(ws, "h.jpg", 51)
    _sync(ws, Backend("embedded", {}, {}, ws.remote_ids))
    ctx = ws.context()
    try:
        before = ctx.get_features("h.jpg")
    finally:
        ctx.close()
    other = ws.base / "other.jpg"
    other.write_bytes(textured_bytes(52, "JPEG"))
    r = featsync("features", "update", "h.jpg", "--file", str(other), cwd=ws.base)
    assert r.returncode == 0 and "kept" in r.stdout, r.stderr
    assert _backups(ws, "h.jpg") == {1: before}


class FailingGets:
    """The embedded context, whose GETs fail (a transient error) while `failing`."""

    def __init__(self, inner: LocalContext) -> None:
        self.inner = inner
        self.failing = True
        self.gets = 0

    def get_features(self, image_id: str) -> ImageFeatures:
        self.gets += 1
        if self.failing:
            raise Transient("fault injection: GET features failed (503)")
        return self.inner.get_features(image_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _cycle(ws: Workspace, ctx: Any) -> Any:
    settings = ws.settings()
    ledger = SqlLedger(settings.ledger.url)
    try:
        with capture_logs() as logs:
            report = Engine(settings, ledger, ctx, structlog.get_logger()).cycle()
        return report, logs
    finally:
        ledger.close()


def test_a_failing_backup_get_holds_the_update_back_and_loses_nothing(ws: Workspace) -> None:
    _write(ws, "f.jpg", 61)
    _write(ws, "gone.jpg", 62)
    _sync(ws, Backend("embedded", {}, {}, ws.remote_ids))
    ctx = FailingGets(ws.context())
    try:
        before = ctx.inner.get_features("f.jpg")
        _write(ws, "f.jpg", 63)
        (ws.images / "gone.jpg").unlink()
        report, logs = _cycle(ws, ctx)
        assert report.applied.updated == 0 and report.applied.deleted == 0
        assert report.applied.failed == 2 and not report.in_step  # waiting, no outage
        assert ctx.inner.get_features("f.jpg") == before  # not replaced unbacked
        assert "gone.jpg" in set(ctx.inner.image_ids())  # not deleted unbacked
        failed = [e for e in logs if e["event"] == "image_failed"]
        assert all("features backup not taken" in e["error"] for e in failed), failed
        ctx.failing = False  # the service is back: the next cycle does both
        report, _ = _cycle(ws, ctx)
        assert (report.applied.updated, report.applied.deleted) == (1, 1) and report.in_step
    finally:
        ctx.close()
    assert _backups(ws, "f.jpg") == {1: before}
    assert sorted(_backups(ws, "gone.jpg")) == [1]


def test_with_backups_not_required_a_failing_get_is_logged_and_the_update_goes(
    ws: Workspace,
) -> None:
    ws.write_config(sync={"folder": "images"}, backup={"required": False})
    _write(ws, "r.jpg", 71)
    _sync(ws, Backend("embedded", {}, {}, ws.remote_ids))
    ctx = FailingGets(ws.context())
    try:
        _write(ws, "r.jpg", 72)
        report, logs = _cycle(ws, ctx)
    finally:
        ctx.close()
    assert report.applied.updated == 1 and report.in_step
    skipped = [e for e in logs if e["event"] == "backup_skipped"]
    assert skipped and "GET features failed" in skipped[0]["reason"]
    assert _backups(ws, "r.jpg") == {}


class FailingGetProxy:
    """A real HTTP proxy in front of `featsync serve` that answers 503 to GET
    .../features while `failing`, and passes everything else through."""

    def __init__(self, upstream: str) -> None:
        import http.server
        import threading

        import requests

        self.failing = True
        self.failed = 0
        proxy = self
        session = requests.Session()

        class Handler(http.server.BaseHTTPRequestHandler):
            def _pass(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                if self.command == "GET" and "/features?" in self.path and proxy.failing:
                    proxy.failed += 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                r = session.request(
                    self.command, upstream + self.path, data=body, headers=headers, timeout=60
                )
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = do_DELETE = _pass

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def failing_gets(upstream: str) -> Iterator[FailingGetProxy]:
    proxy = FailingGetProxy(upstream)
    try:
        yield proxy
    finally:
        proxy.close()


def test_a_failing_backup_get_over_http_holds_the_update_back(
    ws: Workspace, server: Server
) -> None:
    from tests.test_aspose import CREDS, use_server

    use_server(ws, server)
    context = dict(ws.overrides["context"])
    root = server.api.rsplit("/v3.0", 1)[0]
    with failing_gets(root) as proxy:
        proxy.failing = False
        context.update(base_url=proxy.url + "/v3.0", max_retries=0)
        backend = Backend("serve", context, CREDS, ws.remote_ids)
        _config(ws, backend)
        _write(ws, "p.jpg", 81)
        _write(ws, "q.jpg", 83)
        _write(ws, "o.jpg", 84)
        _sync(ws, backend)
        proxy.failing = True
        _write(ws, "p.jpg", 82)
        (ws.images / "q.jpg").unlink()
        r = featsync("reconcile", cwd=ws.base, env=backend.env)
        assert r.returncode == 1 and proxy.failed >= 2, r.stderr[-2000:]
        failed = [e for e in json_lines(r.stderr) if e["event"] == "image_failed"]
        assert sorted(e["image_id"] for e in failed) == ["p.jpg", "q.jpg"]
        assert all("features backup not taken" in e["error"] for e in failed)
        proxy.failing = False
        _sync(ws, backend)
    assert sorted(_backups(ws, "q.jpg")) == [1]
    assert sorted(_backups(ws, "p.jpg")) == [1]


def test_export_streams_json_lines_in_bounded_memory(tmp_path: Path) -> None:
    """10,000 backups (about 80 MB of features) export with about the memory of 1,000."""
    peaks = {}
    for n in (1_000, 10_000):
        folder = tmp_path / f"b{n}"
        store = BackupStore(str(folder))
        store.close()
        db = sqlite3.connect(str(folder / "features.db"))
        with db:
            db.executemany(
                "INSERT INTO backups (image_id, version, digest, reason, taken_at, "
                "features_count, feature_length_in_bits, size, features_hash, data) "
                "VALUES (?, 1, ?, 'update', ?, 131, 488, ?, ?, ?)",
                (
                    (f"img{i:05d}.jpg", f"{i:064x}", 1e9 + i, 8000, str(i), zlib.compress(blob))
                    for i in range(n)
                    for blob in [os.urandom(7991)]
                ),
            )
        db.close()
        (tmp_path / "featsync.toml").write_text(f'[backup]\npath = "b{n}"\n', encoding="utf-8")
        out = tmp_path / f"out{n}.jsonl"
        probe = (
            "import resource, subprocess, sys; "
            f"r = subprocess.run([sys.executable, '-m', 'featsync', 'backup', 'export', "
            f"'--out', {str(out)!r}], cwd={str(tmp_path)!r}); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True
        )
        peak_kib, rc = map(int, done.stdout.split())
        assert rc == 0, done.stderr
        peaks[n] = peak_kib
        lines = out.read_text(encoding="utf-8").splitlines()
        assert len(lines) == n
        first = json.loads(lines[0])
        assert set(first) == {
            "imageId",
            "version",
            "hash",
            "takenAt",
            "reason",
            "featuresCount",
            "featureLengthInBits",
            "features",
        }
        assert first["imageId"] == "img00000.jpg" and first["takenAt"].startswith("2001-09-09")
    size = (tmp_path / "out10000.jsonl").stat().st_size
    assert size > 100_000_000  # the export itself is ~107 MB ...
    assert peaks[10_000] - peaks[1_000] < 16 * 1024, peaks  # ... its memory barely moves


def test_export_filters_by_time_and_id_and_says_what_a_bad_time_is(ws: Workspace) -> None:
    _write(ws, "e1.jpg", 91)
    _write(ws, "e2.jpg", 92)
    _sync(ws, Backend("embedded", {}, {}, ws.remote_ids))
    _write(ws, "e1.jpg", 93)
    _write(ws, "e2.jpg", 94)
    _sync(ws, Backend("embedded", {}, {}, ws.remote_ids))
    every = featsync("backup", "export", cwd=ws.base)
    assert [json.loads(x)["imageId"] for x in every.stdout.splitlines()] == ["e1.jpg", "e2.jpg"]
    one = featsync("backup", "export", "e2.jpg", cwd=ws.base)
    assert [json.loads(x)["imageId"] for x in one.stdout.splitlines()] == ["e2.jpg"]
    future = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    none = featsync("backup", "export", "--since", future, cwd=ws.base)
    assert none.returncode == 0 and none.stdout == ""
    recent = featsync("backup", "export", "--since", "1h", cwd=ws.base)
    assert len(recent.stdout.splitlines()) == 2
    bad = featsync("backup", "export", "--since", "last tuesday", cwd=ws.base)
    assert bad.returncode == 2 and "--since 'last tuesday': not a time" in bad.stderr
    listed = featsync("backup", "list", "--json", cwd=ws.base)
    doc = json.loads(listed.stdout)
    assert [(i["image_id"], i["versions"]) for i in doc["images"]] == [
        ("e1.jpg", [1]),
        ("e2.jpg", [1]),
    ]
    assert doc["totals"]["backups"] == 2


def test_backups_through_the_daemon(
    ws: Workspace, backend: Backend, held: Held, daemons: Any
) -> None:
    """The daemon's watcher path takes the same backups as reconcile."""
    from tests.conftest import wait_for
    from tests.test_daemon import configure

    _write(ws, "dd.jpg", 101)
    configure(ws, context=backend.context, backup={"images": True})
    d = daemons.start(backend.env)
    wait_for(lambda: backend.remote() == {"dd.jpg"}, 60, "the first sync\n" + d.tail())
    before = held("dd.jpg")
    assert before is not None
    (ws.images / "dd.jpg").write_bytes(textured_bytes(102, "JPEG"))
    wait_for(lambda: 1 in _backups(ws, "dd.jpg"), 60, "a backup of v1\n" + d.tail())
    assert _backups(ws, "dd.jpg") == {1: before}
    d.wait_event("image_updated")
    assert d.events("image_updated")[0]["backup"] == "kept"
    assert d.stop() == 0
