"""What `reconcile` tells a script and a person (issue 12): `--json` (the cycle's result,
or with `--dry-run` the plan, each action with its reason), the dry run grouped with
renames paired, Ctrl-C recorded as an interrupted cycle, and a wrong Aspose secret
noticed even when there is nothing to send."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from featsync.ledger import SqlLedger
from featsync.model import Action, Kind, LocalFile
from featsync.plan import renames
from featsync.schema import SCHEMA_VERSION
from tests.conftest import CLIENT_SECRET, Workspace, set_mtime_past, start_server, wait_for
from tests.test_aspose import CREDS, odd_server, use_server
from tests.test_cli import featsync, json_lines


def _images(ws: Workspace, n: int) -> None:
    for i in range(n):
        set_mtime_past(ws.image(f"i{i:02}.jpg", i))


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
    srv = start_server(tmp_path / "slow", "--latency", "0.2")
    try:
        use_server(ws, srv)
        ws.write_config(**{**ws.overrides, "sync": {"folder": "images", "concurrency": 2}})
        _images(ws, 40)
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
    finally:
        srv.stop()


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
        for args in (("reconcile",), ("reconcile", "--dry-run"), ("reconcile", "--json")):
            r = featsync(*args, cwd=ws.base, env=env)
            assert r.returncode == 2, (args, r.stderr)
            assert "refused client" in r.stderr and "check the client ID and secret" in r.stderr
            assert wrong not in r.stderr + r.stdout and CLIENT_SECRET not in r.stderr + r.stdout
            assert r.stdout == ""
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
