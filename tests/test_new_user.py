"""Small things a new user meets first, each tried the way a new user tries it: a typo
in the config, a pipe into `head`, a terminal, a database driver not installed, and
what scripts read (`--json`)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import Server, Workspace
from tests.test_cli import featsync, json_lines
from tests.tty import run_on_tty


def _iso_with_zone(text: object) -> bool:
    assert isinstance(text, str), text
    return dt.datetime.fromisoformat(text).tzinfo is not None


def test_a_missing_folder_names_the_config_key_to_fix(ws: Workspace) -> None:
    ws.write_config(sync={"folder": "imgaes"})  # a typo
    r = featsync("reconcile", cwd=ws.base)
    assert r.returncode == 1, r.stderr
    [event] = [e for e in json_lines(r.stderr) if e["event"] == "folder_unavailable"]
    assert event["state"] == "missing" and event["folder"] == str(ws.base / "imgaes")
    assert "[sync] folder" in event["fix"] and str(ws.config_path) in event["fix"]


@pytest.mark.parametrize(
    ("url", "module", "package"),
    [
        ("postgresql://sync:hunter2@db.example/featsync", "psycopg", "psycopg[binary]"),
        ("postgresql+psycopg2://sync:hunter2@db.example/featsync", "psycopg2", "psycopg2-binary"),
        ("mysql+pymysql://sync:hunter2@db.example/featsync", "pymysql", "PyMySQL"),
    ],
)
@pytest.mark.parametrize("command", ["reconcile", "status", "run"])
def test_a_ledger_whose_driver_is_missing_exits_2_naming_the_package(
    ws: Workspace, url: str, module: str, package: str, command: str
) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here: the missing driver cannot be shown")
    ws.image("a.jpg", 1)
    ws.write_config(sync={"folder": "images"}, ledger={"url": url})
    r = featsync(command, cwd=ws.base)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"'{module}'" in r.stderr and f"pip install '{package}'" in r.stderr
    assert "Traceback" not in r.stderr
    assert "hunter2" not in r.stdout + r.stderr  # the password never shows


@pytest.mark.parametrize(
    "command",
    [("reconcile",), ("run",), ("retry", "--all"), ("status",), ("reconcile", "--dry-run")],
)
def test_a_ledger_in_a_missing_folder_names_the_ledger_not_its_lock_file(
    ws: Workspace, command: tuple[str, ...]
) -> None:
    ws.image("a.jpg", 1)
    ws.write_config(sync={"folder": "images"}, ledger={"url": "sqlite:///state/ledger.db"})
    r = featsync(*command, cwd=ws.base)
    assert r.returncode == 2, r.stdout + r.stderr
    said = r.stderr.strip().splitlines()[-1]
    assert said.startswith("featsync: ledger sqlite:///") and "ledger.db" in said, said
    assert f"{ws.base / 'state'}' does not exist" in said and "[ledger] url" in said
    assert ".lock" not in r.stderr
    assert not (ws.base / "state").exists()  # nothing made on a guess


def test_features_add_of_an_id_already_there_exits_1_like_other_per_image_failures(
    ws: Workspace,
) -> None:
    ws.image("a.jpg", 1)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    r = featsync("features", "add", "a.jpg", "--file", str(ws.images / "a.jpg"), cwd=ws.base)
    assert r.returncode == 1, r.stderr
    assert "a.jpg" in r.stderr and "already exist" in r.stderr
    missing = featsync(
        "features", "update", "nope.jpg", "--file", str(ws.images / "a.jpg"), cwd=ws.base
    )
    assert missing.returncode == 1, missing.stderr  # the other per-image miss, as before


def test_features_get_into_a_closed_pipe_ends_quietly(ws: Workspace) -> None:
    """`featsync features get ID | head -1`: the reader goes away before featsync is
    done writing. Made certain here: the pipe's reading end is closed before featsync
    even starts, so its first write fails, whatever the record's size or the timing."""
    ws.image("a.jpg", 1)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    reader, writer = os.pipe()
    os.close(reader)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "featsync", "features", "get", "a.jpg"],
            cwd=ws.base,
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(writer)
    assert r.stderr == ""  # no traceback, no "Exception ignored" at exit
    assert r.returncode == 141  # 128 + SIGPIPE, as `cat` ends


def test_a_fatal_error_is_said_once_on_a_terminal_and_as_json_off_it(ws: Workspace) -> None:
    ws.image("a.jpg", 1)
    ws.write_config(sync={"folder": "images"}, ledger={"url": "sqlite:///state/ledger.db"})
    code, screen = run_on_tty("reconcile", cwd=ws.base)
    assert code == 2, screen
    assert screen.count("does not exist") == 1, screen
    assert screen.count("featsync: ledger ") == 1, screen  # the plain line, and no log event
    off = featsync("reconcile", cwd=ws.base)  # journald, cron: the event and the plain line
    assert [e["event"] for e in json_lines(off.stderr)] == ["fatal_error"]
    assert off.stderr.strip().splitlines()[-1].startswith("featsync: ledger ")


def test_status_and_history_json_have_numbers_and_iso_times(ws: Workspace) -> None:
    ws.image("a.jpg", 1)
    (ws.images / "bad.jpg").write_bytes(b"not an image")
    assert featsync("reconcile", cwd=ws.base).returncode == 1
    status = json.loads(featsync("status", "--json", cwd=ws.base).stdout)
    assert status["syncing_pid"] is None and status["syncing"] is False
    assert status["counts"]["synced"] == 1 and isinstance(status["counts"]["synced"], int)
    [failure] = status["failures"]
    assert failure["image_id"] == "bad.jpg" and isinstance(failure["attempts"], int)
    assert _iso_with_zone(failure["next_attempt_at"])
    cycle = status["last_cycle"]
    assert _iso_with_zone(cycle["started_at"]) and _iso_with_zone(cycle["finished_at"])
    assert isinstance(cycle["duration_ms"], float) and cycle["added"] == 1
    hist = json.loads(featsync("history", "a.jpg", "--json", cwd=ws.base).stdout)
    [v1] = hist["versions"]
    assert v1["version"] == 1 and v1["action"] == "add" and _iso_with_zone(v1["at"])
    assert isinstance(v1["features_count"], int) and v1["features_count"] > 0


def test_retry_json_says_what_will_be_tried_and_what_was_not_failed(ws: Workspace) -> None:
    (ws.images / "bad.jpg").write_bytes(b"not an image")
    ws.image("a.jpg", 1)
    featsync("reconcile", cwd=ws.base)
    r = featsync("retry", "bad.jpg", "a.jpg", "--json", cwd=ws.base)
    assert r.returncode == 1, r.stderr  # a.jpg is not a failed image
    assert json.loads(r.stdout) == {"retry": ["bad.jpg"], "count": 1, "not_failed": ["a.jpg"]}


def test_context_status_json_through_featsync_serve(ws: Workspace, server: Server) -> None:
    from tests.test_aspose import CREDS, use_server

    context_id = use_server(ws, server)
    r = featsync("context", "status", "--json", cwd=ws.base, env=CREDS)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"context_id": context_id, "status": "Idle"}
    assert CREDS["FEATSYNC_CLIENT_SECRET"] not in r.stdout + r.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://bob@db.example/featsync?password=S3cretPW",
        "mysql+pymysql://bob@db.example/featsync?passwd=S3cretPW",
        "sqlite+pysqlcipher://:S3cretPW@/state/ledger.db",
    ],
)
@pytest.mark.parametrize("command", [("reconcile",), ("status",), ("retry", "--all")])
def test_a_secret_in_the_ledger_url_is_never_shown(
    ws: Workspace, url: str, command: tuple[str, ...]
) -> None:
    ws.write_config(sync={"folder": "images"}, ledger={"url": url})
    r = featsync(*command, cwd=ws.base)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "S3cretPW" not in r.stdout + r.stderr
    assert "***" in r.stderr  # the message still says which ledger


def test_a_fifo_where_the_lock_file_goes_hangs_nothing(ws: Workspace) -> None:
    ws.image("a.jpg", 1)
    os.mkfifo(ws.base / "featsync-ledger.db.lock")
    look = featsync("status", cwd=ws.base)  # featsync()'s own timeout would catch a hang
    assert look.returncode == 1 and "last cycle: never" in look.stdout, look.stderr
    sync = featsync("reconcile", cwd=ws.base)
    assert sync.returncode == 2, sync.stderr
    assert "featsync-ledger.db.lock' is not a regular file" in sync.stderr


def test_ctrl_c_before_a_command_has_begun_is_exit_130_without_a_traceback(
    ws: Workspace,
) -> None:
    """Ctrl-C while featsync still reads its config (here a FIFO nobody writes, so that
    the moment is certain): nothing has begun, nothing to say but the exit code."""
    fifo = ws.base / "slow.toml"
    os.mkfifo(fifo)
    # Python leaves SIGINT ignored when it starts so (a suite run from a background
    # job of a script inherits that), and then there is no Ctrl-C to test: featsync
    # starts here as from a terminal, with Python's own handler.
    as_from_a_terminal = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv = ['featsync', *sys.argv[1:]]; runpy.run_module('featsync', run_name='__main__')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", as_from_a_terminal, "--config", str(fifo), "status"],
        cwd=ws.base,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with open(fifo, "w"):  # the open returns once featsync has opened it to read
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode == 130, err


def test_json_has_no_nan_or_infinity_even_from_a_hostile_ledger(ws: Workspace) -> None:
    ws.image("a.jpg", 1)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    with sqlite3.connect(ws.base / "featsync-ledger.db") as conn:
        conn.execute("UPDATE cycles SET duration_ms = 9e999")  # what SQLite stores as inf
    conn.close()
    r = featsync("status", "--json", cwd=ws.base)
    assert r.returncode == 0, r.stderr
    assert "Infinity" not in r.stdout and "NaN" not in r.stdout
    assert json.loads(r.stdout)["last_cycle"]["duration_ms"] is None


def test_the_daemon_too_names_the_config_key_of_a_missing_folder(
    ws: Workspace, daemons: Any
) -> None:
    ws.write_config(sync={"folder": "imgaes"}, daemon={"heartbeat_interval": 1.0})
    run = daemons.start()
    run.wait_event("folder_unavailable")
    [event, *_] = run.events("folder_unavailable")
    assert "[sync] folder" in event["fix"] and str(ws.config_path) in event["fix"]
    assert run.stop() == 0


def test_a_ledger_url_that_cannot_be_parsed_is_refused_without_its_password(
    ws: Workspace,
) -> None:
    ws.write_config(ledger={"url": "postgresql://sync:S3cretPW@db.example:notaport/x"})
    r = featsync("status", cwd=ws.base)
    assert r.returncode == 2, r.stderr
    assert "ledger.url" in r.stderr and "not a database URL" in r.stderr
    assert "S3cretPW" not in r.stdout + r.stderr
