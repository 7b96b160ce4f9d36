"""What `reconcile` tells a script and a person (issue 12): `--json` (the cycle's result,
or with `--dry-run` the plan, each action with its reason), the dry run grouped with
renames paired, Ctrl-C recorded as an interrupted cycle, and a wrong Aspose secret
noticed even when there is nothing to send."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from featsync import logs
from featsync.engine import Engine
from featsync.ledger import SqlLedger
from featsync.lock import SyncLock
from featsync.model import Action, Kind, LocalFile
from featsync.plan import renames
from featsync.plan_text import RESYNC
from featsync.schema import SCHEMA_VERSION
from tests.conftest import (
    CLIENT_SECRET,
    Server,
    Workspace,
    set_mtime_past,
    start_server,
    wait_for,
)
from tests.test_aspose import CREDS, odd_server, use_server
from tests.test_cli import featsync, json_lines


def _images(ws: Workspace, n: int) -> None:
    for i in range(n):
        set_mtime_past(ws.image(f"i{i:02}.jpg", i))


@contextlib.contextmanager
def slow_serve(ws: Workspace, tmp_path: Path, images: int) -> Iterator[Server]:
    """The workspace synced through `featsync serve --latency 0.2` at concurrency 2,
    `images` images in its folder: slow enough to be stopped in the middle."""
    srv = start_server(tmp_path / "slow", "--latency", "0.2")
    try:
        use_server(ws, srv)
        ws.write_config(**{**ws.overrides, "sync": {"folder": "images", "concurrency": 2}})
        _images(ws, images)
        yield srv
    finally:
        srv.stop()


def _broken(ws: Workspace, name: str = "broken.jpg") -> None:
    path = ws.images / name
    path.write_bytes(b"\x00" * 64)
    set_mtime_past(path)


def _one_document(stdout: str) -> dict[str, Any]:
    """stdout holds one JSON document and nothing else (json.loads refuses extra data)."""
    data: dict[str, Any] = json.loads(stdout)
    return data


def _iso_with_zone(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text)
    assert t.tzinfo is not None, text
    return t


def test_reconcile_json_prints_the_cycles_result(ws: Workspace) -> None:
    _images(ws, 3)
    _broken(ws)
    r = featsync("reconcile", "--json", cwd=ws.base)
    assert r.returncode == 1, r.stderr
    data = _one_document(r.stdout)
    assert data["counts"] == {
        "added": 3,
        "updated": 0,
        "deleted": 0,
        "unchanged": 0,
        "failed": 1,
        "withheld_deletes": 0,
        "deferred": 0,
        "not_sent": 0,
        "weak": 0,
    }
    [failure] = data["failures"]
    assert failure["image_id"] == "broken.jpg" and "cannot decode" in failure["error"]
    assert data["in_step"] is False and data["complete"] is True
    assert data["interrupted"] is False and data["error"] is None
    started, finished = _iso_with_zone(data["started_at"]), _iso_with_zone(data["finished_at"])
    assert started <= finished
    assert isinstance(data["duration_ms"], float)
    # the logs stay on stderr, as they were
    assert [e["event"] for e in json_lines(r.stderr)].count("cycle_finished") == 1


def test_reconcile_json_says_which_deletes_are_withheld_and_how_to_release_them(
    ws: Workspace,
) -> None:
    _images(ws, 3)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    (ws.images / "i00.jpg").unlink()
    (ws.images / "i01.jpg").unlink()  # 2 of 3: past max_delete_fraction = 0.5
    r = featsync("reconcile", "--json", cwd=ws.base)
    assert r.returncode == 1, r.stderr
    withheld = _one_document(r.stdout)["withheld_deletes"]
    assert withheld["image_ids"] == ["i00.jpg", "i01.jpg"]
    assert "max_delete_fraction" in withheld["reason"]
    assert withheld["release"] == "featsync reconcile --confirm-deletes"
    text = featsync("reconcile", "--dry-run", cwd=ws.base)
    lines = text.stdout.splitlines()
    assert "withheld delete (2):" in lines and "  withheld delete i00.jpg" in lines, lines
    assert lines[-1] == "to send the withheld deletes: featsync reconcile --confirm-deletes"


def _changes(ws: Workspace) -> None:
    """From a synced i00..i04: i00 renamed, i01 changed, i02 gone, a new file, and the
    broken file (failed before) cleared for another try."""
    (ws.images / "i00.jpg").rename(ws.images / "moved.jpg")
    set_mtime_past(ws.image("i01.jpg", 101))
    (ws.images / "i02.jpg").unlink()
    set_mtime_past(ws.image("new.jpg", 102))
    assert featsync("retry", "broken.jpg", cwd=ws.base).returncode == 0


def test_dry_run_json_gives_each_action_its_reason(ws: Workspace) -> None:
    _images(ws, 5)
    _broken(ws)
    assert featsync("reconcile", cwd=ws.base).returncode == 1  # broken.jpg failed
    ledger = ws.ledger()
    try:
        old = ledger.load()["i01.jpg"].digest
    finally:
        ledger.close()
    _changes(ws)
    r = featsync("reconcile", "--dry-run", "--json", cwd=ws.base)
    assert r.returncode == 1, r.stderr
    plan = _one_document(r.stdout)
    by_id = {(a["kind"], a["image_id"]): a for a in plan["actions"]}
    assert by_id["add", "new.jpg"]["reason"] == "new file"
    assert by_id["add", "new.jpg"]["path"] == "new.jpg"
    changed = by_id["update", "i01.jpg"]
    assert changed["reason"] == "content changed" and changed["old_digest"] == old
    assert len(changed["new_digest"]) == 64 and changed["new_digest"] != old
    assert by_id["delete", "i02.jpg"] == {
        "kind": "delete",
        "image_id": "i02.jpg",
        "path": None,
        "reason": "file gone",
    }
    assert by_id["add", "broken.jpg"]["reason"] == "retry of a failed add (1 tries)"
    # the rename: still a delete and an add, each saying what it stands for
    assert by_id["delete", "i00.jpg"]["renamed_to"] == "moved.jpg"
    assert by_id["add", "moved.jpg"]["renamed_from"] == "i00.jpg"
    [pair] = plan["renames"]
    assert (pair["from"], pair["to"], pair["path"]) == ("i00.jpg", "moved.jpg", "moved.jpg")
    assert plan["counts"]["add"] == 3 and plan["counts"]["delete"] == 2
    assert plan["counts"]["rename"] == 1 and plan["counts"]["unchanged"] == 2
    assert plan["in_step"] is False and plan["complete"] is True
    assert r.stderr.count("\n") == len(json_lines(r.stderr))  # logs: JSON lines on stderr


def test_dry_run_text_groups_by_kind_and_pairs_each_rename_once(ws: Workspace) -> None:
    _images(ws, 5)
    set_mtime_past(ws.image("twin.jpg", 3))  # the same content as i03.jpg
    _broken(ws)
    assert featsync("reconcile", cwd=ws.base).returncode == 1
    _changes(ws)
    (ws.images / "i03.jpg").unlink()  # its content stays (twin.jpg): no rename to a file there
    set_mtime_past(ws.image("copy-of-i00.jpg", 0))  # a second file of i00's content
    r = featsync("reconcile", "--dry-run", cwd=ws.base)
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert lines[lines.index("rename (1):") + 1] == "  rename  i00.jpg -> copy-of-i00.jpg"
    add = lines.index("add (3):")  # the other file of i00's content is an add as any
    assert lines[add + 1 : add + 4] == [
        "  add     broken.jpg  (retry of a failed add (1 tries))",
        "  add     moved.jpg  (new file)",
        "  add     new.jpg  (new file)",
    ]
    assert lines[lines.index("update (1):") + 1].startswith("  update  i01.jpg  (content changed: ")
    delete = lines.index("delete (2):")
    assert lines[delete + 1 : delete + 3] == [
        "  delete  i02.jpg  (file gone)",
        "  delete  i03.jpg  (file gone)",
    ]
    assert not any("delete  i00.jpg" in x for x in lines)  # shown once, as the rename
    assert lines[-1].startswith("plan: 4 add, 1 update, 3 delete, 2 unchanged, 0 withheld; 1 ")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_reconcile_exits_128_plus_the_signal_and_is_recorded_interrupted(
    ws: Workspace, tmp_path: Path, signum: int
) -> None:
    with slow_serve(ws, tmp_path, 40):
        proc = subprocess.Popen(
            [sys.executable, "-m", "featsync", "reconcile", "--config", str(ws.config_path)],
            cwd=ws.base,
            env={**_env(), **CREDS},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        assert proc.stderr is not None
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
        reader.start()
        try:
            wait_for(lambda: any('"image_added"' in x for x in lines), 60, "a first outcome")
            proc.send_signal(signum)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            reader.join(30)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        err = "".join(lines)
        assert proc.returncode == 128 + signum, err
        assert "Traceback" not in err
        [done] = [e for e in json_lines(err) if e["event"] == "cycle_finished"]
        assert done["interrupted"] is True and done["not_sent"] > 0, done
        status = featsync("status", cwd=ws.base, env=CREDS)
        assert status.returncode == 1  # an interrupted cycle left work
        [last] = [x for x in status.stdout.splitlines() if x.startswith("last cycle:")]
        assert "interrupted" in last, last
        data = json.loads(featsync("status", "--json", cwd=ws.base, env=CREDS).stdout)
        assert data["last_cycle"]["interrupted"] is True
        again = featsync("reconcile", cwd=ws.base, env=CREDS)  # the rest, not interrupted
        assert again.returncode == 0, again.stderr
        assert (
            json.loads(featsync("status", "--json", cwd=ws.base).stdout)["last_cycle"][
                "interrupted"
            ]
            is False
        )


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "FEATSYNC_CONFIG"}


def test_a_ledger_of_schema_2_gets_the_interrupted_column_in_place(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    SqlLedger(f"sqlite:///{db}").close()
    with sqlite3.connect(db) as conn:  # what featsync wrote before cycles.interrupted
        conn.execute("ALTER TABLE cycles DROP COLUMN interrupted")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        conn.execute(
            "INSERT INTO cycles (started_at, finished_at, complete, added, updated, deleted, "
            "unchanged, failed, withheld_deletes, duration_ms) "
            "VALUES (1, 2, 1, 5, 0, 0, 0, 0, 0, 9)"
        )
    ledger = SqlLedger(f"sqlite:///{db}")
    try:
        assert ledger.schema_version() == SCHEMA_VERSION == 3
        last = ledger.last_cycle()
    finally:
        ledger.close()
    assert last is not None and last["added"] == 5 and last["interrupted"] is None


def test_a_wrong_client_secret_exits_2_even_with_nothing_to_send(
    ws: Workspace, tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "auth")
    try:
        use_server(ws, srv)  # an empty folder: a plan of nothing, no call to the context
        wrong = "not-the-secret-5b2e"
        env = {**CREDS, "FEATSYNC_CLIENT_SECRET": wrong}
        good = featsync("reconcile", cwd=ws.base, env=CREDS)
        assert good.returncode == 0, good.stderr
        for args in (("reconcile",), ("reconcile", "--json")):
            r = featsync(*args, cwd=ws.base, env=env)
            assert r.returncode == 2, (args, r.stderr)
            assert "refused client" in r.stderr and "check the client ID and secret" in r.stderr
            assert wrong not in r.stderr + r.stdout and CLIENT_SECRET not in r.stderr + r.stdout
        assert _one_document(r.stdout)["in_step"] is False  # --json: the error in its result
        assert "refused client" in _one_document(r.stdout)["error"]
        # a dry run calls no service (it plans offline, as ever): no check, the plan
        dry = featsync("reconcile", "--dry-run", cwd=ws.base, env=env)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.startswith("plan: 0 add"), dry.stdout
    finally:
        srv.stop()


def test_verify_json_has_numbers_as_numbers(ws: Workspace) -> None:
    _images(ws, 2)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    r = featsync("verify", "--json", cwd=ws.base)
    assert r.returncode == 0, r.stderr
    data = _one_document(r.stdout)
    assert data["checked"] == 2 and data["pending"] == 0 and data["marked"] == 0
    assert data["by_kind"] == {} and data["stopped"] is None


def test_a_cycle_ended_by_a_fatal_error_still_prints_its_result_as_json(ws: Workspace) -> None:
    """The base_url answers 405 to every call (not the API): the cycle stops after a few
    calls and exits 2; --json still prints one document, with what was done and why
    it ended."""
    env = {"FEATSYNC_CLIENT_ID": "me", "FEATSYNC_CLIENT_SECRET": "s3cret-not-to-show"}
    with odd_server() as (srv, _client):
        srv.fallback = (405, b"Method Not Allowed")
        ws.write_config(
            sync={"folder": "images", "concurrency": 2},
            context={
                "kind": "aspose",
                "base_url": srv.url + "/v3.0",
                "auth_url": srv.url + "/connect/token",
                "context_id": "c1",
                "trust_env": False,
                "max_retries": 1,
                "backoff_max": 0.1,
            },
        )
        _images(ws, 4)
        r = featsync("reconcile", "--json", cwd=ws.base, env=env)
    assert r.returncode == 2, r.stderr
    data = _one_document(r.stdout)
    assert "base_url" in data["error"] and data["in_step"] is False, data
    assert data["counts"]["added"] == 0
    assert "s3cret-not-to-show" not in r.stdout + r.stderr


def _add(image_id: str, digest: str) -> Action:
    return Action(Kind.ADD, image_id, LocalFile(image_id, image_id, 1, 1, 1, digest), 0)


@given(
    st.lists(st.sampled_from("abc"), max_size=6),
    st.lists(st.sampled_from("abcd"), max_size=6),
)
def test_each_action_is_in_one_rename_at_most_and_only_of_the_same_content(
    added: list[str], gone: list[str]
) -> None:
    """Adds of content a, b, c and deletes whose ledger content is a..d: every pair is
    a delete and an add of the same content, no action is in two pairs, and as many
    pairs as the two sides can match."""
    adds = [_add(f"new{i}", d) for i, d in enumerate(added)]
    deletes = [Action(Kind.DELETE, f"old{i}", None, 1) for i in range(len(gone))]
    digests = {f"old{i}": d for i, d in enumerate(gone)}
    pairs = renames([*adds, *deletes], digests)
    assert all(d.kind is Kind.DELETE and a.kind is Kind.ADD for d, a in pairs)
    assert all(a.file is not None and digests[d.image_id] == a.file.digest for d, a in pairs)
    used = [x.image_id for pair in pairs for x in pair]
    assert len(used) == len(set(used))
    assert len(pairs) == sum(min(added.count(c), gone.count(c)) for c in "abc")


def test_an_add_of_unknown_content_is_no_rename() -> None:
    """A file never read (too big: no digest) pairs with nothing, not even another."""
    pairs = renames([_add("new", ""), Action(Kind.DELETE, "old", None, 1)], {"old": ""})
    assert pairs == []


def _free_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _with_context(ws: Workspace, **changes: Any) -> None:
    ws.write_config(**{**ws.overrides, "context": {**ws.overrides["context"], **changes}})


def test_json_says_why_a_run_failed_before_its_cycle_in_the_results_shape(
    ws: Workspace,
) -> None:
    """`reconcile --json | jq -e .in_step` must not pass on a run that failed: one
    document, of the same keys as a cycle's result, with in_step false and the error."""
    _images(ws, 1)
    normal = _one_document(featsync("reconcile", "--json", cwd=ws.base).stdout)
    lock = SyncLock(ws.settings().ledger.url, role="daemon")  # as a daemon syncing
    lock.acquire()
    try:
        r = featsync("reconcile", "--json", cwd=ws.base)
    finally:
        lock.release()
    assert r.returncode == 2, r.stderr
    held = _one_document(r.stdout)
    assert set(held) == set(normal), held
    assert held["in_step"] is False and held["complete"] is False
    assert held["error"] and str(os.getpid()) in held["error"], held
    assert held["counts"] == dict.fromkeys(normal["counts"], 0)
    plan = _one_document(featsync("reconcile", "--dry-run", "--json", cwd=ws.base).stdout)
    r = featsync("reconcile", "--dry-run", "--resync", "--json", cwd=ws.base)
    assert r.returncode == 2, r.stderr
    refused = _one_document(r.stdout)  # a dry run's failure: the dry run's shape
    assert set(refused) == set(plan) and refused["in_step"] is False
    assert "--resync" in refused["error"] and refused["actions"] == []


def test_json_says_why_the_scan_was_incomplete(ws: Workspace) -> None:
    ws.write_config(sync={"folder": "nowhere"})  # a new ledger, and no folder
    r = featsync("reconcile", "--json", cwd=ws.base)
    assert r.returncode == 1, r.stderr
    data = _one_document(r.stdout)
    assert data["complete"] is False and data["error"] is None
    [problem] = data["problems"]
    assert "nowhere" in problem and "missing" in problem, problem
    dry = _one_document(featsync("reconcile", "--dry-run", "--json", cwd=ws.base).stdout)
    assert dry["problems"] == [problem] and dry["complete"] is False
    assert dry["error"] is None


def test_a_token_endpoint_down_is_a_warning_and_the_cycle_goes_on(
    ws: Workspace, tmp_path: Path
) -> None:
    """Only a refused credential stops a run before its scan: an outage of the token
    endpoint is a warning (a cycle with nothing to send needs no token), and a dry run
    plans with the whole service down, as it always did."""
    srv = start_server(tmp_path / "srv")
    try:
        use_server(ws, srv)
        _images(ws, 2)
        assert featsync("reconcile", cwd=ws.base, env=CREDS).returncode == 0
        _with_context(ws, auth_url=f"http://127.0.0.1:{_free_port()}/token", max_retries=0)
        r = featsync("reconcile", "--json", cwd=ws.base, env=CREDS)
        assert r.returncode == 0, r.stderr
        [warning] = [e for e in json_lines(r.stderr) if e["event"] == "access_not_checked"]
        assert "token endpoint" in warning["error"], warning
        assert _one_document(r.stdout)["in_step"] is True
    finally:
        srv.stop()
    dry = featsync("reconcile", "--dry-run", cwd=ws.base, env=CREDS)  # the server is gone
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("plan: 0 add, 0 update, 0 delete, 2 unchanged"), dry.stdout


def test_ctrl_c_while_the_token_endpoint_hangs_stops_the_run_at_once(
    ws: Workspace, tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "srv")
    silent = socket.socket()  # takes connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    silent.settimeout(60)
    try:
        use_server(ws, srv)
        _images(ws, 1)
        assert featsync("reconcile", cwd=ws.base, env=CREDS).returncode == 0
        port = silent.getsockname()[1]
        _with_context(ws, auth_url=f"http://127.0.0.1:{port}/token", read_timeout=600.0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "featsync", "reconcile", "--json"],
            cwd=ws.base,
            env={**_env(), **CREDS},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            conn, _ = silent.accept()  # the token is being fetched
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
            conn.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        silent.close()
        srv.stop()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err
    data = _one_document(out)  # stopped before its scan: the result's shape all the same
    normal = _one_document(featsync("reconcile", "--json", cwd=ws.base, env=CREDS).stdout)
    assert set(data) == set(normal), data
    assert data["interrupted"] is True and data["in_step"] is False and data["error"]


def test_the_daemon_with_a_refused_secret_exits_2_at_its_start(
    ws: Workspace, tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "srv")
    try:
        use_server(ws, srv)
        _images(ws, 1)  # bound and in step: no cycle would ever call the context
        assert featsync("reconcile", cwd=ws.base, env=CREDS).returncode == 0
        wrong = "not-the-secret-77a1"
        r = featsync("run", cwd=ws.base, env={**CREDS, "FEATSYNC_CLIENT_SECRET": wrong})
    finally:
        srv.stop()
    assert r.returncode == 2, r.stderr
    assert "refused client" in r.stderr and wrong not in r.stderr


def test_after_an_interrupted_resync_the_dry_run_says_the_images_are_sent_again(
    ws: Workspace,
) -> None:
    _images(ws, 2)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    ledger = ws.ledger()
    try:  # what `--resync` records before it sends anything
        ledger.resync(ledger.context_identity() or "", time.time())
    finally:
        ledger.close()
    plan = _one_document(featsync("reconcile", "--dry-run", "--json", cwd=ws.base).stdout)
    assert [a["reason"] for a in plan["actions"]] == [RESYNC, RESYNC], plan["actions"]
    assert all("old_digest" not in a for a in plan["actions"])
    text = featsync("reconcile", "--dry-run", cwd=ws.base).stdout
    assert f"i00.jpg  ({RESYNC})" in text and "content changed" not in text, text


def test_the_dry_run_escapes_control_characters_of_file_names(ws: Workspace) -> None:
    set_mtime_past(ws.image("two\nlines.jpg", 1))
    set_mtime_past(ws.image("title\x1b]0;pwned\x07.jpg", 2))
    r = featsync("reconcile", "--dry-run", cwd=ws.base)
    assert r.returncode == 1, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    lines = r.stdout.splitlines()
    assert "  add     two\\nlines.jpg  (new file)" in lines, lines
    assert "  add     title\\x1b]0;pwned\\x07.jpg  (new file)" in lines, lines


def test_the_send_phase_is_said_before_its_first_outcome(ws: Workspace) -> None:
    """The sending line opens when sending starts (0 of N), not at the first result:
    else the scan's line stays up, stale, while the first image goes."""
    _images(ws, 2)
    told: list[tuple[str, int, int | None, int]] = []
    ledger, context = ws.ledger(), ws.context()
    try:
        engine = Engine(ws.settings(), ledger, context, logs.get(), sink=lambda *a: told.append(a))
        engine.cycle()
    finally:
        context.close()
        ledger.close()
    sends = [t for t in told if t[0] == "send"]
    assert sends[0] == ("send", 0, 2, 0) and sends[-1] == ("send", 2, 2, 0), sends
    assert told.index(sends[0]) == told.index(next(t for t in told if t[0] != "scan"))
