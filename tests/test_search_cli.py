"""`featsync search` and `featsync duplicates`: a real folder of generated images synced
by a `featsync reconcile` subprocess, then searched by `featsync search` / `duplicates`
subprocesses, against the embedded context and through `featsync serve` (kind =
"aspose"): what is found first, what is not found, the paths, the groups, the JSON, the
exit codes, bad input, a reader going away and Ctrl-C."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from featsync.samples import encode, textured_bytes, textured_image
from tests.conftest import Server, Workspace, set_mtime_past, start_server, wait_for
from tests.test_aspose import CREDS, use_server
from tests.test_cli import featsync

# File names a terminal must not take as they are: a newline and an escape sequence
# (the embedded context); Aspose refuses control characters in an image ID, so through
# `featsync serve` a line separator and a right-to-left override (as printed, escaped).
ODD = {
    "embedded": ("odd\nname\x1b[31m.jpg", "odd\\nname\\x1b[31m.jpg"),
    "serve": ("odd\u2028name\u202e.jpg", "odd\\u2028name\\u202e.jpg"),
}
KEYS = {"imageId", "similarity", "path", "inLedger"}


@dataclass
class Synced:
    """A synced folder: 10 images img0..img9, copies of img0 and img5 under other names,
    a re-encoded copy of img0, a file with an odd name, and `stray-id`: an image added to
    the context by hand, which the ledger does not know. `queries`: files outside it."""

    ws: Workspace
    env: dict[str, str]
    queries: Path
    odd: tuple[str, str]  # the odd file name, and as it is printed

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return featsync(*args, cwd=self.ws.base, env=self.env)

    def doc(self, *args: str, code: int = 0) -> Any:
        r = self.run(*args, "--json")
        assert r.returncode == code, r.stderr[-2000:]
        return json.loads(r.stdout)


def _put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    set_mtime_past(path)
    return path


def _smaller(seed: int) -> bytes:
    """A resized, re-encoded copy of `textured_image(seed)`."""
    return encode(textured_image(seed).resize((288, 216)), "JPEG", quality=85)


@pytest.fixture(scope="module", params=["embedded", "serve"])
def synced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Synced:
    ws = Workspace(tmp_path_factory.mktemp(f"search-{request.param}"))
    ws.images.mkdir()
    env: dict[str, str] = {}
    if request.param == "serve":
        server: Server = request.getfixturevalue("server")
        use_server(ws, server)
        env = CREDS
    else:
        ws.write_config(sync={"folder": "images"})
    for n in range(10):
        _put(ws.images / f"img{n}.jpg", textured_bytes(600 + n))
    _put(ws.images / "dup" / "same-content.jpg", (ws.images / "img0.jpg").read_bytes())
    _put(ws.images / "dup" / "re-encoded.jpg", encode(textured_image(600), "JPEG", quality=70))
    _put(ws.images / "dup" / "img5-copy.jpg", (ws.images / "img5.jpg").read_bytes())
    _put(ws.images / ODD[request.param][0], textured_bytes(620))
    r = featsync("reconcile", cwd=ws.base, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    queries = ws.base / "queries"
    stray = _put(queries / "stray.jpg", textured_bytes(630))
    r = featsync("features", "add", "stray-id", "--file", str(stray), cwd=ws.base, env=env)
    assert r.returncode == 0, r.stderr
    _put(queries / "img3-smaller.jpg", _smaller(603))
    _put(queries / "odd-smaller.jpg", _smaller(620))
    _put(queries / "stray-smaller.jpg", _smaller(630))
    _put(queries / "unrelated.jpg", textured_bytes(999))
    _put(queries / "not-an-image.jpg", b"plain text, not an image\n" * 10)
    return Synced(ws, env, queries, ODD[request.param])


def test_a_resized_reencoded_copy_finds_its_original_first(synced: Synced) -> None:
    query = str(synced.queries / "img3-smaller.jpg")
    r = synced.run("search", query)
    assert r.returncode == 0, r.stderr
    head, first, *_ = r.stdout.splitlines()
    assert head.startswith(f"similar to FILE {query} (similarity >= 60): ")
    similarity, image_id, path = first.split()
    assert (image_id, path) == ("img3.jpg", "img3.jpg")
    assert 60 <= float(similarity) <= 100 and len(similarity.split(".")[1]) == 1
    doc = synced.doc("search", query)
    assert doc["query"] == {"file": query, "imageId": None}
    assert (doc["threshold"], doc["max"]) == (60, 10)
    assert all(set(x) == KEYS for x in doc["results"])
    best = doc["results"][0]
    assert best["imageId"] == "img3.jpg" and best["path"] == "img3.jpg" and best["inLedger"]
    assert float(similarity) == round(best["similarity"], 1)


def test_an_unrelated_image_finds_nothing_and_exits_1(synced: Synced) -> None:
    query = str(synced.queries / "unrelated.jpg")
    r = synced.run("search", query, "--threshold", "60")
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == [f"similar to FILE {query} (similarity >= 60): none found"]
    assert synced.doc("search", query, code=1)["results"] == []
    found = synced.doc("search", query, "--threshold", "0", "--max", "3")["results"]
    assert len(found) == 3 and all(x["similarity"] < 60 for x in found)  # only above 0


def test_search_by_id_lists_its_copies_and_leaves_itself_out(synced: Synced) -> None:
    doc = synced.doc("search", "--id", "img0.jpg")
    assert doc["query"] == {"file": None, "imageId": "img0.jpg"}
    ids = [x["imageId"] for x in doc["results"]]
    assert ids[0] == "dup/same-content.jpg" and doc["results"][0]["similarity"] == 100
    assert set(ids) == {"dup/same-content.jpg", "dup/re-encoded.jpg"}
    one = synced.doc("search", "--id", "img0.jpg", "--max", "1")["results"]
    assert [x["imageId"] for x in one] == ["dup/same-content.jpg"]
    lonely = synced.run("search", "--id", "img1.jpg")  # no copy of it: nothing, exit 1
    assert lonely.returncode == 1 and lonely.stdout.endswith("none found\n"), lonely.stderr


def test_duplicates_are_grouped_largest_group_first(synced: Synced) -> None:
    doc = synced.doc("duplicates")
    assert doc["threshold"] == 90
    groups = [[x["imageId"] for x in g] for g in doc["groups"]]
    assert [sorted(g) for g in groups] == [
        ["dup/re-encoded.jpg", "dup/same-content.jpg", "img0.jpg"],
        ["dup/img5-copy.jpg", "img5.jpg"],
    ]
    assert all(set(x) == KEYS and x["path"] == x["imageId"] for g in doc["groups"] for x in g)
    r = synced.run("duplicates")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "near duplicates (similarity >= 90): 2 group(s) of 5 images"
    assert lines[1:3] == ["", "group 1 (3 images, similarity to its first):"]
    assert [x.split()[1] for x in lines[3:6]] == groups[0]
    assert lines[6:8] == ["", "group 2 (2 images, similarity to its first):"]
    assert len(lines) == 10
    exact = synced.doc("duplicates", "--threshold", "100.0")["groups"]  # copies only
    assert sorted(sorted(x["imageId"] for x in g) for g in exact) == [
        ["dup/img5-copy.jpg", "img5.jpg"],
        ["dup/same-content.jpg", "img0.jpg"],
    ]


def test_an_odd_file_name_is_printed_escaped(synced: Synced) -> None:
    r = synced.run("search", str(synced.queries / "odd-smaller.jpg"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    name, shown = synced.odd
    assert len(lines) == 2 and lines[1].split("  ")[2:] == [shown, shown]
    assert r.stdout.isascii()
    [hit] = synced.doc("search", str(synced.queries / "odd-smaller.jpg"))["results"]
    assert hit["imageId"] == name and hit["path"] == name  # JSON: the name as it is


def test_an_image_the_ledger_does_not_know_is_shown_without_a_path(synced: Synced) -> None:
    query = str(synced.queries / "stray-smaller.jpg")
    r = synced.run("search", query)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].endswith("  stray-id  (not in the ledger: no path known)")
    [hit] = synced.doc("search", query)["results"]
    assert hit["imageId"] == "stray-id" and hit["path"] is None and hit["inLedger"] is False


def test_what_the_context_refuses_is_said_with_exit_2(synced: Synced) -> None:
    r = synced.run("search", "--id", "no-such-id")
    assert r.returncode == 2 and r.stdout == ""
    assert "search --id 'no-such-id': the context holds no image of that ID" in r.stderr
    text = str(synced.queries / "not-an-image.jpg")
    r = synced.run("search", text, "--json")
    assert r.returncode == 2 and r.stdout == ""
    assert f"featsync: search FILE '{text}': not an image the context takes: " in r.stderr


def test_a_reader_going_away_ends_it_quietly(synced: Synced) -> None:
    """`featsync duplicates | head -0`: the pipe's reader is gone before anything is
    written; exit 141 (128 + SIGPIPE), no traceback, no 'Exception ignored'. Buffered
    as in a shell (not PYTHONUNBUFFERED): the write fails at the last flush."""
    env = {k: v for k, v in _env().items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "featsync", "duplicates"],
        cwd=synced.ws.base,
        env={**env, **synced.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_only_the_context_the_ledger_mirrors_is_searched(synced: Synced) -> None:
    other = synced.ws.base / "other.toml"
    other.write_text(
        '[sync]\nfolder = "images"\n[context]\npath = "another-context.db"\n', encoding="utf-8"
    )
    r = synced.run("--config", str(other), "duplicates")
    assert r.returncode == 2 and r.stdout == ""
    assert "but the ledger mirrors" in r.stderr and "reconcile --resync" in r.stderr


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "FEATSYNC_CONFIG"}


def _unprivileged() -> tuple[str, ...]:
    """As root, run without CAP_DAC_* so that file permissions bite (as test_cli does)."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and util-linux setpriv is not installed")
    return (setpriv, "--bounding-set=-dac_override,-dac_read_search")


@pytest.fixture
def bare(ws: Workspace) -> Workspace:
    """A workspace never synced, its [sync] max_file_size 2,000 bytes."""
    ws.write_config(sync={"folder": "images", "max_file_size": 2000})
    _put(ws.base / "small.png", encode(textured_image(1, (24, 16)), "PNG"))
    _put(ws.base / "big.jpg", textured_bytes(2))
    _put(ws.base / "empty.jpg", b"")
    _put(ws.base / "secret.jpg", textured_bytes(3)).chmod(0o000)
    (ws.base / "folder.jpg").mkdir()
    os.mkfifo(ws.base / "fifo.jpg")
    return ws


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["search", "missing.jpg"], "search FILE 'missing.jpg': no such file"),
        (["search", "folder.jpg"], "search FILE 'folder.jpg': is a folder, not an image file"),
        (["search", "secret.jpg"], "search FILE 'secret.jpg': cannot open it: Permission denied"),
        (["search", "fifo.jpg"], "search FILE 'fifo.jpg': not a regular file"),
        (["search", "big.jpg"], "search FILE 'big.jpg': "),
        (["search", "empty.jpg"], "search FILE 'empty.jpg': is empty, not an image"),
        (["search", "small.png", "--id", "x"], "give an image FILE or --id IMAGE_ID, not both"),
        (["search"], "give an image FILE or --id IMAGE_ID to search with"),
        (["search", "--id", ""], "search --id: an empty image ID names no image"),
        (["search", "small.png", "--threshold", "abc"], "'abc' is not a similarity from 0 to 100"),
        (["search", "small.png", "--threshold", "100.5"], "'100.5' is not a similarity from 0 "),
        (["search", "small.png", "--threshold", "nan"], "'nan' is not a similarity from 0 to 100"),
        (["search", "small.png", "--max", "0"], "--max: '0' is not a whole number from 1 to 1000"),
        (["search", "small.png", "--max", "1001"], "'1001' is not a whole number from 1 to 1000"),
        (["search", "small.png", "--max", "ten"], "'ten' is not a whole number from 1 to 1000"),
        (["duplicates", "--threshold", "-1"], "--threshold: '-1' is not a similarity from 0 to"),
    ],
)
def test_bad_input_is_named_with_the_reason_and_exit_2(
    bare: Workspace, args: list[str], said: str
) -> None:
    r = featsync(*args, "--json", cwd=bare.base, prefix=_unprivileged())
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and said in r.stderr and "Traceback" not in r.stderr
    if args == ["search", "big.jpg"]:
        size = (bare.base / "big.jpg").stat().st_size
        assert f"{size:,} bytes, more than [sync] max_file_size 2,000" in r.stderr


def _token_requests(srv: Server) -> int:
    try:
        return sum(1 for e in srv.log_events() if e.get("path", "").endswith("/token"))
    except ValueError:  # a line half written
        return -1


def test_ctrl_c_exits_130_quietly(ws: Workspace, tmp_path: Path) -> None:
    """SIGINT while the search is on the wire (a `featsync serve` taking 2 s an
    answer): the call finishes, nothing is printed, exit 130, no traceback."""
    srv = start_server(tmp_path / "slow", "--latency", "2", "--access-log")
    try:
        use_server(ws, srv)
        query = _put(ws.base / "query.jpg", textured_bytes(5))
        tokens = _token_requests(srv)
        proc = subprocess.Popen(
            [sys.executable, "-m", "featsync", "search", str(query)],
            cwd=ws.base,
            env={**_env(), **CREDS},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: _token_requests(srv) > tokens, 60, "the search's token request")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 130, err
        assert out == "" and "Traceback" not in err
        assert '"search_stopping"' in err
        finds = [e for e in srv.log_events() if "findSimilar" in e.get("path", "")]
        assert len(finds) == 1  # the call in flight was let finish
    finally:
        srv.stop()


def test_an_image_a_sync_adds_while_the_search_runs_is_shown_with_its_path(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ledger is looked at before the search; a sync that adds an image meanwhile
    records it there before it sends it: the answer names it with its path, never "not
    in the ledger" (7 of 20 rounds in a drill beside a reconcile)."""
    from featsync import search_cli

    ws.write_config(sync={"folder": "images"})
    _put(ws.images / "first.jpg", textured_bytes(950))
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    query = _put(ws.base / "query.jpg", textured_bytes(950))
    real = search_cli.search

    def a_sync_runs_meanwhile(*args: Any, **kwargs: Any) -> Any:
        _put(ws.images / "new.jpg", textured_bytes(950))
        r = featsync("reconcile", cwd=ws.base)  # a real one, beside the search's looks
        assert r.returncode == 0, r.stderr[-2000:]
        return real(*args, **kwargs)

    monkeypatch.setattr(search_cli, "search", a_sync_runs_meanwhile)
    args = search_cli_args(file=str(query))
    assert search_cli.run(ws.settings(), args) == 0
    got = {r["imageId"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert set(got) == {"first.jpg", "new.jpg"}
    assert got["new.jpg"]["path"] == "new.jpg" and got["new.jpg"]["inLedger"] is True


def search_cli_args(**given: Any) -> argparse.Namespace:
    args = {"command": "search", "file": None, "image_id": None, "threshold": 60.0}
    return argparse.Namespace(**(args | {"max": 10, "json": True} | given))


def test_a_context_that_fails_inside_is_exit_2_never_nothing_found(ws: Workspace) -> None:
    ws.write_config(sync={"folder": "images"})
    for n in range(3):
        _put(ws.images / f"img{n}.jpg", textured_bytes(700 + n))
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    store = ws.base / "featsync-context.db"
    assert store.exists()
    with sqlite3.connect(store) as db:  # a store broken by hand: its table gone
        db.execute("DROP TABLE features")
    for args in (["search", str(ws.images / "img1.jpg")], ["duplicates"]):
        r = featsync(*args, cwd=ws.base)
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert "the context failed" in r.stderr and "no such table" in r.stderr


def test_through_serve_an_index_in_use_follows_updates_and_deletes(
    ws: Workspace, server: Server
) -> None:
    """featsync serve's index is loaded by the first search, then kept in step by the
    syncs that follow it: a replaced image is found by its new content only, a deleted
    one never again."""
    use_server(ws, server)
    for n in range(12):
        _put(ws.images / f"img{n}.jpg", textured_bytes(800 + n))
    assert featsync("reconcile", cwd=ws.base, env=CREDS).returncode == 0
    queries = ws.base / "queries"
    old, new, gone = (
        _put(queries / "old.jpg", _smaller(803)),
        _put(queries / "new.jpg", _smaller(850)),
        _put(queries / "gone.jpg", _smaller(807)),
    )

    def found(query: Path) -> list[str]:
        r = featsync("search", str(query), "--json", cwd=ws.base, env=CREDS)
        assert r.returncode in (0, 1), r.stderr[-2000:]
        return [hit["imageId"] for hit in json.loads(r.stdout)["results"]]

    assert found(old)[:1] == ["img3.jpg"]  # serve's index loaded
    _put(ws.images / "img3.jpg", textured_bytes(850))  # replaced by other content
    set_mtime_past(ws.images / "img3.jpg")
    (ws.images / "img7.jpg").unlink()
    r = featsync("reconcile", cwd=ws.base, env=CREDS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert found(new)[:1] == ["img3.jpg"]
    assert "img3.jpg" not in found(old)
    assert "img7.jpg" not in found(gone)
