"""A wrong ``[context] base_url`` stops the run with one error naming it (issue 10, item 6).

Another service, a wrong path prefix or a wrong API version makes every call answer 400,
404 or 405. featsync must not quarantine every image one by one for that, nor count a
delete as done: `reconcile` stops after a handful of calls, exits 2 and names base_url.
A genuine refusal of one image by the API is still that image's alone.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from featsync import aspose
from featsync.aspose import AsposeContext, ClientSettings
from featsync.aspose_wire import SAME_REFUSALS_FATAL
from featsync.errors import Fatal, ItemRejected, NotFound
from featsync.model import Secret
from featsync.samples import textured_bytes
from tests.conftest import CLIENT_ID, CLIENT_SECRET, Server, Workspace, set_mtime_past
from tests.test_aspose import CREDS, OddServer, odd_server, requests_for, served_ids, use_server
from tests.test_cli import featsync, json_lines

IMAGES = 12
CONCURRENCY = 4
# Calls a stopped run may have made: the ones in flight when the first answer came
# (each with the status check that judges it), and a few taken before the stop was seen.
FEW = 3 * CONCURRENCY


def _images(ws: Workspace, n: int = IMAGES) -> set[str]:
    names = {f"img{i:02d}.jpg" for i in range(n)}
    for i, name in enumerate(sorted(names)):
        set_mtime_past(ws.image(name, i))
    return names


def _status(ws: Workspace, env: dict[str, str]) -> dict[str, Any]:
    st = featsync("status", "--json", cwd=ws.base, env=env)
    data: dict[str, Any] = json.loads(st.stdout)
    return data


def _assert_stopped_naming_base_url(stderr: str, base_url: str) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("featsync: ")]
    assert len(errors) == 1, stderr
    assert "check [context] base_url" in errors[0] and base_url in errors[0], errors[0]
    assert Counter(e["event"] for e in json_lines(stderr))["fatal_error"] == 1


def _assert_none_quarantined(ws: Workspace, env: dict[str, str]) -> None:
    """No image waits for a later try because of the server: nothing was its fault."""
    status = _status(ws, env)
    waiting = [f for f in status["failures"] if f["error_kind"] != "fatal" or f["next_attempt_at"]]
    assert waiting == [], waiting


def _odd_config(ws: Workspace, srv: OddServer, concurrency: int = CONCURRENCY) -> str:
    base_url = srv.url + "/v3.0"
    ws.write_config(
        sync={"folder": "images", "concurrency": concurrency},
        context={
            "kind": "aspose",
            "base_url": base_url,
            "auth_url": srv.url + "/connect/token",
            "context_id": "c1",
            "trust_env": False,
            "max_retries": 1,
            "backoff_max": 0.1,
        },
    )
    return base_url


# -- featsync serve, base_url with a wrong path ------------------------------------------


@pytest.mark.parametrize("path", ["/v2.0", "/api/v3.0"], ids=["wrong-version", "extra-prefix"])
def test_a_wrong_path_on_featsync_serve_stops_reconcile_with_one_error_naming_base_url(
    ws: Workspace, server: Server, path: str
) -> None:
    """featsync serve answers an unknown route with an Aspose-shaped 404 ("NotFound",
    the code of a missing image too): an add is no lookup, so that is the route."""
    context_id = use_server(ws, server, base_url=server.url + path)  # 4 at a time
    _images(ws)
    r = featsync("reconcile", cwd=ws.base, env=CREDS)
    assert r.returncode == 2, r.stderr
    _assert_stopped_naming_base_url(r.stderr, server.url + path)
    calls = requests_for(server, context_id)
    assert 0 < len(calls) <= FEW, len(calls)
    assert {c["status"] for c in calls} == {404}
    assert served_ids(server, context_id) == set()
    _assert_none_quarantined(ws, CREDS)


def test_a_lookup_through_a_wrong_path_is_fatal_not_a_missing_image(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delete that meets "not found" is counted as done: through a wrong path prefix
    it must stop the run instead, or the ledger forgets images the context still holds.
    On the right path a missing image is NotFound, and costs one status check a client."""
    right = _client(server.api)
    try:
        context_id = right.create_context()
    finally:
        right.close()
    wrong = _client(server.url + "/v2.0", context_id)
    try:
        with pytest.raises(Fatal, match=r"/v2\.0 is not the Aspose imageSearch API.*base_url"):
            wrong.delete_features("a.jpg")
        with pytest.raises(Fatal, match=r"check \[context\] base_url"):
            wrong.get_features("a.jpg")
        with pytest.raises(Fatal, match=r"check \[context\] base_url"):
            wrong.update_features("a.jpg", textured_bytes(1))
        monkeypatch.setattr(aspose, "NOT_API_HOLDS_S", 0.0)  # a "no" is not kept for good:
        with pytest.raises(Fatal, match=r"check \[context\] base_url"):  # asked again
            wrong.delete_features("a.jpg")
    finally:
        wrong.close()
    good = _client(server.api, context_id)
    try:
        with pytest.raises(NotFound, match=r"'a\.jpg' not found"):
            good.delete_features("a.jpg")
        with pytest.raises(NotFound):
            good.get_features("b.jpg")
    finally:
        good.close()
    status_calls = [c for c in requests_for(server, context_id) if c["path"].endswith("/status")]
    # The wrong client asked once for three calls, then again once its "no" was old (the
    # server may be fixed while a daemon pauses); the right one asked once.
    assert [c["status"] for c in status_calls] == [404, 404, 200]


def _client(base_url: str, context_id: str = "") -> AsposeContext:
    settings = ClientSettings(
        base_url=base_url,
        auth_url=base_url.rsplit("/", 1)[0] + "/connect/token",
        context_id=context_id,
        trust_env=False,
        max_retries=1,
        backoff_max=0.1,
    )
    return AsposeContext(settings, CLIENT_ID, Secret(CLIENT_SECRET))


# -- a server that is not the API at all ---------------------------------------------------


NOT_THE_API = {
    "405": (405, b"Method Not Allowed"),
    "html-404": (404, b"<html><body><h1>404 Not Found</h1>nginx</body></html>"),
    "plain-404": (404, b"Not Found"),
    # an echo service: the body repeats the request's Authorization header
    "plain-400-echo": (400, b"Bad Request (you sent Authorization: {auth})"),
    # another API version that writes Aspose-shaped errors
    "aspose-shaped-400": (400, b'{"error": {"code": "BadRequest", "message": "no API v3.0"}}'),
}


@pytest.mark.parametrize("answer", list(NOT_THE_API), ids=list(NOT_THE_API))
def test_a_server_that_is_not_the_api_stops_reconcile_after_a_few_calls(
    ws: Workspace, answer: str
) -> None:
    env = {"FEATSYNC_CLIENT_ID": "me", "FEATSYNC_CLIENT_SECRET": "s3cret-not-to-show"}
    with odd_server() as (srv, _client):
        srv.fallback = NOT_THE_API[answer]
        base_url = _odd_config(ws, srv)
        _images(ws)
        r = featsync("reconcile", cwd=ws.base, env=env)
        calls = [p for _m, p in srv.seen if p != "/connect/token"]
    assert r.returncode == 2, r.stderr
    _assert_stopped_naming_base_url(r.stderr, base_url)
    assert 0 < len(calls) <= FEW, calls
    _assert_none_quarantined(ws, env)
    shown = r.stdout + r.stderr + json.dumps(_status(ws, env))
    assert "t0k3n" not in shown and "s3cret-not-to-show" not in shown


# -- the API answers, something in front of it refuses every upload ----------------------


def test_the_same_non_aspose_refusal_for_five_images_in_a_row_is_fatal(ws: Workspace) -> None:
    """The status route answers as the API does, but every upload gets one and the same
    HTML page (a proxy, a firewall): after SAME_REFUSALS_FATAL images the run stops."""
    with odd_server() as (srv, _client):
        features = "/v3.0/imaging/ai/imageSearch/c1/features"
        srv.answers[("POST", features)] = (400, b"<html>Request blocked by policy</html>")
        srv.answers[("GET", features)] = (404, b'{"error": {"message": "features not found"}}')
        _odd_config(ws, srv, concurrency=1)  # one at a time: the run is counted exactly
        _images(ws)
        r = featsync("reconcile", cwd=ws.base, env=CREDS)
        posts = [p for m, p in srv.seen if m == "POST" and p == features]
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("featsync: ")]
    assert len(errors) == 1 and f"{SAME_REFUSALS_FATAL} different images in a row" in errors[0]
    assert "Request blocked by policy" in errors[0] and "check [context] base_url" in errors[0]
    # apply keeps one more call queued; it may start before the stop is seen
    assert SAME_REFUSALS_FATAL <= len(posts) <= SAME_REFUSALS_FATAL + 1, posts
    kinds = Counter(f["error_kind"] for f in _status(ws, CREDS)["failures"])
    assert kinds["rejected"] == SAME_REFUSALS_FATAL - 1  # the price of telling: they wait
    assert kinds["fatal"] == len(posts) - kinds["rejected"]


# -- genuine refusals of images stay the images' own -----------------------------------------


def test_a_corrupt_image_among_good_ones_is_rejected_alone_and_the_rest_sync(
    ws: Workspace, server: Server
) -> None:
    context_id = use_server(ws, server)
    good = _images(ws)
    corrupt = {f"broken{i}.jpg" for i in range(SAME_REFUSALS_FATAL + 1)}
    for name in corrupt:
        (ws.images / name).write_bytes(b"not an image at all")
        set_mtime_past(ws.images / name)
    r = featsync("reconcile", cwd=ws.base, env=CREDS)
    assert r.returncode == 1, r.stderr
    assert served_ids(server, context_id) == good
    failures = _status(ws, CREDS)["failures"]
    assert {f["image_id"] for f in failures} == corrupt
    assert {f["error_kind"] for f in failures} == {"rejected"}
    assert all("cannot decode image" in f["error"] for f in failures)
    status_calls = [c for c in requests_for(server, context_id) if c["path"].endswith("/status")]
    assert len(status_calls) == 1  # the API was checked once before an image was blamed


def test_identical_aspose_refusals_of_many_images_never_stop_the_run(ws: Workspace) -> None:
    """Corrupt images in a row may get the same reason from Aspose itself: its refusals
    are Aspose error bodies, which never count towards the run of identical refusals."""
    with odd_server() as (srv, _client):
        features = "/v3.0/imaging/ai/imageSearch/c1/features"
        refusal = b'{"error": {"code": "BadRequest", "message": "Image is corrupt"}}'
        srv.answers[("POST", features)] = (400, refusal)
        srv.answers[("GET", features)] = (404, b'{"error": {"message": "features not found"}}')
        _odd_config(ws, srv)
        names = _images(ws)
        r = featsync("reconcile", cwd=ws.base, env=CREDS)
    assert r.returncode == 1, r.stderr
    assert "base_url" not in r.stderr
    failures = _status(ws, CREDS)["failures"]
    assert {f["image_id"] for f in failures} == names
    assert {(f["error_kind"], f["error"]) for f in failures} == {
        ("rejected", "HTTP 400: Image is corrupt")
    }


def test_a_405_from_the_client_is_fatal_naming_base_url() -> None:
    """The method of a call is fixed by the operation, never by an image."""
    with odd_server() as (srv, client):
        features = "/v3.0/imaging/ai/imageSearch/c1/features"
        srv.answers[("PUT", features)] = (
            405,
            b'{"error": {"code": "MethodNotAllowed", "message": "PUT is not allowed"}}',
        )
        srv.answers[("POST", features)] = (400, b'{"error": {"message": "Image is corrupt"}}')
        srv.answers[("GET", features)] = (404, b'{"error": {"message": "features not found"}}')
        with pytest.raises(Fatal, match=r"HTTP 405 .*check \[context\] base_url"):
            client.update_features("a.jpg", b"x")
        with pytest.raises(ItemRejected, match="Image is corrupt"):  # the add route works
            client.add_features("a.jpg", b"x")
