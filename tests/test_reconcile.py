"""One-shot reconcile end to end: real files, a real SQLite ledger, the real embedded context."""

from __future__ import annotations

import os
import shutil
import unicodedata

import pytest
import sqlalchemy as sa

from featsync.model import State
from featsync.schema import metadata
from tests.conftest import Workspace, set_mtime_past


def test_add_modify_touch_delete_rename_give_exactly_the_expected_calls(ws: Workspace) -> None:
    a, b, c = ws.image("a.jpg", 1), ws.image("b.jpg", 2), ws.image("sub/c.png", 3, "PNG")
    first = ws.cycle()
    assert first.calls == {"add": 3} and first.report.in_step
    assert ws.remote_ids() == {"a.jpg", "b.jpg", "sub/c.png"}
    assert {e["image_id"] for e in first.events("image_added")} == ws.remote_ids()

    second = ws.cycle()
    assert second.calls == {} and second.report.plan.unchanged == 3

    a.write_bytes(ws.image("tmp.jpg", 11).read_bytes())  # modify
    (ws.images / "tmp.jpg").unlink()
    os.utime(b)  # touch, same content
    c.rename(ws.images / "sub" / "c2.png")  # rename
    third = ws.cycle()
    assert third.calls == {"update": 1, "add": 1, "delete": 1}
    assert ws.remote_ids() == {"a.jpg", "b.jpg", "sub/c2.png"}
    [updated] = third.events("image_updated")
    assert updated["image_id"] == "a.jpg" and updated["version"] == 2

    b.unlink()  # delete
    fourth = ws.cycle()
    assert fourth.calls == {"delete": 1}
    assert ws.remote_ids() == {"a.jpg", "sub/c2.png"}
    assert ws.cycle().calls == {}

    ledger = ws.ledger()
    try:
        assert [h["action"] for h in ledger.history_of("a.jpg")] == ["add", "update"]
        assert [h["version"] for h in ledger.history_of("b.jpg")] == [1, 2]
        assert ledger.load()["b.jpg"].state == State.DELETED
    finally:
        ledger.close()


def test_touch_of_every_file_reads_them_but_sends_nothing(ws: Workspace) -> None:
    paths = [ws.image(f"i{n}.jpg", n) for n in range(4)]
    ws.cycle()
    for p in paths:
        set_mtime_past(p, 3600)
    touched = ws.cycle()
    assert touched.calls == {} and len(touched.report.plan.restat) == 4
    again = ws.cycle()
    assert again.calls == {} and again.report.plan.restat == ()  # stat trusted now


def test_cycle_finished_line_counts_what_happened(ws: Workspace) -> None:
    ws.image("a.jpg", 1)
    (ws.images / "bad.jpg").write_bytes(b"not an image")
    c = ws.cycle()
    [done] = c.events("cycle_finished")
    assert {
        k: done[k]
        for k in ("added", "updated", "deleted", "unchanged", "failed", "withheld_deletes")
    } == {
        "added": 1,
        "updated": 0,
        "deleted": 0,
        "unchanged": 0,
        "failed": 1,
        "withheld_deletes": 0,
    }
    assert done["duration_ms"] >= 0
    [added] = c.events("image_added")
    assert added["version"] == 1 and added["duration_ms"] >= 0


ODD_NAMES = [
    "with space.jpg",
    "hash#tag.jpg",
    "question?.jpg",
    "100%.jpg",
    "a&b.jpg",
    "a+b=c.jpg",
    "quote'single.jpg",
    'quote"double.jpg',
    "caf\u00e9-nfc.jpg",
    unicodedata.normalize("NFD", "na\u00efve-nfd.jpg"),
    "\u65e5\u672c\u8a9e.jpg",
    "emoji-\U0001f600.jpg",
    "x" * 240 + ".jpg",
    "/".join(f"d{n}" for n in range(30)) + "/deep.jpg",
    "semi;colon,comma.jpg",
    "back\\slash.jpg",
]


def test_odd_file_names_round_trip_by_exact_image_id(ws: Workspace) -> None:
    for n, name in enumerate(ODD_NAMES):
        ws.image(name, 100 + n)
    c = ws.cycle()
    want = {unicodedata.normalize("NFC", name) for name in ODD_NAMES}
    assert c.report.in_step and c.calls == {"add": len(ODD_NAMES)}
    assert ws.remote_ids() == want
    ctx = ws.context()
    try:
        nfd = unicodedata.normalize("NFC", "na\u00efve-nfd.jpg")
        assert ctx.get_features(nfd).image_id == nfd
    finally:
        ctx.close()
    for name in ODD_NAMES:
        (ws.images / name).unlink()
    ws.image("keep.jpg", 1)
    gone = ws.cycle(confirm_deletes=True)
    assert gone.calls == {"add": 1, "delete": len(ODD_NAMES)}
    assert ws.remote_ids() == {"keep.jpg"}


def test_id_prefix_is_prepended_to_every_image_id(ws: Workspace) -> None:
    ws.write_config(sync={"folder": "images", "id_prefix": "shop/"})
    ws.image("a/b.jpg", 1)
    ws.cycle()
    assert ws.remote_ids() == {"shop/a/b.jpg"}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty file"),
        (b"GIF89a not really", "cannot decode"),
        (b"plain text, not an image", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "cannot decode"),
    ],
)
def test_a_broken_image_fails_with_its_reason_while_the_rest_sync(
    ws: Workspace, content: bytes, reason: str
) -> None:
    ws.image("good1.jpg", 1)
    ws.image("good2.jpg", 2)
    bad = ws.images / "bad.jpg"
    bad.write_bytes(content)
    c = ws.cycle()
    assert ws.remote_ids() == {"good1.jpg", "good2.jpg"}
    assert not c.report.in_step
    [failed] = c.events("image_failed")
    assert failed["image_id"] == "bad.jpg" and reason in failed["error"]
    assert "bad.jpg" in failed["error"]
    ledger = ws.ledger()
    try:
        [row] = ledger.failures()
        assert row["image_id"] == "bad.jpg" and reason in row["error"]
    finally:
        ledger.close()

    assert ws.cycle().calls == {}  # unchanged and not due: no wasted call

    bad.write_bytes(ws.image("fixed.jpg", 9).read_bytes())
    (ws.images / "fixed.jpg").unlink()
    fixed = ws.cycle()
    assert fixed.calls == {"add": 1} and fixed.report.in_step
    assert ws.remote_ids() == {"good1.jpg", "good2.jpg", "bad.jpg"}


def test_a_truncated_jpeg_is_rejected(ws: Workspace) -> None:
    good = ws.image("whole.jpg", 4).read_bytes()
    (ws.images / "half.jpg").write_bytes(good[: len(good) // 2])
    c = ws.cycle()
    assert ws.remote_ids() == {"whole.jpg"}
    [failed] = c.events("image_failed")
    assert failed["image_id"] == "half.jpg" and "truncated" in failed["error"]


def _synced_four(ws: Workspace) -> None:
    for n in range(4):
        ws.image(f"i{n}.jpg", n)
    assert ws.cycle().report.in_step


def test_a_removed_folder_deletes_nothing(ws: Workspace) -> None:
    _synced_four(ws)
    shutil.rmtree(ws.images)
    c = ws.cycle()
    assert c.calls == {} and len(c.report.plan.withheld) == 4
    assert "missing" in (c.report.plan.withheld_reason or "")
    assert c.events("folder_unavailable") and c.events("deletes_withheld")
    assert ws.remote_ids() == {f"i{n}.jpg" for n in range(4)}


def test_an_emptied_folder_deletes_nothing(ws: Workspace) -> None:
    _synced_four(ws)
    for p in ws.images.iterdir():
        p.unlink()
    c = ws.cycle()
    assert c.calls == {} and not c.report.in_step
    assert "max_delete_fraction" in (c.report.plan.withheld_reason or "")
    assert len(ws.remote_ids()) == 4
    confirmed = ws.cycle(confirm_deletes=True)
    assert confirmed.calls == {"delete": 4} and ws.remote_ids() == set()


def test_a_folder_on_another_device_deletes_nothing(ws: Workspace) -> None:
    """An unmounted share shows the mount point, on the parent's device. The recorded
    device is changed here, as a test cannot mount a filesystem."""
    _synced_four(ws)
    ledger = ws.ledger()
    try:
        recorded = ledger.device()
        assert recorded == os.stat(ws.images).st_dev
        ledger.set_device(recorded + 1)
    finally:
        ledger.close()
    (ws.images / "i0.jpg").unlink()
    c = ws.cycle()
    assert c.calls == {} and "device" in (c.report.plan.withheld_reason or "")


def test_a_path_that_is_a_file_not_a_folder_deletes_nothing(ws: Workspace) -> None:
    _synced_four(ws)
    shutil.rmtree(ws.images)
    ws.images.write_bytes(b"")
    c = ws.cycle()
    assert c.calls == {} and "not a directory" in (c.report.plan.withheld_reason or "")


def test_a_missing_marker_deletes_nothing(ws: Workspace) -> None:
    ws.write_config(sync={"folder": "images"}, safety={"marker": ".featsync-root"})
    (ws.images / ".featsync-root").write_text("")
    _synced_four(ws)
    (ws.images / ".featsync-root").unlink()
    (ws.images / "i0.jpg").unlink()
    c = ws.cycle()
    assert c.calls == {} and "marker" in (c.report.plan.withheld_reason or "")


def test_deletes_over_the_count_limit_are_all_withheld(ws: Workspace) -> None:
    ws.write_config(
        sync={"folder": "images"}, safety={"max_delete_count": 1, "max_delete_fraction": 1.0}
    )
    _synced_four(ws)
    (ws.images / "i0.jpg").unlink()
    (ws.images / "i1.jpg").unlink()
    ws.image("new.jpg", 50)
    c = ws.cycle()
    assert c.calls == {"add": 1}  # the rest goes on
    assert [a.image_id for a in c.report.plan.withheld] == ["i0.jpg", "i1.jpg"]
    assert not c.report.in_step


def test_dry_run_changes_nothing(ws: Workspace) -> None:
    ws.image("a.jpg", 1)
    c = ws.cycle(dry_run=True)
    assert c.calls == {} and [a.image_id for a in c.report.plan.actions] == ["a.jpg"]
    assert ws.remote_ids() == set()
    ledger = ws.ledger()
    try:
        assert ledger.load() == {} and ledger.last_cycle() is None
    finally:
        ledger.close()


def test_dry_run_writes_nothing_to_the_ledger_not_even_its_cache(ws: Workspace) -> None:
    ws.image("a.jpg", 1)
    ws.cycle()
    ws.image("b.jpg", 2)
    ws.image("a.jpg", 3)
    before = dump(ws)
    c = ws.cycle(dry_run=True)
    assert [a.image_id for a in c.report.plan.actions] == ["a.jpg", "b.jpg"]
    assert dump(ws) == before


def dump(ws: Workspace) -> list[tuple[object, ...]]:
    ledger = ws.ledger()
    try:
        with ledger.engine.connect() as conn:
            return [
                (table.name, *row)
                for table in metadata.sorted_tables
                for row in conn.execute(sa.select(table))
            ]
    finally:
        ledger.close()
