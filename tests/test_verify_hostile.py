"""Listing what a context holds, against a context shared by several configurations
(one id_prefix each) and against a server that answers garbage: nothing of another
configuration is adopted or deleted, and no listing pages for ever."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featsync.listing import CannotList, held_ids, pages, proper_page
from featsync.localcontext import LocalContext
from featsync.samples import textured_bytes
from tests.conftest import Workspace, set_mtime_past
from tests.test_aspose import odd_server
from tests.test_cli import featsync

LISTING = "/v3.0/imaging/ai/imageSearch/c1/features/ids"


def _config(base: Path, name: str, prefix: str) -> Path:
    (base / name).mkdir()
    for n in range(3):
        p = base / name / f"img{n}.jpg"
        p.write_bytes(textured_bytes(10 * len(name) + n + (0 if prefix == "a/" else 50), "JPEG"))
        set_mtime_past(p)
    config = base / f"{name}.toml"
    config.write_text(
        f'[sync]\nfolder = "{name}"\nid_prefix = "{prefix}"\n'
        '[ledger]\nurl = "sqlite:///' + name + '-ledger.db"\n'
        '[context]\npath = "shared-context.db"\n'
        '[backup]\npath = "' + name + '-backups"\n',
        encoding="utf-8",
    )
    return config


def test_a_context_shared_by_two_prefixes_keeps_each_configurations_images(
    tmp_path: Path,
) -> None:
    a = _config(tmp_path, "A", "a/")
    b = _config(tmp_path, "B", "b/")
    assert featsync("--config", str(a), "reconcile", cwd=tmp_path).returncode == 0
    rb = featsync("--config", str(b), "reconcile", cwd=tmp_path)  # a new ledger: adopts
    assert rb.returncode == 0, rb.stderr  # ... only b/ (A's images are not its own)
    assert "deletes_withheld" not in rb.stderr and "context_adopted" not in rb.stderr
    ctx = LocalContext(str(tmp_path / "shared-context.db"), read_only=True)
    try:
        assert len(ctx.image_ids()) == 6
    finally:
        ctx.close()
    r = featsync("--config", str(a), "verify", "--repair", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["drifts"] == []
    ctx = LocalContext(str(tmp_path / "shared-context.db"), read_only=True)
    try:
        assert sorted(ctx.image_ids()) == [f"{p}/img{n}.jpg" for p in "ab" for n in range(3)]
    finally:
        ctx.close()


def test_pages_take_only_proper_pages_and_end() -> None:
    assert proper_page(["b", "c"], "a", None, 2)
    assert not proper_page(["b", "c", "d"], "a", None, 2)  # longer than asked
    assert not proper_page(["c", "b"], "a", None, 5)  # out of order
    assert not proper_page(["b", "b"], "a", None, 5)  # repeated
    assert not proper_page(["a"], "a", None, 5)  # not after `after`
    assert not proper_page(["b", "z"], "a", "y", 5)  # past `until`
    assert not proper_page(["b", 7], "a", None, 5)  # not text

    def same_page_for_ever(after: str, until: str | None, limit: int) -> list[str]:
        return ["x"] * limit

    with pytest.raises(CannotList):
        list(pages(same_page_for_ever, limit=10))
    ids = [f"p/{n:03}" for n in range(25)] + ["q/000", "q/001"]

    def store(after: str, until: str | None, limit: int) -> list[str]:
        return [i for i in ids if i > after and (until is None or i <= until)][:limit]

    assert [i for page in pages(store, prefix="p/", limit=10) for i in page] == ids[:25]
    assert [i for page in pages(store, prefix="q/", limit=10) for i in page] == ids[25:]
    assert list(pages(store, prefix="r/", limit=10)) == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"imageIds": ["' + b'", "'.join([b"same"] * 1000) + b'"]}',  # one ID, repeated
        b'{"imageIds": ["b", "a"]}',  # out of order
        b'{"imageIds": ["' + b'", "'.join(b"i%05d" % n for n in range(1001)) + b'"]}',  # too long
    ],
)
def test_a_server_that_answers_garbage_to_the_listing_cannot_make_anyone_page_for_ever(
    body: bytes,
) -> None:
    with odd_server() as (srv, client):
        srv.answers[("GET", LISTING)] = (200, body)
        assert held_ids(client) is None  # no adoption; and no endless loop
        assert srv.seen.count(("GET", LISTING)) == 1


def test_a_reconcile_whose_listing_fails_for_now_syncs_and_adopts_later(
    ws: Workspace, tmp_path: Path
) -> None:
    """A new ledger on featsync serve lists what the context holds (adoption); a failed
    listing defers it, unbound, to the next cycle, and the sync goes on."""
    from tests.conftest import start_server
    from tests.test_aspose import CREDS, served_ids, use_server

    data = tmp_path / "serve-data"
    healthy = start_server(data)
    port = int(healthy.api.split(":")[2].split("/")[0])
    context_id = use_server(ws, healthy, max_retries=0)
    ctx = dict(ws.overrides["context"])
    client = LocalContext(str(data / f"{context_id}.search"))
    try:  # held by the context, unknown to the (new) ledger, no file: to be deleted
        client.add_features("stray.jpg", textured_bytes(99, "JPEG"))
    finally:
        client.close()
    healthy.stop()
    for n in range(4):
        set_mtime_past(ws.image(f"k{n}.jpg", n))
    ws.write_config(sync={"folder": "images"}, context=ctx)
    failing = start_server(data, "--error-rate", "1", port=port)
    try:
        r = featsync("reconcile", cwd=ws.base, env=CREDS)
    finally:
        failing.stop()
    assert r.returncode == 1 and "context_adoption_deferred" in r.stderr, r.stderr
    healthy = start_server(data, port=port)
    try:
        r = featsync("reconcile", cwd=ws.base, env=CREDS)
        assert r.returncode == 0, r.stderr
        assert "context_adopted" in r.stderr
        assert served_ids(healthy, context_id) == {f"k{n}.jpg" for n in range(4)}
    finally:
        healthy.stop()


def test_a_400_to_the_listing_is_cannot_list_for_that_call_only() -> None:
    """A 400 is about the request (a bound, say), not the route: asked again next time;
    a 404 or 405 is the route missing, remembered."""
    with odd_server() as (srv, client):
        srv.answers[("GET", LISTING)] = (400, b'{"error": {"message": "bad bound"}}')
        assert client.image_id_page("", None, 10) is None
        srv.answers[("GET", LISTING)] = (200, b'{"imageIds": ["a", "b"]}')
        assert client.image_id_page("", None, 10) == ["a", "b"]
        srv.answers[("GET", LISTING)] = (404, b"{}")
        assert client.image_id_page("b", None, 10) is None
        srv.answers[("GET", LISTING)] = (200, b'{"imageIds": ["c"]}')
        assert client.image_id_page("b", None, 10) is None  # remembered
        assert srv.seen.count(("GET", LISTING)) == 3
