"""`featsync report`: a real folder synced by real `featsync reconcile` subprocesses, its
report read as text, as JSON (every figure checked against what was set up), with
--probe and --duplicates against the embedded context and through `featsync serve`,
as HTML (self-contained, thumbnails bounded), beside a running daemon, and read-only."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from featsync.ledger import SqlLedger
from featsync.report_files import Folder, NotRead
from featsync.samples import encode, textured_image
from featsync.scan import ScanRules
from tests.conftest import Server, Workspace, set_mtime_past, wait_for
from tests.test_cli import featsync

GOOD = 12  # textured images a.jpg ... (one of them updated, one deleted)


@dataclass
class Built:
    ws: Workspace
    updated: str  # an image updated to a much smaller one (a drop in features)
    deleted: str
    weak: str  # a flat image: no features
    corrupt: str  # fails: cannot be decoded
    copy: str  # an exact duplicate of `original`
    original: str
    resized: str  # a near duplicate of `original` (a resized copy)
    replaced: str  # its features replaced by hand with another image's
    changed: str  # its file changed after the last sync


def _put(ws: Workspace, rel: str, data: bytes) -> None:
    path = ws.images / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    set_mtime_past(path)


def _sync(ws: Workspace, env: dict[str, str] | None = None) -> None:
    r = featsync("reconcile", cwd=ws.base, env=env)
    assert r.returncode in (0, 1), r.stderr[-2000:]  # 1: the corrupt file fails


def _build(ws: Workspace, env: dict[str, str] | None = None) -> Built:
    names = [f"{chr(ord('a') + n)}.jpg" for n in range(GOOD)]
    for n, name in enumerate(names):
        _put(ws, name, encode(textured_image(100 + n)))
    _put(ws, "sub/flat.png", encode(Image.new("RGB", (200, 150), (90, 120, 150)), "PNG"))
    _put(ws, "sub/corrupt.jpg", b"\xff\xd8\xff\xe0 this is no JPEG " * 4)
    _put(ws, "sub/copy.jpg", (ws.images / "a.jpg").read_bytes())
    _put(ws, "sub/resized.jpg", encode(textured_image(100).resize((288, 216))))
    _sync(ws, env)
    _put(ws, "b.jpg", encode(textured_image(900, (110, 80))))  # update: fewer features
    (ws.images / "c.jpg").unlink()
    _sync(ws, env)
    r = featsync(
        "features", "update", "d.jpg", "--file", str(ws.images / "e.jpg"), cwd=ws.base, env=env
    )
    assert r.returncode == 0, r.stderr
    _put(ws, "f.jpg", encode(textured_image(901)))  # changed, not synced again
    return Built(
        ws, "b.jpg", "c.jpg", "sub/flat.png", "sub/corrupt.jpg", "sub/copy.jpg", "a.jpg",
        "sub/resized.jpg", "d.jpg", "f.jpg",
    )  # fmt: skip


def _config(ws: Workspace, **context: Any) -> None:
    sections: dict[str, dict[str, Any]] = {
        "sync": {"folder": "images", "concurrency": 2, "min_features": 10},
        "log": {"format": "json"},
    }
    if context:
        sections["context"] = context
    ws.write_config(**sections)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    ws = Workspace(tmp_path_factory.mktemp("report"))
    ws.images.mkdir()
    _config(ws)
    return _build(ws)


def _report(ws: Workspace, *args: str, env: dict[str, str] | None = None) -> Any:
    r = featsync("report", "--json", *args, cwd=ws.base, env=env)
    assert r.returncode in (0, 1), r.stderr[-2000:]
    doc = json.loads(r.stdout)
    doc["_exit"] = r.returncode
    return doc


def _ledger_counts(ws: Workspace) -> dict[str, int | None]:
    ledger = SqlLedger(ws.settings().ledger.url, read_only=True)
    try:
        with ledger.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT image_id, features_count FROM images WHERE state = 'synced'"
            ).all()
        return {r[0]: r[1] for r in rows}
    finally:
        ledger.close()


ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


def test_json_has_every_figure_as_set_up(built: Built) -> None:
    """Totals, features distribution, weak, drops, last updates, failures, exact
    duplicates and activity match the folder's history; times are ISO 8601."""
    ws = built.ws
    doc = _report(ws)
    counts = _ledger_counts(ws)
    synced = GOOD - 1 + 3  # a..l less the deleted one, plus flat, copy, resized
    assert len(counts) == synced
    t = doc["totals"]
    assert (t["synced"], t["failed"], t["deleted"], t["withheld"]) == (synced, 1, 1, 0)
    assert t["weak"] == sum(1 for c in counts.values() if c is not None and c < 10) >= 1
    assert doc["_exit"] == 1  # a failing image needs attention

    known = sorted(c for c in counts.values() if c is not None)
    f = doc["features"]
    assert (f["images"], f["min"], f["max"]) == (len(known), known[0], known[-1])
    assert f["median"] == known[(len(known) + 1) // 2 - 1]
    assert sum(b["count"] for b in f["histogram"]) == len(known)

    assert doc["weak"][0] == {
        "image_id": built.weak,
        "features_count": counts[built.weak],
        "relpath": built.weak,
    }
    assert [w["features_count"] for w in doc["weak"]] == sorted(
        w["features_count"] for w in doc["weak"]
    )

    drop = {d["image_id"]: d for d in doc["drops"]["worst"]}[built.updated]
    assert (drop["from_version"], drop["to_version"]) == (1, 2)
    assert drop["to_count"] == counts[built.updated] < drop["from_count"]
    assert drop["drop"] == drop["from_count"] - drop["to_count"] and ISO.match(drop["at"])

    change = {c["image_id"]: c for c in doc["last_update_changes"]["worst"]}[built.updated]
    assert change["before"] == drop["from_count"]  # the backup of v1, taken before the update
    assert change["after"] == counts[built.updated]
    assert change["change"] == change["after"] - change["before"]

    (failure,) = doc["failures"]
    assert failure["image_id"] == built.corrupt and failure["attempts"] == 1
    assert "decode" in failure["error"] and ISO.match(failure["next_attempt_at"])

    dup = doc["exact_duplicates"]
    assert (dup["groups"], dup["images"], dup["extra_copies"]) == (1, 2, 1)
    assert dup["list"][0]["image_ids"] == sorted([built.original, built.copy])

    (today,) = doc["activity"]
    assert (today["added"], today["updated"], today["deleted"]) == (GOOD + 3, 1, 1)
    assert today["failed"] == 2  # the corrupt file failed in both full cycles
    assert ISO.match(doc["generated_at"]) and ISO.match(doc["last_cycle"]["finished_at"])
    assert doc["context_identity"].startswith("local store ")
    assert doc["verify"]["drift_marks"] == 0 and doc["probe"] is None
    assert (doc["syncing"], doc["syncing_pid"]) == (False, None)
    assert doc["backups"]["backups"] >= 2  # before the update and the delete


def test_console_summary_says_it_in_words(built: Built) -> None:
    r = featsync("report", cwd=built.ws.base)
    assert r.returncode == 1, r.stderr
    out = r.stdout
    assert "images: 14 synced" in out and "1 failed" in out and "1 deleted" in out
    assert f"  {built.weak}: 0 features" in out
    assert f"failing:\n  {built.corrupt}: cannot decode" in out
    assert f"  {built.copy}, {built.original}" in out or f"  {built.original}, {built.copy}" in out
    assert "biggest drops in features between versions (1 images)" in out
    assert "features per image (14 synced images): min 0" in out


def test_probe_finds_images_and_flags_one_whose_features_are_not_its_own(built: Built) -> None:
    """Every synced image is probed: the one whose features were replaced by hand does
    not find itself; the one changed since its sync is said to be changed, not lost."""
    doc = _report(built.ws, "--probe", "100")
    p = doc["probe"]
    outcome = {x["image_id"]: x for x in p["images"]}
    assert len(outcome) == 14
    lost = [x["image_id"] for x in p["not_finding_themselves"]]
    assert lost == sorted([built.replaced, built.weak])  # its file, another's features; flat
    assert outcome[built.changed]["outcome"] == "changed"
    assert outcome[built.original]["outcome"] == "found_first"
    assert outcome[built.copy]["outcome"] == "found_first"  # tied with its exact duplicate
    assert outcome[built.original]["similarity"] == 100.0
    assert outcome[built.weak]["features_count"] == 0
    searched = 14 - 1  # all but the changed file
    assert p["find_calls"] == searched
    assert sum(p["outcomes"].values()) == 14
    assert doc["_exit"] == 1
    text = featsync("report", "--probe", "100", cwd=built.ws.base).stdout
    assert f"{searched} find call(s) answered by the embedded context" in text
    assert "do not find themselves (might need feature updates):\n  d.jpg (" in text


def test_duplicates_finds_the_resized_copy(built: Built) -> None:
    doc = _report(built.ws, "--duplicates", "50")
    groups = [{m["image_id"] for m in g} for g in doc["duplicates"]["groups"]]
    assert {built.original, built.copy, built.resized} in groups
    assert doc["duplicates"]["threshold"] == 50


def test_html_is_self_contained_with_bounded_thumbnails(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    r = featsync("report", "--probe", "100", "--html", str(out), cwd=built.ws.base)
    assert r.returncode == 1, r.stderr
    text = out.read_text(encoding="utf-8")
    links = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", text, re.IGNORECASE)
    assert links and all(link.startswith("data:") for link in links)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert not re.search(r"https?://", text)
    pngs = re.findall(r"<figure><img src='data:image/png;base64,([^']+)' alt='([^']+)'", text)
    shown = {alt for _data, alt in pngs}
    assert built.weak in shown and built.replaced in shown  # weak, and not finding itself
    for data, _alt in pngs:
        with Image.open(io.BytesIO(base64.b64decode(data))) as img:
            assert max(img.size) <= 128
    # the corrupt file cannot be decoded: a placeholder, no crash
    assert re.search(rf"data:image/svg\+xml;base64,[^']+' alt='{re.escape(built.corrupt)}'", text)
    assert text.count("<img class='chart'") >= 3  # features, probe, activity


def test_report_reads_only(built: Built, tmp_path: Path) -> None:
    """Nothing of the ledger, the backups or the context changes; a folder never synced
    gets no ledger, no store, no backups."""
    s = built.ws.settings()
    files = [s.ledger.url.removeprefix("sqlite:///"), s.context.path]
    before = {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}
    _report(built.ws, "--probe", "3", "--duplicates")
    assert before == {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}

    fresh = Workspace(tmp_path)
    fresh.images.mkdir()
    _config(fresh)
    doc = _report(fresh)
    assert doc["totals"]["synced"] == 0 and doc["last_cycle"] is None
    assert sorted(os.listdir(tmp_path)) == ["featsync.toml", "images"]


def test_bad_arguments_name_the_option(built: Built) -> None:
    for args in (["--probe", "0"], ["--duplicates", "150"]):
        r = featsync("report", *args, cwd=built.ws.base)
        assert r.returncode == 2 and args[0] in r.stderr and repr(args[1]) in r.stderr
    r = featsync(
        "report", "--html", str(built.ws.base / "no" / "such" / "r.html"), cwd=built.ws.base
    )
    assert r.returncode == 2 and "--html" in r.stderr


def test_files_outside_the_folder_are_never_read(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"outside")
    (root / "in" / "ok.jpg").write_bytes(b"inside")
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "out").symlink_to(tmp_path)
    rules = ScanRules(str(root), frozenset({"jpg"}), (".*",))
    folder = Folder(rules, 1 << 20)
    assert folder.read("in/ok.jpg") == b"inside"
    for bad in ("../secret.jpg", "/etc/passwd.jpg", "link.jpg", "out/secret.jpg", "in/../x.jpg"):
        with pytest.raises(NotRead):
            folder.read(bad)
    with pytest.raises(NotRead, match="not a file the scan syncs"):
        folder.read("in/ok.txt")
    follow = Folder(ScanRules(str(root), frozenset({"jpg"}), (), follow_symlinks=True), 1 << 20)
    with pytest.raises(NotRead, match="outside the folder"):
        follow.read("link.jpg")


def test_report_beside_a_running_daemon(built: Built, tmp_path: Path) -> None:
    """A report runs while a daemon holds the sync lock, names it, and does not hold it
    up: a file added meanwhile is still synced."""
    from tests.test_daemon import DAEMON, Daemons

    ws = Workspace(tmp_path)
    shutil.copytree(built.ws.images, ws.images)
    ws.write_config(
        sync={"folder": "images", "concurrency": 2}, log={"format": "json"}, daemon=dict(DAEMON)
    )
    daemons = Daemons(ws)
    try:
        run = daemons.start()
        wait_for(lambda: bool(run.events("cycle_finished")), 60, "the daemon's first cycle")
        doc = _report(ws, "--probe", "2")
        assert doc["syncing"] is True and doc["syncing_pid"] == run.proc.pid
        _put(ws, "new.jpg", encode(textured_image(777)))
        started = time.monotonic()
        while time.monotonic() - started < 60:
            _report(ws)  # reports, one after another, while the daemon syncs
            if "new.jpg" in _ledger_counts(ws):
                break
        assert "new.jpg" in _ledger_counts(ws)
    finally:
        daemons.close()


def test_probe_through_featsync_serve(tmp_path: Path, server: Server) -> None:
    """The Aspose path: the probe's find calls go over HTTP to `featsync serve`."""
    from tests.test_aspose import CREDS, requests_for, use_server

    ws = Workspace(tmp_path)
    ws.images.mkdir()
    context_id = use_server(ws, server)
    for n in range(4):
        _put(ws, f"s{n}.jpg", encode(textured_image(300 + n)))
    _sync(ws, CREDS)
    before = len(requests_for(server, context_id))
    doc = _report(ws, "--probe", "10", env=CREDS)
    p = doc["probe"]
    assert doc["context_kind"] == "aspose" and p["find_calls"] == 4
    assert p["outcomes"] == {"found_first": 4}
    finds = [e for e in requests_for(server, context_id)[before:] if "findSimilar" in e["path"]]
    assert len(finds) == 4
    text = featsync("report", "--probe", "10", cwd=ws.base, env=CREDS).stdout
    assert "4 find call(s) answered by the Aspose context" in text
