"""The featsync command as a user runs it: a real subprocess, real exit codes and output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from featsync.samples import textured_bytes
from tests.conftest import Backend, Workspace, set_mtime_past


def featsync(
    *args: str, cwd: Path, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "FEATSYNC_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(
        [*prefix, sys.executable, "-m", "featsync", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_reconcile_exits_0_when_in_step_and_logs_json_lines_off_a_tty(ws: Workspace) -> None:
    ws.image("a.jpg", 1)
    ws.image("b.png", 2, "PNG")
    r = featsync("reconcile", cwd=ws.base)
    assert r.returncode == 0, r.stderr
    events = json_lines(r.stderr)
    assert sorted(e["image_id"] for e in events if e["event"] == "image_added") == [
        "a.jpg",
        "b.png",
    ]
    [done] = [e for e in events if e["event"] == "cycle_finished"]
    assert done["added"] == 2 and done["failed"] == 0 and done["level"] == "info"
    assert "timestamp" in done
    again = featsync("reconcile", cwd=ws.base)
    assert again.returncode == 0
    assert [e["event"] for e in json_lines(again.stderr)] == ["cycle_finished"]


def test_dry_run_prints_the_plan_and_changes_nothing(ws: Workspace) -> None:
    ws.image("new one.jpg", 1)
    r = featsync("reconcile", "--dry-run", cwd=ws.base)
    assert r.returncode == 1  # not in step: there is something to do
    assert "add     new one.jpg" in r.stdout and "plan: 1 add" in r.stdout
    assert ws.remote_ids() == set()


def test_failures_exit_1_and_status_lists_them(ws: Workspace) -> None:
    ws.image("good.jpg", 1)
    (ws.images / "broken.jpg").write_bytes(b"\x00" * 64)
    r = featsync("reconcile", cwd=ws.base)
    assert r.returncode == 1
    st = featsync("status", "--json", cwd=ws.base)
    data = json.loads(st.stdout)
    assert data["counts"]["synced"] == 1 and data["counts"]["failed"] == 1
    [failure] = data["failures"]
    assert failure["image_id"] == "broken.jpg" and "cannot decode" in failure["error"]
    assert data["last_cycle"]["added"] == 1 and data["last_cycle"]["failed"] == 1
    text = featsync("status", cwd=ws.base).stdout
    assert "failed: broken.jpg: cannot decode image" in text and "1 synced" in text


def test_a_removed_folder_exits_1_and_deletes_nothing(ws: Workspace) -> None:
    ws.image("a.jpg", 1)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    shutil.rmtree(ws.images)
    r = featsync("reconcile", cwd=ws.base)
    assert r.returncode == 1
    events = {e["event"]: e for e in json_lines(r.stderr)}
    assert "missing" in events["deletes_withheld"]["reason"]
    assert events["cycle_finished"]["withheld_deletes"] == 1
    assert ws.remote_ids() == {"a.jpg"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[sync]\nconcurrency = 'x'\n", "'sync.concurrency'"),
        ("[sync]\nfolderr = 'images'\n", "'sync.folderr'"),
        ("[sync\n", "not valid TOML"),
    ],
)
def test_a_bad_config_exits_2_naming_the_key(ws: Workspace, text: str, needle: str) -> None:
    ws.config_path.write_text(text)
    r = featsync("reconcile", cwd=ws.base)
    assert r.returncode == 2 and needle in r.stderr and "config" in r.stderr


def test_the_config_comes_from_the_option_or_the_environment(ws: Workspace, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    ws.image("a.jpg", 1)
    assert featsync("--config", str(ws.config_path), "reconcile", cwd=elsewhere).returncode == 0
    assert featsync("status", "--config", str(ws.config_path), cwd=elsewhere).returncode == 0
    via_env = featsync(
        "status", "--json", cwd=elsewhere, env={"FEATSYNC_CONFIG": str(ws.config_path)}
    )
    assert json.loads(via_env.stdout)["counts"]["synced"] == 1
    missing = featsync("status", cwd=elsewhere)
    assert missing.returncode == 2 and "featsync.toml" in missing.stderr


def test_a_newer_ledger_exits_2_with_a_clear_message(ws: Workspace) -> None:
    import sqlite3

    assert featsync("reconcile", cwd=ws.base).returncode == 0
    db = sqlite3.connect(ws.base / "featsync-ledger.db")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    r = featsync("reconcile", cwd=ws.base)
    assert r.returncode == 2 and "newer than this featsync understands" in r.stderr


def test_an_unreadable_file_is_failed_and_an_unlistable_folder_deletes_nothing(
    ws: Workspace,
) -> None:
    """As root, the command runs without CAP_DAC_* so permissions bite as for any user."""
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and util-linux setpriv is not installed")
        prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search")
    ws.image("top.jpg", 1)
    ws.image("sub/inner.jpg", 2)
    assert featsync("reconcile", cwd=ws.base, prefix=prefix).returncode == 0
    secret = ws.image("secret.jpg", 3)
    secret.chmod(0o000)
    (ws.images / "sub").chmod(0o000)
    try:
        r = featsync("reconcile", cwd=ws.base, prefix=prefix)
    finally:
        (ws.images / "sub").chmod(0o755)
    assert r.returncode == 1
    assert ws.remote_ids() == {"top.jpg", "sub/inner.jpg"}  # nothing deleted
    data = json.loads(featsync("status", "--json", cwd=ws.base).stdout)
    [failure] = data["failures"]
    assert failure["image_id"] == "secret.jpg" and "cannot read" in failure["error"]
    secret.chmod(0o644)
    assert featsync("reconcile", cwd=ws.base, prefix=prefix).returncode == 0
    assert ws.remote_ids() == {"top.jpg", "sub/inner.jpg", "secret.jpg"}


def test_a_dry_run_that_would_send_nothing_exits_0_even_after_a_touch(ws: Workspace) -> None:
    """A touch only refreshes the ledger's stat keys: no call, so a script asking "is
    there work?" must hear no (issue 10: this failed the lock test under load)."""
    a = ws.image("a.jpg", 1)
    set_mtime_past(a, 600)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    set_mtime_past(a, 60)  # a touch: same content, another mtime
    look = featsync("reconcile", "--dry-run", cwd=ws.base)
    assert look.returncode == 0, look.stdout
    assert "plan: 0 add, 0 update, 0 delete" in look.stdout
    a.write_bytes(ws.image("b.jpg", 2).read_bytes())  # a real change: work to do
    assert featsync("reconcile", "--dry-run", cwd=ws.base).returncode == 1


def test_status_exits_1_while_deletes_are_withheld_and_0_once_in_step(ws: Workspace) -> None:
    ws.write_config(sync={"folder": "images"}, safety={"max_delete_count": 1})
    for n in range(4):
        ws.image(f"i{n}.jpg", n)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    assert featsync("status", cwd=ws.base).returncode == 0
    kept = {n: (ws.images / f"i{n}.jpg").read_bytes() for n in range(3)}
    for n in range(3):
        (ws.images / f"i{n}.jpg").unlink()
    assert featsync("reconcile", cwd=ws.base).returncode == 1  # 3 deletes > 1: withheld
    status = featsync("status", cwd=ws.base)
    assert status.returncode == 1 and "3 withheld deletes" in status.stdout, status.stdout
    for n, data in kept.items():
        (ws.images / f"i{n}.jpg").write_bytes(data)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    assert featsync("status", cwd=ws.base).returncode == 0


def test_history_lists_every_version_of_an_image_and_writes_nothing(ws: Workspace) -> None:
    import hashlib

    a = ws.image("a.jpg", 1)
    ws.image("b.jpg", 3)  # so that deleting a.jpg is one delete of two: within the guard
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    first = hashlib.sha256(a.read_bytes()).hexdigest()
    a.write_bytes(ws.image("tmp.jpg", 2).read_bytes())
    (ws.images / "tmp.jpg").unlink()
    second = hashlib.sha256(a.read_bytes()).hexdigest()
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    a.unlink()
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in ws.base.iterdir())
    r = featsync("history", "a.jpg", "--json", cwd=ws.base)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    got = [(v["version"], v["action"], v["hash"]) for v in data["versions"]]
    assert got == [(1, "add", first), (2, "update", second), (3, "delete", second)]
    assert all(v["features_count"] for v in data["versions"][:2])
    text = featsync("history", "a.jpg", cwd=ws.base)
    assert text.returncode == 0 and len(text.stdout.splitlines()) == 3
    assert "v1" in text.stdout and "update" in text.stdout and first[:16] in text.stdout
    unknown = featsync("history", "nope.jpg", cwd=ws.base)
    assert unknown.returncode == 1 and "'nope.jpg': no history" in unknown.stderr
    assert sorted((p.name, p.stat().st_mtime_ns) for p in ws.base.iterdir()) == before


def test_verify_finds_what_changed_in_the_context_behind_the_ledgers_back(
    ws: Workspace, backend: Backend
) -> None:
    for n, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        set_mtime_past(ws.image(name, n))
    assert featsync("reconcile", cwd=ws.base, env=backend.env).returncode == 0
    clean = featsync("verify", cwd=ws.base, env=backend.env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "verified 3 images: 0 drift(s)" in clean.stdout
    gone = featsync("features", "delete", "b.jpg", cwd=ws.base, env=backend.env)
    assert gone.returncode == 0, gone.stderr  # behind the ledger's back
    drift = featsync("verify", "--json", cwd=ws.base, env=backend.env)
    assert drift.returncode == 1
    report = json.loads(drift.stdout)
    assert [(d["image_id"], d["kind"]) for d in report["drifts"]] == [("b.jpg", "missing")]
    sampled = featsync("verify", "--sample", "2", cwd=ws.base, env=backend.env)
    assert "verified 2 images" in sampled.stdout
    bad = featsync("verify", "--sample", "0", cwd=ws.base, env=backend.env)
    assert bad.returncode == 2 and "'0' is not a whole number of at least 1" in bad.stderr


def test_verify_names_images_the_embedded_context_holds_but_the_ledger_does_not(
    ws: Workspace,
) -> None:
    set_mtime_past(ws.image("a.jpg", 1))
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    ctx = ws.context()
    try:
        ctx.add_features("stray.jpg", textured_bytes(9))
    finally:
        ctx.close()
    r = featsync("verify", cwd=ws.base)
    assert r.returncode == 1
    assert "orphan           stray.jpg: held, unknown to the ledger" in r.stdout
