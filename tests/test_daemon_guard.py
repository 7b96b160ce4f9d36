"""The daemon's paths through the delete guard and the retries (issue 10, items 3 and 4):
a folder emptied in bursts, each burst its own targeted cycle, deletes no more than the
limits allow; a failed image with an NFD name is retried by its path on disk, not
deleted. Real `featsync run` subprocesses, against the embedded context and `featsync
serve`."""

from __future__ import annotations

import unicodedata

from featsync.model import State
from tests.conftest import Backend, Workspace, set_mtime_past, wait_for
from tests.test_cli import featsync
from tests.test_daemon import Daemons, Running, configure, write


def _states(ws: Workspace) -> tuple[dict[str, str], set[str]]:
    ledger = ws.ledger()
    try:
        rows = ledger.load()
        return {i: r.state for i, r in rows.items()}, set(ledger.withheld_ids())
    finally:
        ledger.close()


def _synced_daemon(ws: Workspace, daemons: Daemons, backend: Backend, names: list[str]) -> Running:
    """A daemon started on a folder of these images, once it has synced them all."""
    configure(ws, context=backend.context)
    for n, name in enumerate(names):
        write(ws.images / name, n)
        set_mtime_past(ws.images / name)
    run = daemons.start(backend.env)
    ids = {unicodedata.normalize("NFC", name) for name in names}
    wait_for(lambda: ids <= backend.remote(), 60, f"first sync\n{run.tail()}")
    return run


def test_a_daemon_emptying_the_folder_in_bursts_deletes_no_more_than_the_limit(
    ws: Workspace, daemons: Daemons, backend: Backend
) -> None:
    """Five bursts of deletes, each judged by its own targeted cycle once the last was:
    judged one by one, each would pass (4 of 20, 4 of 16, ...); judged with the
    deletes of the last hour, no more than half of the folder goes."""
    names = [f"g{n:02}.jpg" for n in range(20)]
    run = _synced_daemon(ws, daemons, backend, names)
    for burst in range(5):
        batch = names[burst * 4 : burst * 4 + 4]
        for name in batch:
            (ws.images / name).unlink()

        def judged(batch: list[str] = batch) -> bool:
            states, withheld = _states(ws)
            return all(states.get(i) == State.DELETED or i in withheld for i in batch)

        wait_for(judged, 60, f"burst {burst} judged\n{run.tail()}")
    held = backend.remote()
    assert len(held) >= 10, f"{20 - len(held)} of 20 deleted"
    assert run.count("deletes_withheld") >= 1
    status = featsync("status", cwd=ws.base, env=backend.env)
    assert status.returncode == 1 and "withheld deletes:" in status.stdout
    assert run.stop() == 0


def test_the_daemon_retries_an_nfd_named_image_without_deleting_it(
    ws: Workspace, daemons: Daemons, backend: Backend
) -> None:
    nfd = unicodedata.normalize("NFD", "crème brûlée.jpg")
    image_id = unicodedata.normalize("NFC", nfd)
    others = [f"o{n}.jpg" for n in range(4)]  # one delete among five passes the guard
    run = _synced_daemon(ws, daemons, backend, [nfd, *others])
    (ws.images / nfd).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg any more")
    run.wait_event("image_failed", 1, 60)
    retry = featsync("retry", "--all", cwd=ws.base, env=backend.env)
    assert retry.returncode == 0, retry.stderr
    run.wait_event("image_failed", 2, 60)  # looked at again, by its path: still corrupt
    assert run.count("image_deleted") == 0, run.tail()
    assert image_id in backend.remote()
    states, _ = _states(ws)
    assert states[image_id] == State.FAILED
    assert run.stop() == 0


def test_a_daemon_whose_folder_is_emptied_at_once_deletes_nothing(
    ws: Workspace, daemons: Daemons, backend: Backend
) -> None:
    """All files removed in one go: however the watcher's events are split into
    targeted cycles, none of them sends a delete (the first few are judged together
    with the rest, which the watcher already saw go)."""
    names = [f"e{n:02}.jpg" for n in range(30)]
    run = _synced_daemon(ws, daemons, backend, names)
    for name in names:
        (ws.images / name).unlink()
    wait_for(lambda: _states(ws)[1] == set(names), 60, f"all withheld\n{run.tail()}")
    assert backend.remote() == set(names)
    assert run.count("image_deleted") == 0
    assert run.stop() == 0
