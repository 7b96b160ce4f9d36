"""`featsync report` against what a hostile or careless world hands it: an --html path
that is a symbolic link, a FIFO or a folder; huge images to make thumbnails of; a config
naming another context than the ledger mirrors; a context that answers garbage, hostile
text or nothing; Ctrl-C in the middle of a probe; a ledger edited by hand with text and
absurd numbers where counts and times belong. Real subprocesses, a real SQLite ledger, a
real HTTP server on loopback (a small one of the test's own, that answers what it is
told to)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from featsync import report_files
from featsync.aspose_wire import search_results
from featsync.errors import Transient
from featsync.report_files import thumbnail
from featsync.samples import encode, textured_image
from tests.conftest import Workspace, wait_for
from tests.test_cli import featsync
from tests.test_report import _config, _put

IMAGES = 4  # textured images synced (and one flat, weak one)


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("hostile"))
    ws.images.mkdir()
    _config(ws)
    for n in range(IMAGES):
        _put(ws, f"i{n}.jpg", encode(textured_image(400 + n)))
    _put(ws, "flat.png", encode(Image.new("RGB", (200, 150), (90, 120, 150)), "PNG"))
    r = featsync("reconcile", cwd=ws.base)
    assert r.returncode == 0, r.stderr[-2000:]
    return ws


@pytest.fixture
def ws(synced: Workspace, tmp_path: Path) -> Workspace:
    """A copy of the synced workspace, the test's own to change."""
    copy = Workspace(tmp_path / "w")
    shutil.copytree(synced.base, copy.base, ignore=shutil.ignore_patterns("*.lock"))
    copy.overrides = dict(synced.overrides)
    # The embedded context's identity names its path: the copy mirrors its own copy.
    moved = (f"{synced.base}/", f"{copy.base}/")
    _sql(copy, ("UPDATE meta SET value = replace(value, ?, ?) WHERE key = 'context'", moved))
    return copy


def _sql(ws: Workspace, *statements: str | tuple[str, tuple[Any, ...]]) -> None:
    db = sqlite3.connect(ws.base / "featsync-ledger.db")
    try:
        for s in statements:
            db.execute(*((s,) if isinstance(s, str) else s))
        db.commit()
    finally:
        db.close()


def _no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


# -- 2, 10: where the page goes ------------------------------------------------------------


def test_html_writes_through_a_symbolic_link_and_never_replaces_it(ws: Workspace) -> None:
    """A symbolic link (to a file, or dangling) stays a link; the page is in its target,
    as `backup export --out` writes."""
    target, dangling = ws.base / "target.html", ws.base / "made.html"
    target.write_text("old", encoding="utf-8")
    (ws.base / "link.html").symlink_to(target)
    (ws.base / "dangling.html").symlink_to(dangling)
    for link, dest in (("link.html", target), ("dangling.html", dangling)):
        r = featsync("report", "--html", link, cwd=ws.base)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (ws.base / link).is_symlink()
        assert dest.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_html_replacing_a_private_page_keeps_it_private(ws: Workspace) -> None:
    """The page is renamed over the old one; it keeps the old one's mode (a report
    made 0600 is not opened to every user by the next one); a new page gets 0666 less
    the umask, as any file the user makes."""
    page = ws.base / "private.html"
    page.write_text("old", encoding="utf-8")
    page.chmod(0o600)
    r = featsync("report", "--html", "private.html", cwd=ws.base)
    assert r.returncode == 0, r.stderr[-2000:]
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert stat.S_IMODE(page.stat().st_mode) == 0o600
    umask = ("sh", "-c", 'umask 027 && exec "$@"', "sh")
    made = featsync("report", "--html", "new.html", cwd=ws.base, prefix=umask)
    assert made.returncode == 0, made.stderr[-2000:]
    assert stat.S_IMODE((ws.base / "new.html").stat().st_mode) == 0o640
    assert not [p.name for p in ws.base.iterdir() if p.name.startswith(".featsync-report-")]


CAT = "import shutil, sys; shutil.copyfileobj(open(sys.argv[1], 'rb'), sys.stdout.buffer)"


def test_html_writes_into_a_fifo_and_leaves_it_a_fifo(ws: Workspace) -> None:
    fifo = ws.base / "pipe.html"
    os.mkfifo(fifo)
    got = ws.base / "got.html"
    with got.open("wb") as fh:
        reader = subprocess.Popen([sys.executable, "-c", CAT, str(fifo)], stdout=fh)
    try:
        r = featsync("report", "--html", "pipe.html", cwd=ws.base)
        assert r.returncode == 0, r.stderr[-2000:]
        assert reader.wait(timeout=60) == 0
    finally:
        if reader.poll() is None:
            with open(fifo, "wb"):  # the writer never came: let cat end
                pass
            reader.wait(timeout=60)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_html_destination_is_checked_before_any_probe(ws: Workspace) -> None:
    """A folder, a missing folder and an empty path are refused (exit 2, the option
    named) before the context is opened: a config naming a context kind that cannot be
    reached would say so first otherwise."""
    _config(ws, kind="aspose", base_url="http://127.0.0.1:9/v3.0", context_id="x", max_retries=0)
    env = {"FEATSYNC_CLIENT_ID": "id", "FEATSYNC_CLIENT_SECRET": "s3cr3t-value"}
    (ws.base / "adir").mkdir()
    for dest, why in (("adir", "is a folder"), ("missing/x.html", "does not exist")):
        r = featsync("report", "--probe", "3", "--html", dest, cwd=ws.base, env=env)
        assert r.returncode == 2, r.stderr[-2000:]
        assert "--html" in r.stderr and why in r.stderr, r.stderr[-2000:]
        assert "127.0.0.1:9" not in r.stderr and "find" not in r.stderr.lower()
    r = featsync("report", "--html", "", cwd=ws.base)
    assert r.returncode == 2 and "--html" in r.stderr and "empty path" in r.stderr


# -- 3: thumbnails stay bounded -------------------------------------------------------------


def _png(size: tuple[int, int], mode: str = "1") -> bytes:
    return encode(Image.new(mode, size), "PNG")


def test_a_huge_image_gets_no_thumbnail_and_no_warning() -> None:
    """Judged from the header: above the cap (or Pillow's own bomb limit) TooLarge,
    with nothing decoded and no DecompressionBombWarning (warnings are errors here)."""
    too_large = report_files.TooLarge
    with pytest.raises(too_large, match="7000x7000 pixels: too large for a thumbnail"):
        thumbnail(_png((7000, 7000)), 128, 40_000_000)
    with pytest.raises(too_large, match="too large for a thumbnail"):
        thumbnail(_png((10000, 10000)), 128, 10**12)  # past Pillow's limit
    small = Image.open(__import__("io").BytesIO(thumbnail(_png((6000, 4000), "L"), 128, 10**8)))
    assert max(small.size) == 128


def test_a_thumbnail_of_a_large_image_takes_bounded_memory(tmp_path: Path) -> None:
    """A 6000x6000 RGBA PNG (36 MP, under the cap) is picked down before it is
    converted: one decoded copy (144 MB) is held, not two (a premultiplied one for a
    smooth resize, or an RGB conversion)."""
    src = tmp_path / "big.png"
    code = "import sys; from PIL import Image; Image.new('RGBA', (6000, 6000)).save(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(src)], check=True)
    measure = (
        "import sys, resource\n"
        "from featsync.report_files import thumbnail\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "thumbnail(data, 128, 40_000_000)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", measure, str(src)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr[-2000:]
    grew_mb = int(r.stdout) / 1024
    assert grew_mb < 36 * 4 * 1.3, f"{grew_mb:.0f} MB"  # one decoded copy (232 MB before)


# -- 4: only the context the ledger mirrors is probed ---------------------------------------


def test_probe_refuses_a_context_the_ledger_does_not_mirror(ws: Workspace) -> None:
    _config(ws, kind="local", path="other-context.db")
    r = featsync("report", "--probe", "3", cwd=ws.base)
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    assert "the ledger mirrors" in r.stderr and "other-context.db" in r.stderr
    assert "not found" not in r.stdout and "not among the results" not in r.stdout
    r = featsync("report", cwd=ws.base)  # without a probe: the ledger's figures only
    assert r.returncode == 0, r.stderr[-2000:]


# -- 5: similarities -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 100.5, "NaN", None, [1]])
def test_a_search_result_out_of_0_to_100_is_a_malformed_answer(bad: Any) -> None:
    with pytest.raises(Transient, match="malformed search result"):
        search_results([{"imageId": "a", "similarity": bad}])
    with pytest.raises(Transient, match="malformed search results"):
        search_results(7)
    assert search_results([{"imageId": "a", "similarity": 99.5}])[0].similarity == 99.5


# -- 6, 7, 11: a context that answers badly, slowly, or not at all ---------------------------


@dataclass
class Hostile:
    """A loopback HTTP server speaking just enough of the Aspose protocol: a token, and
    the find answers it is told to give (status, body)."""

    similar: tuple[int, bytes] = (200, b'{"results": []}')
    duplicates: tuple[int, bytes] = (200, b'{"duplicates": []}')
    hold: threading.Event | None = None  # findSimilar waits for it when set
    finds: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    state = Hostile()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if "token" in self.path:
                self._answer(200, b'{"access_token": "t", "expires_in": 3600}')
            elif "findSimilar" in self.path:
                with state.lock:
                    state.finds += 1
                if state.hold is not None:
                    state.hold.wait(60)
                self._answer(*state.similar)
            else:
                self._answer(404, b"{}")

        def do_GET(self) -> None:
            if "findDuplicates" in self.path:
                self._answer(*state.duplicates)
            else:
                self._answer(404, b"{}")

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    state.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, name="hostile-http")
    thread.start()
    try:
        yield state
    finally:
        if state.hold is not None:
            state.hold.set()
        srv.shutdown()
        srv.server_close()
        thread.join()


ENV = {"FEATSYNC_CLIENT_ID": "id", "FEATSYNC_CLIENT_SECRET": "s3cr3t-value"}


def _aspose(ws: Workspace, url: str) -> None:
    """The ledger (synced with the embedded context) unbound, the config on `url`."""
    _sql(ws, "DELETE FROM meta WHERE key = 'context'")
    _config(
        ws,
        kind="aspose",
        base_url=url + "/v3.0",
        auth_url=url + "/connect/token",
        context_id="ctx",
        trust_env=False,
        max_retries=0,
    )


def test_a_probe_the_context_answers_with_garbage_searches_nothing_and_exits_2(
    ws: Workspace, hostile: Hostile
) -> None:
    """NaN similarities, results that are no list: each a malformed answer, counted as a
    failed call, not an answered one; nothing searched: exit 2."""
    _aspose(ws, hostile.url)
    for body in (b'{"results": [{"imageId": "i0.jpg", "similarity": NaN}]}', b'{"results": 5}'):
        hostile.similar = (200, body)
        r = featsync("report", "--json", "--probe", "3", cwd=ws.base, env=ENV)
        _no_traceback(r)
        assert r.returncode == 2, r.stderr[-2000:]
        p = json.loads(r.stdout)["probe"]
        assert p["find_calls"] == 0 and p["failed_calls"] == 3
        assert p["not_finding_themselves"] == []
        assert all("malformed" in x["reason"] for x in p["images"])
        text = featsync("report", "--probe", "3", cwd=ws.base, env=ENV).stdout
        assert "0 find call(s) answered, 3 failed by the Aspose context" in text


def test_a_failing_duplicates_call_is_reported_escaped_and_the_rest_kept(
    ws: Workspace, hostile: Hostile
) -> None:
    """A refusal with terminal escapes in its reason, and an answer of another shape:
    the report is printed with the error (escaped), exit 2, no traceback."""
    _aspose(ws, hostile.url)
    hostile.duplicates = (400, b'{"error": {"code": "Bad", "message": "\\u001b[31mred\\u001b[0m"}}')
    r = featsync("report", "--duplicates", cwd=ws.base, env=ENV)
    _no_traceback(r)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "\x1b" not in r.stdout and "\x1b" not in r.stderr
    assert "near-duplicate groups at 80%: not known:" in r.stdout
    assert "\\x1b[31mred" in r.stdout and f"images: {IMAGES + 1} synced" in r.stdout
    hostile.duplicates = (200, b'{"duplicates": 5}')
    r = featsync("report", "--json", "--duplicates", "90", cwd=ws.base, env=ENV)
    _no_traceback(r)
    assert r.returncode == 2
    d = json.loads(r.stdout)["duplicates"]
    assert d["groups"] == [] and "malformed" in d["error"]


def test_ctrl_c_during_a_probe_reports_what_was_probed_and_exits_130(
    ws: Workspace, hostile: Hostile
) -> None:
    """SIGINT while a find call is in flight: that call finishes, no more are made, the
    report of what was probed is printed, exit 130, no traceback."""
    _aspose(ws, hostile.url)
    hostile.similar = (200, b'{"results": [{"imageId": "zz", "similarity": 50}]}')
    hostile.hold = threading.Event()
    env = {k: v for k, v in os.environ.items() if k != "FEATSYNC_CONFIG"} | ENV
    proc = subprocess.Popen(
        [sys.executable, "-m", "featsync", "report", "--probe", "5"],
        cwd=ws.base,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: hostile.finds >= 1, 60, "the probe's first find call")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "report_stopping" in _peek_stderr(proc), 60, "the stop heard")
        hostile.hold.set()
        out, err = proc.communicate(timeout=60)
    finally:
        hostile.hold.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == 130, err[-2000:]
    assert hostile.finds == 1
    assert "probe of 5 images (stopped after 1)" in out
    assert "stopped (a signal)" in out


def test_ctrl_c_after_the_probe_ended_still_exits_130(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The signal lands after build() has read the stop flag, while the handlers are
    still in place: it was heard, so the exit says so (it was 0)."""
    from featsync import report, report_cli

    real = report.build

    def build_then_ctrl_c(*args: Any, **kwargs: Any) -> dict[str, Any]:
        data = real(*args, **kwargs)
        assert not data["stopped"]
        os.kill(os.getpid(), signal.SIGINT)  # handled before the next line runs
        return data

    monkeypatch.setattr(report_cli, "build", build_then_ctrl_c)
    args = argparse.Namespace(html=None, json=True, probe=None, duplicates=None)
    assert report_cli.run(ws.settings(), args) == 130
    assert json.loads(capsys.readouterr().out)["stopped"] is True


_seen: dict[int, str] = {}


def _peek_stderr(proc: subprocess.Popen[str]) -> str:
    """stderr so far (read without blocking: the log line the stop writes)."""
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    chunk = proc.stderr.read() or ""
    _seen[proc.pid] = _seen.get(proc.pid, "") + chunk
    return _seen[proc.pid]


def test_a_probe_of_files_all_changed_searches_nothing_and_exits_1(ws: Workspace) -> None:
    for n in range(IMAGES):
        _put(ws, f"i{n}.jpg", encode(textured_image(900 + n)))
    (ws.images / "flat.png").unlink()
    r = featsync("report", "--probe", "50", cwd=ws.base)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "0 find call(s) answered by the embedded context" in r.stdout
    assert "the probe searched none of the images it picked" in r.stdout


# -- 8, 12, 13, 16: what the ledger holds ---------------------------------------------------


def test_html_escapes_text_a_hostile_ledger_puts_in_number_columns(
    ws: Workspace, tmp_path: Path
) -> None:
    _sql(
        ws,
        "UPDATE cycles SET added = '<script>alert(1)</script>', failed = '<img src=x>'",
        "UPDATE images SET features_count = '<b>x</b>' WHERE image_id = 'i1.jpg'",
    )
    out = tmp_path / "r.html"
    r = featsync("report", "--html", str(out), cwd=ws.base)
    _no_traceback(r)
    assert r.returncode == 0, r.stderr[-2000:]
    page = out.read_text(encoding="utf-8")
    assert "<script>" not in page and "<img src=x>" not in page and "<b>x" not in page


def test_corrupt_ledger_values_are_shown_as_unknown_never_a_traceback(
    ws: Workspace, tmp_path: Path
) -> None:
    _sql(
        ws,
        "UPDATE images SET features_count = '<b>x' WHERE image_id = 'i0.jpg'",
        "UPDATE history SET at = 'yesterday' WHERE image_id = 'i1.jpg'",
        "UPDATE images SET state = 'failed', last_error = 'boom', error_kind = 'transient', "
        "attempts = 'many', next_attempt_at = 1e20, failed_action = 'add' "
        "WHERE image_id = 'i2.jpg'",
        "UPDATE cycles SET finished_at = -9e999, started_at = 'noon'",
    )
    out = {}
    for args in ((), ("--json",), ("--html", str(tmp_path / "r.html"))):
        r = featsync("report", *args, cwd=ws.base)
        _no_traceback(r)
        assert r.returncode == 1, r.stderr[-2000:]  # i2.jpg is failing
        out[args[:1]] = r.stdout
    doc = json.loads(out[("--json",)])
    assert doc["totals"]["features_unknown"] == 1
    f = next(x for x in doc["failures"] if x["image_id"] == "i2.jpg")
    assert f["attempts"] is None and f["next_attempt_at"] is None
    assert doc["last_cycle"]["finished_at"] is None
    assert "i2.jpg: boom (tries ?, next try -)" in out[()]


def test_a_schema_version_that_is_no_number_exits_2_naming_it(ws: Workspace) -> None:
    _sql(ws, "UPDATE meta SET value = 'abc' WHERE key = 'schema_version'")
    r = featsync("report", cwd=ws.base)
    _no_traceback(r)
    assert r.returncode == 2 and "schema version" in r.stderr, r.stderr[-2000:]


def test_console_says_what_a_plain_verify_leaves_and_lists_withheld_and_old_days(
    ws: Workspace,
) -> None:
    """Drift: what the ledger can know and what it cannot; withheld delete IDs shown;
    activity newest first with "... and N more" past ten days; unknown counts as "?"."""
    day = 86400.0
    _sql(
        ws,
        *(
            (
                "INSERT INTO history (image_id, version, digest, action, features_count, at) "
                "VALUES (?, 1, ?, 'add', 50, ?)",
                (f"old{n}.jpg", f"d{n}", 1.7e9 + n * day),
            )
            for n in range(14)
        ),
        "UPDATE images SET features_count = NULL WHERE image_id = 'flat.png'",
    )
    for n in range(IMAGES):
        (ws.images / f"i{n}.jpg").unlink()
    r = featsync("reconcile", cwd=ws.base)  # 4 of 5 gone: the deletes are withheld
    assert r.returncode in (0, 1), r.stderr[-2000:]
    text = featsync("report", cwd=ws.base).stdout
    assert "a plain `featsync verify` records nothing: run it for the drift there is now" in text
    assert "withheld deletes (`featsync reconcile --confirm-deletes` releases them):" in text
    assert "  i0.jpg" in text.splitlines()
    assert "activity per day, newest first" in text
    assert "  ... and 5 more (--json lists them)" in text  # 15 days, ten shown


# -- 9: sampling a large ledger -------------------------------------------------------------


def test_sampling_counts_copies_by_the_digest_index_not_a_scan_per_row(tmp_path: Path) -> None:
    """On 20,000 synced rows, picking 50 costs about one pass over the rows (SQLite's
    virtual-machine steps, counted by its progress handler), not one pass per pick; and
    the copies of each picked content are counted right."""
    import sqlalchemy as sa

    from featsync.ledger import SqlLedger
    from featsync.report_probe import sample

    url = f"sqlite:///{tmp_path / 'big.db'}"
    SqlLedger(url).close()  # the schema
    n = 20_000
    digest = [f"d{i % (n - 2)}" for i in range(n)]  # d0 and d1 under two IDs each
    _rows = [
        (f"x{i:05d}.jpg", 1, 1, 1, digest[i], 1, "synced", 1, 0, 50, 1.0, 1.0) for i in range(n)
    ]
    db = sqlite3.connect(tmp_path / "big.db")
    db.executemany(
        "INSERT INTO images (image_id, size, mtime_ns, inode, digest, version, state, remote, "
        "attempts, features_count, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        _rows,
    )
    db.commit()
    db.close()

    steps = [0]

    @dataclass
    class Looked:
        engine: sa.Engine

    engine = sa.create_engine(url)

    @sa.event.listens_for(engine, "connect")
    def _count(dbapi: Any, _record: Any) -> None:
        def tick() -> int:
            steps[0] += 1000
            return 0

        dbapi.set_progress_handler(tick, 1000)

    try:
        picked = sample(Looked(engine), 50)  # type: ignore[arg-type]
    finally:
        engine.dispose()
    assert len(picked) == 50
    assert all(p["copies"] == digest.count(p["digest"]) for p in picked)
    assert steps[0] < 40 * n, steps[0]


# -- 16: memory on a large history -------------------------------------------------------------


def test_last_updates_are_compared_a_batch_at_a_time(tmp_path: Path) -> None:
    """20,000 images each updated once: the report's figures hold the worst changes,
    not every image's history (Python's traced peak stays a few MB)."""
    import tracemalloc

    from featsync.ledger import SqlLedger
    from featsync.report_data import gather

    url = f"sqlite:///{tmp_path / 'big.db'}"
    SqlLedger(url).close()
    n = 20_000
    db = sqlite3.connect(tmp_path / "big.db")
    db.executemany(
        "INSERT INTO history (image_id, version, digest, action, features_count, at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        [(f"x{i:05d}.jpg", v, f"d{i}-{v}", a, 60 - v, 1.7e9 + v) for i in range(n)
         for v, a in ((1, "add"), (2, "update"))],
    )  # fmt: skip
    db.commit()
    db.close()
    ledger = SqlLedger(url, read_only=True)
    tracemalloc.start()
    try:
        data = gather(ledger, str(tmp_path / "backups"), 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        ledger.close()
    assert data["last_update_changes"]["updated_images"] == n
    assert data["last_update_changes"]["without_backup"] == n  # no backups kept
    assert peak < 8 * 1024 * 1024, f"{peak / 1e6:.1f} MB"


def test_unknown_features_counts_and_long_reasons_read_whole(
    ws: Workspace, hostile: Hostile
) -> None:
    """Against Aspose the ledger knows no features count: "?" (never "None"); a
    placeholder's reason is wrapped at word boundaries, not cut mid-word."""
    import base64
    import re

    from featsync.report_html import _placeholder

    _aspose(ws, hostile.url)
    _sql(ws, "UPDATE images SET features_count = NULL")
    hostile.similar = (200, b'{"results": [{"imageId": "zz", "similarity": 50}]}')
    r = featsync("report", "--probe", "2", cwd=ws.base, env=ENV)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "(? features): not among the results; first: zz (50.0)" in r.stdout
    assert "None" not in r.stdout
    why = "cannot open it: Permission denied while reading the extraordinarily long name"
    svg = base64.b64decode(_placeholder(why).split(",", 1)[1]).decode()
    shown = re.findall(r"<tspan[^>]*>([^<]*)</tspan>", svg)
    assert " ".join(shown) == why
