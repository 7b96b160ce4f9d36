"""featsync against `featsync serve` over HTTP: end to end, tokens, secrets, errors, faults."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import ssl
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from featsync import config
from featsync.aspose import AsposeContext, ClientSettings
from featsync.engine import Engine
from featsync.errors import (
    ConfigError,
    Fatal,
    ItemRejected,
    NotFound,
    SourceChanged,
    Transient,
)
from featsync.ledger import SqlLedger
from featsync.localcontext import LocalContext
from featsync.model import OpenImage, Secret, State
from featsync.samples import textured_bytes
from featsync.wiring import open_context
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    Server,
    Workspace,
    new_context,
    set_mtime_past,
    start_server,
)
from tests.test_cli import featsync, json_lines

CREDS = {"FEATSYNC_CLIENT_ID": CLIENT_ID, "FEATSYNC_CLIENT_SECRET": CLIENT_SECRET}


def use_server(ws: Workspace, srv: Server, **context: Any) -> str:
    """Point the workspace's config at a new search context on `srv`; its id."""
    for _ in range(20):  # a server with injected faults may fail the creation
        try:
            maker = new_context(srv)
        except Transient:
            continue
        break
    context_id = maker.settings.context_id
    maker.close()
    ws.write_config(
        sync={"folder": "images", "concurrency": 4},
        context={
            "kind": "aspose",
            "base_url": srv.api,
            "auth_url": srv.token_url,
            "context_id": context_id,
            "trust_env": False,
            **context,
        },
    )
    return context_id


def served_ids(srv: Server, context_id: str) -> set[str]:
    """What the server's store holds, read from its file (the server keeps it open in WAL)."""
    ctx = LocalContext(str(srv.data / f"{context_id}.search"))
    try:
        return set(ctx.image_ids())
    finally:
        ctx.close()


def requests_for(srv: Server, context_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in srv.log_events()
        if e["event"] == "http_request" and f"/{context_id}/" in e["path"]
    ]


def test_reconcile_syncs_a_folder_end_to_end_over_http(ws: Workspace, server: Server) -> None:
    context_id = use_server(ws, server)
    for n, name in enumerate(["a.jpg", "b.jpg", "sub/c.png"]):
        set_mtime_past(ws.image(name, n, "PNG" if name.endswith("png") else "JPEG"))
    first = featsync("reconcile", cwd=ws.base, env=CREDS)
    assert first.returncode == 0, first.stderr
    assert served_ids(server, context_id) == {"a.jpg", "b.jpg", "sub/c.png"}

    calls_before = len(requests_for(server, context_id))
    again = featsync("reconcile", cwd=ws.base, env=CREDS)
    assert again.returncode == 0
    assert len(requests_for(server, context_id)) == calls_before  # nothing changed: no call

    set_mtime_past(ws.image("a.jpg", 10))  # changed
    (ws.images / "b.jpg").unlink()  # gone
    (ws.images / "sub" / "c.png").rename(ws.images / "sub" / "d.png")  # moved
    third = featsync("reconcile", cwd=ws.base, env=CREDS)
    assert third.returncode == 0, third.stderr
    assert served_ids(server, context_id) == {"a.jpg", "sub/d.png"}
    events = Counter(e["event"] for e in json_lines(third.stderr))
    assert (events["image_updated"], events["image_added"], events["image_deleted"]) == (1, 1, 2)


def test_token_expiry_in_the_middle_of_a_reconcile_is_invisible(
    ws: Workspace, tmp_path: Path
) -> None:
    srv = start_server(tmp_path / "short-tokens", "--token-lifetime", "0.5", "--latency", "0.1")
    try:
        context_id = use_server(ws, srv)
        for n in range(40):
            set_mtime_past(ws.image(f"i{n:02d}.jpg", n))
        r = featsync("reconcile", cwd=ws.base, env=CREDS)
        assert r.returncode == 0, r.stderr
        events = Counter(e["event"] for e in json_lines(r.stderr))
        assert events["image_added"] == 40 and events["image_failed"] == 0
        assert events["token_fetched"] >= 2  # the run outlived its first token (10 x 0.1 s)
        assert len(served_ids(srv, context_id)) == 40
    finally:
        srv.stop()


def test_a_restarted_server_forgets_its_tokens_and_the_client_gets_a_new_one(
    tmp_path: Path,
) -> None:
    srv = start_server(tmp_path / "data", "--access-log")
    port = int(srv.url.rsplit(":", 1)[1])
    client = new_context(srv)
    try:
        client.add_features("a.jpg", textured_bytes(1))
        srv.stop()
        srv = start_server(tmp_path / "data", "--access-log", port=port)
        client.add_features("b.jpg", textured_bytes(2))  # old token: 401, new token, repeat
        assert client.get_features("a.jpg").features_count > 0  # the context persisted
        statuses = [e["status"] for e in srv.log_events() if e["event"] == "http_request"]
        assert statuses[:2] == [401, 200]
    finally:
        client.close()
        srv.stop()


def test_a_revoked_secret_stops_the_run_with_exit_2_and_a_clear_message(
    ws: Workspace, server: Server
) -> None:
    use_server(ws, server)
    set_mtime_past(ws.image("a.jpg", 1))
    wrong = {**CREDS, "FEATSYNC_CLIENT_SECRET": "revoked-secret-0000"}
    r = featsync("reconcile", cwd=ws.base, env=wrong)
    assert r.returncode == 2
    assert (
        "refused client 'featsync-tests'" in r.stderr
        and "check the client ID and secret" in r.stderr
    )
    assert "revoked-secret-0000" not in r.stderr + r.stdout


def test_secrets_and_tokens_never_reach_logs_errors_or_status(
    ws: Workspace, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in CREDS.items():
        monkeypatch.setenv(key, value)
    use_server(ws, server)
    set_mtime_past(ws.image("good.jpg", 1))
    (ws.images / "broken.jpg").write_bytes(b"not an image")
    settings = ws.settings()
    ledger = SqlLedger(settings.ledger.url)
    with capture_logs() as logs:
        context = open_context(settings, structlog.get_logger())
        try:
            report = Engine(settings, ledger, context, structlog.get_logger()).cycle()
            assert isinstance(context, AsposeContext)
            token = context._tokens._access
            shown = repr(context) + repr(settings) + repr(report)
        finally:
            context.close()
            ledger.close()
    assert token and report.applied is not None and report.applied.failed == 1
    st = featsync("status", "--json", cwd=ws.base, env=CREDS)
    rec = featsync("reconcile", cwd=ws.base, env=CREDS)
    everything = json.dumps(logs) + shown + st.stdout + st.stderr + rec.stdout + rec.stderr
    assert "broken.jpg" in everything  # the failure is there, with its reason
    assert CLIENT_SECRET not in everything and token not in everything


def test_a_secret_written_in_the_config_is_refused_without_being_shown(
    ws: Workspace,
) -> None:
    ws.write_config(context={"kind": "aspose", "client_secret": "inline-secret-1234"})
    r = featsync("reconcile", cwd=ws.base)
    assert r.returncode == 2
    assert "context.client_secret" in r.stderr and "FEATSYNC_CLIENT_SECRET" in r.stderr
    assert "inline-secret-1234" not in r.stderr + r.stdout
    with pytest.raises(ConfigError) as caught:
        ws.settings()
    assert "inline-secret-1234" not in str(caught.value)


def test_credentials_come_from_the_environment_or_files_credentials_directory_first(
    ws: Workspace, tmp_path: Path
) -> None:
    creds_dir = tmp_path / "creds"
    creds_dir.mkdir()
    (creds_dir / "aspose-secret").write_text("from-systemd\n")
    (ws.base / "aspose-secret").write_text("next-to-config\n")
    ws.write_config(
        context={"kind": "aspose", "client_id": "me", "client_secret_file": "aspose-secret"}
    )
    settings = ws.settings()
    client_id, secret = config.credentials(settings, {"CREDENTIALS_DIRECTORY": str(creds_dir)})
    assert (client_id, secret.reveal()) == ("me", "from-systemd")
    assert config.credentials(settings, {})[1].reveal() == "next-to-config"
    env = {"FEATSYNC_CLIENT_ID": "env-id", "FEATSYNC_CLIENT_SECRET": "env-secret"}
    client_id, secret = config.credentials(settings, env)
    assert (client_id, secret.reveal()) == ("env-id", "env-secret")
    assert "env-secret" not in repr(secret)
    ws.write_config(context={"kind": "aspose", "client_id": "me", "client_secret_file": "nope"})
    with pytest.raises(Fatal, match="'nope' not found"):
        config.credentials(ws.settings(), {})


# -- a server of the test's own, for answers featsync serve never gives -------------------


class OddServer(http.server.ThreadingHTTPServer):
    # (method, path) -> (status, body) or (status, body, headers)
    answers: dict[tuple[str, str], tuple[Any, ...]]
    # The answer to every other call but the token's: a server that is not the API.
    # "{auth}" in its body is replaced by the request's Authorization header (an echo).
    fallback: tuple[int, bytes] | None
    seen: list[tuple[str, str]]
    url: str


class OddHandler(http.server.BaseHTTPRequestHandler):
    server: OddServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        path = self.path.split("?")[0]
        self.server.seen.append((self.command, path))
        headers: dict[str, str] = {}
        if (self.command, path) in self.server.answers:
            status, body, *more = self.server.answers[(self.command, path)]
            headers = more[0] if more else {}
        elif path == "/connect/token":
            status, body = 200, b'{"access_token": "t0k3n", "expires_in": 3600}'
        elif self.server.fallback is not None:
            status, body = self.server.fallback
            body = body.replace(b"{auth}", self.headers.get("Authorization", "").encode())
        elif path.endswith("/status"):  # the API: asked before an image is blamed
            status, body = 200, b'{"id": "c1", "searchStatus": "Idle"}'
        else:
            status, body = 404, b"{}"
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def odd() -> Iterator[tuple[OddServer, AsposeContext]]:
    with odd_server() as (srv, client):
        yield srv, client


@contextlib.contextmanager
def odd_server(tls: ssl.SSLContext | None = None) -> Iterator[tuple[OddServer, AsposeContext]]:
    """An OddServer on loopback (HTTPS with `tls`) and a client of context "c1" on it."""
    srv = OddServer(("127.0.0.1", 0), OddHandler)
    srv.answers, srv.seen, srv.fallback = {}, [], None
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    url = srv.url = f"{'https' if tls else 'http'}://127.0.0.1:{srv.server_address[1]}"
    settings = ClientSettings(
        base_url=url + "/v3.0",
        auth_url=url + "/connect/token",
        context_id="c1",
        trust_env=False,
        max_retries=1,
        backoff_max=0.1,
    )
    client = AsposeContext(settings, "id", Secret("s"))
    try:
        yield srv, client
    finally:
        client.close()
        srv.shutdown()
        srv.server_close()
        thread.join()


FEATURES = "/v3.0/imaging/ai/imageSearch/c1/features"


def test_both_error_body_shapes_become_the_reason(odd: tuple[OddServer, AsposeContext]) -> None:
    srv, client = odd
    srv.answers[("PUT", FEATURES)] = (400, b'{"Message": "Value cannot be null."}')
    with pytest.raises(ItemRejected, match="Value cannot be null"):
        client.update_features("a.jpg", b"x")
    srv.answers[("PUT", FEATURES)] = (
        400,
        b'{"error": {"code": "BadImage", "message": "Image is broken", "description": "at 0"}}',
    )
    with pytest.raises(ItemRejected, match="Image is broken: at 0"):
        client.update_features("a.jpg", b"x")
    srv.answers[("DELETE", FEATURES)] = (404, b'{"Message": "Features for image a.jpg not found"}')
    with pytest.raises(NotFound, match=r"Features for image a\.jpg not found"):
        client.delete_features("a.jpg")


def test_garbage_and_refusals_are_classified(odd: tuple[OddServer, AsposeContext]) -> None:
    srv, client = odd
    srv.answers[("GET", FEATURES)] = (200, b"<html>proxy error page</html>")
    with pytest.raises(Transient, match="not JSON"):
        client.get_features("a.jpg")
    srv.answers[("GET", FEATURES)] = (503, b"busy")
    with pytest.raises(Transient, match="HTTP 503"):
        client.get_features("a.jpg")
    srv.answers[("DELETE", FEATURES)] = (403, b'{"error": {"message": "plan expired"}}')
    with pytest.raises(Fatal, match="plan expired"):
        client.delete_features("a.jpg")
    # An add the server refuses because the features exist (as the contract leaves open):
    srv.answers[("POST", FEATURES)] = (400, b'{"error": {"message": "duplicate"}}')
    srv.answers[("GET", FEATURES)] = (
        200,
        b'{"imageId": "a.jpg", "featuresCount": 0, "featureLengthInBits": 488, "features": ""}',
    )
    with pytest.raises(Exception, match="already exist"):
        client.add_features("a.jpg", b"x")


# -- the fault drill ------------------------------------------------------------------------


def test_fault_drill_converges_with_nothing_lost_and_repeats_bounded(
    ws: Workspace, tmp_path: Path
) -> None:
    srv = start_server(
        tmp_path / "faulty",
        "--access-log",
        "--latency", "0.05",
        "--error-rate", "0.2",
        "--throttle-rate", "0.1",
        "--retry-after", "0.2",
        "--drop-rate", "0.05",
        "--token-lifetime", "2",
        "--seed", "7",
    )  # fmt: skip
    try:
        context_id = use_server(ws, srv, max_retries=4, backoff_max=2.0)
        names = {f"d{n % 3}/img {n:02d}.jpg" for n in range(30)}
        for n, name in enumerate(sorted(names)):
            set_mtime_past(ws.image(name, n))
        codes = []
        for _ in range(6):
            r = featsync("reconcile", cwd=ws.base, env=CREDS)
            assert r.returncode in (0, 1), r.stderr
            codes.append(r.returncode)
            if r.returncode == 0:
                break
        print("drill exit codes", codes)
        assert codes[-1] == 0, codes
        assert served_ids(srv, context_id) == names
        ledger = ws.ledger()
        try:
            rows = ledger.load()
        finally:
            ledger.close()
        assert {i for i, r in rows.items() if r.state == State.SYNCED} == names
        sends = Counter(
            e["image_id"]
            for e in requests_for(srv, context_id)
            if e["method"] in ("POST", "PUT") and e["path"].endswith("/features")
        )
        assert set(sends) == names
        assert max(sends.values()) <= 2 * (1 + 4), sends.most_common(3)
        injected = Counter(e["status"] for e in requests_for(srv, context_id))
        print("drill statuses", injected, "sends per image max", max(sends.values()))
        assert injected[500] + injected[503] > 0 and injected[429] > 0
    finally:
        srv.stop()
    assert os.path.exists(srv.log_path)


def test_wait_idle_polls_until_idle_and_gives_up_after_its_bound(
    odd: tuple[OddServer, AsposeContext],
) -> None:
    srv, client = odd
    status = "/v3.0/imaging/ai/imageSearch/c1/status"
    srv.answers[("GET", status)] = (200, b'{"id": "c1", "searchStatus": "Idle"}')
    client.wait_idle(timeout=1)
    srv.answers[("GET", status)] = (200, b'{"Id": "c1", "SearchStatus": "ExtractingFeatures"}')
    with pytest.raises(Transient, match=r"still 'ExtractingFeatures' after 0\.5 s"):
        client.wait_idle(timeout=0.5)


def test_the_operator_commands_drive_a_context(ws: Workspace, server: Server) -> None:
    ws.write_config(
        context={
            "kind": "aspose",
            "base_url": server.api,
            "auth_url": server.token_url,
            "trust_env": False,
        }
    )
    made = featsync("context", "create", cwd=ws.base, env=CREDS)
    assert made.returncode == 0, made.stderr
    context_id = made.stdout.strip()
    use = {**ws.overrides["context"], "context_id": context_id}
    ws.write_config(context=use)
    assert featsync("context", "status", cwd=ws.base, env=CREDS).stdout.strip() == "Idle"
    image = ws.image("one.jpg", 1)
    other = ws.image("two.jpg", 2)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return featsync(*args, cwd=ws.base, env=CREDS)

    assert run("features", "add", "shop/one.jpg", "--file", str(image)).returncode == 0
    got = json.loads(run("features", "get", "shop/one.jpg").stdout)
    assert got["imageId"] == "shop/one.jpg" and got["featureLengthInBits"] == 488
    assert run("features", "update", "shop/one.jpg", "--file", str(other)).returncode == 0
    assert json.loads(run("features", "get", "shop/one.jpg").stdout) != got
    assert run("features", "delete", "shop/one.jpg").returncode == 0
    missing = run("features", "get", "shop/one.jpg")
    assert missing.returncode == 1 and "not found" in missing.stderr
    refused = run("context", "delete")
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert run("context", "delete", "--yes").returncode == 0
    gone = run("context", "status")
    assert gone.returncode == 2 and f"search context {context_id!r} not found" in gone.stderr


def test_serve_speaks_the_wire_protocol_as_the_contract_says(server: Server) -> None:
    import requests

    s = requests.Session()
    s.trust_env = False
    try:
        unauth = s.post(f"{server.url}/v3/imaging/ai/imageSearch/create", timeout=10)
        assert unauth.status_code == 401 and "error" in unauth.json()
        token = s.post(
            f"{server.url}/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
            },
            timeout=10,
        ).json()
        assert token["token_type"] == "Bearer" and token["expires_in"] > 0  # noqa: S105 - the token type, not a secret
        s.headers["Authorization"] = f"Bearer {token['access_token']}"
        api = f"{server.url}/v3/imaging/ai/imageSearch"
        made = s.post(f"{api}/create", timeout=10)
        assert made.status_code == 200 and made.json()["searchStatus"] == "Idle"
        ctx = f"{api}/{made.json()['id']}"
        # the raw body, as curl -T sends it
        raw = s.post(f"{ctx}/features?imageId=raw.jpg", data=textured_bytes(5), timeout=30)
        assert (raw.status_code, raw.content) == (200, b"")
        body = s.get(f"{ctx}/features", params={"imageId": "raw.jpg"}, timeout=10).json()
        assert set(body) == {"imageId", "featuresCount", "featureLengthInBits", "features"}
        # tags as a raw JSON body, as the tutorial's curl sends them
        tag = s.post(f"{ctx}/addTag?tagName=t", data=textured_bytes(5), timeout=30)
        assert tag.status_code == 200
        found = s.post(
            f"{ctx}/findByTags?similarityThreshold=50&maxCount=3", data='["t"]', timeout=30
        )
        assert [r["imageId"] for r in found.json()["results"]] == ["raw.jpg"]
        missing = s.get(f"{ctx}/features", params={"imageId": "nope"}, timeout=10)
        assert missing.status_code == 404 and missing.json()["error"]["message"]
        bad = s.get(f"{ctx}/findSimilar", params={"maxCount": "x"}, timeout=10)
        assert bad.status_code == 400 and "similarityThreshold" in bad.json()["error"]["message"]
        nowhere = s.get(f"{server.url}/v3.0/no/such/path", timeout=10)
        assert nowhere.status_code == 404 and "error" in nowhere.json()
    finally:
        s.close()


def test_a_file_that_shrinks_while_it_is_uploaded_is_source_changed_not_a_network_error(
    server: Server, tmp_path: Path
) -> None:
    """The upload streams from the open file: if it ends early, the call fails at once
    as SourceChanged (apply defers the image), not as a connection error that urllib3
    would retry and that would make the service look down."""
    data = textured_bytes(3)
    path = tmp_path / "shrinks.jpg"
    path.write_bytes(data)
    ctx = new_context(server)
    fd = os.open(path, os.O_RDONLY)
    try:
        with capture_logs() as logs, pytest.raises(SourceChanged, match="shrank"):
            ctx.add_features("shrinks.jpg", OpenImage(fd, len(data) + 1000, "shrinks.jpg"))
        assert [e for e in logs if e["event"] == "http_retry"] == []
        ctx.add_features("shrinks.jpg", OpenImage(fd, len(data), "shrinks.jpg"))
        assert ctx.get_features("shrinks.jpg").features_count > 20
    finally:
        os.close(fd)
        ctx.close()


def test_a_redirect_is_a_config_error_and_is_never_followed(
    odd: tuple[OddServer, AsposeContext],
) -> None:
    """Following a 301 would turn an add into a GET whose 200 looks like success."""
    srv, client = odd
    srv.answers[("POST", FEATURES)] = (301, b"", {"Location": "https://elsewhere.example/x"})
    with pytest.raises(Fatal, match=r"HTTP 301, a redirect to .*elsewhere.*check context.base_url"):
        client.add_features("a.jpg", b"x")
    assert [m for m, p in srv.seen if p == FEATURES] == ["POST"]  # no GET behind it
    srv.answers[("POST", "/connect/token")] = (302, b"", {"Location": "/login"})
    client._tokens.forget("t0k3n")
    with pytest.raises(Fatal, match=r"check context\.auth_url"):
        client.delete_features("a.jpg")


def test_a_408_is_transient_not_the_images_fault(odd: tuple[OddServer, AsposeContext]) -> None:
    srv, client = odd
    srv.answers[("PUT", FEATURES)] = (408, b'{"error": {"message": "request timeout"}}')
    with pytest.raises(Transient, match="HTTP 408"):
        client.update_features("a.jpg", b"x")


def test_an_untrusted_certificate_is_fatal_with_the_fix(tmp_path: Path) -> None:
    """Retrying cannot make a certificate trusted: the run stops and says what to do."""
    import shutil

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    with odd_server(tls) as (_srv, client), pytest.raises(Fatal, match=r"TLS failed.*CA_BUNDLE"):
        client.get_features("a.jpg")
