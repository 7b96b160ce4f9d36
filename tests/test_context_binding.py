"""The ledger is bound to the search context it mirrors (issue 10, item 1).

Switch `[context]` to another store or another Aspose context, or delete the store:
`reconcile` and `run` refuse with exit 2, naming both and the fix, instead of saying
"unchanged" while the new context stays empty; `reconcile --resync` sends every image of
the folder to the configured context and binds the ledger to it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from featsync.model import State
from tests.conftest import Server, Workspace
from tests.test_aspose import CREDS, served_ids, use_server
from tests.test_cli import featsync


def _reconcile(ws: Workspace, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    done = featsync("reconcile", *args, "--config", str(ws.config_path), cwd=ws.base, env=env)
    return done.returncode, done.stderr


def test_a_switched_local_store_is_refused_until_resync_sends_everything(ws: Workspace) -> None:
    for n in range(3):
        ws.image(f"i{n}.jpg", n)
    assert _reconcile(ws)[0] == 0
    old_store = ws.settings().context.path
    ws.write_config(sync={"folder": "images"}, context={"path": "another-store.db"})
    code, err = _reconcile(ws)
    assert code == 2, err
    assert "the ledger mirrors local store" in err and "another-store.db" in err
    assert "featsync reconcile --resync" in err and old_store in err
    assert ws.remote_ids() == set()  # nothing was sent meanwhile
    assert _reconcile(ws, "--dry-run")[0] == 2  # a dry run says so too
    assert _reconcile(ws, "--resync", "--dry-run")[0] == 2  # cannot show that plan

    code, err = _reconcile(ws, "--resync")
    assert code == 0, err
    assert ws.remote_ids() == {"i0.jpg", "i1.jpg", "i2.jpg"}
    ledger = ws.ledger()
    try:
        assert [h["action"] for h in ledger.history_of("i0.jpg")] == ["add", "add"]
        assert ledger.load()["i0.jpg"].version == 2  # the version count goes on
    finally:
        ledger.close()
    code, err = _reconcile(ws)  # bound now: in step, no calls
    assert code == 0 and '"added": 0' in err and '"unchanged": 3' in err, err


def test_a_deleted_store_is_refused_and_a_resync_forgets_the_images_gone_meanwhile(
    ws: Workspace,
) -> None:
    ws.image("a.jpg", 1)
    ws.image("b.jpg", 2)
    assert _reconcile(ws)[0] == 0
    store = ws.settings().context.path
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(store + suffix):
            os.remove(store + suffix)
    (ws.images / "b.jpg").unlink()
    code, err = _reconcile(ws)
    assert code == 2 and "--resync" in err, err
    assert _reconcile(ws, "--resync")[0] == 0
    assert ws.remote_ids() == {"a.jpg"}
    ledger = ws.ledger()
    try:
        rows = ledger.load()
        assert rows["b.jpg"].state == State.DELETED and not rows["b.jpg"].remote
        assert rows["a.jpg"].state == State.SYNCED and rows["a.jpg"].remote
    finally:
        ledger.close()


def test_another_aspose_context_is_refused_and_resync_fills_it(
    ws: Workspace, server: Server
) -> None:
    first = use_server(ws, server)
    for n in range(3):
        ws.image(f"i{n}.jpg", n)
    assert _reconcile(ws, env=CREDS)[0] == 0
    assert served_ids(server, first) == {"i0.jpg", "i1.jpg", "i2.jpg"}
    second = use_server(ws, server)  # the config now names a new, empty context
    code, err = _reconcile(ws, env=CREDS)
    assert code == 2, err
    assert first in err and second in err and "--resync" in err
    assert served_ids(server, second) == set()
    assert _reconcile(ws, "--resync", env=CREDS)[0] == 0
    assert served_ids(server, second) == {"i0.jpg", "i1.jpg", "i2.jpg"}


def test_the_daemon_refuses_to_start_on_another_context(ws: Workspace) -> None:
    ws.image("a.jpg", 1)
    assert _reconcile(ws)[0] == 0
    ws.write_config(
        sync={"folder": "images"}, context={"path": "another-store.db"}, log={"format": "json"}
    )
    done = subprocess.run(
        [sys.executable, "-m", "featsync", "run", "--config", str(ws.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--resync" in done.stderr and "daemon_started" not in done.stderr


def test_a_reload_onto_another_context_is_refused_and_the_daemon_syncs_on(
    ws: Workspace,
) -> None:
    from tests.test_daemon import Daemons, configure, wait_in_step, write

    configure(ws)
    write(ws.images / "a.jpg", 1)
    daemons = Daemons(ws)
    try:
        run = daemons.start()
        wait_in_step(ws, run)
        good = ws.config_path.read_text(encoding="utf-8")
        configure(ws, context={"path": "another-store.db"})
        run.proc.send_signal(signal.SIGHUP)
        run.wait_event("config_reload_failed")
        assert "--resync" in run.events("config_reload_failed")[0]["error"]
        ws.config_path.write_text(good, encoding="utf-8")  # for the helpers; no SIGHUP
        write(ws.images / "b.jpg", 2)  # still syncing, into the context it had
        wait_in_step(ws, run)
        assert ws.remote_ids() == {"a.jpg", "b.jpg"}
        assert run.stop() == 0
    finally:
        daemons.close()
