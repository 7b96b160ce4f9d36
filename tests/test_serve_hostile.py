"""`featsync serve` against hostile clients, each drill against a real subprocess on loopback:
half-open connections, unauthenticated uploads, token guessing, malformed input, signals,
and what reaches stderr. After every drill the server is up and answers the next request,
and its stderr holds nothing but JSON lines."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from featsync.errors import Transient
from featsync.localcontext import LocalContext
from featsync.localcontext.throttle import FailureBudget
from featsync.samples import textured_bytes
from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    Server,
    client_for,
    start_server,
    wait_for,
)

API = "/v3.0/imaging/ai/imageSearch"
MB = 1024 * 1024


# -- helpers -----------------------------------------------------------------------------


def port_of(srv: Server) -> int:
    return int(srv.url.rsplit(":", 1)[1])


def token_form(client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET) -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}


def session(srv: Server) -> requests.Session:
    """A requests session holding a valid bearer token for `srv`."""
    s = requests.Session()
    s.trust_env = False
    got = s.post(srv.token_url, data=token_form(), timeout=30)
    assert got.status_code == 200, got.text
    s.headers["Authorization"] = f"Bearer {got.json()['access_token']}"
    return s


def make_context(s: requests.Session, srv: Server) -> str:
    """A new search context on `srv`; its URL."""
    made = s.post(f"{srv.url}{API}/create", timeout=30)
    assert made.status_code == 200, made.text
    return f"{srv.url}{API}/{made.json()['id']}"


def stored_ids(srv: Server, ctx: str) -> set[str]:
    """What the server's store holds, read from its file (the server keeps it open in WAL)."""
    store = LocalContext(str(srv.data / f"{ctx.rsplit('/', 1)[1]}.search"))
    try:
        return set(store.image_ids())
    finally:
        store.close()


def part_files(srv: Server) -> list[Path]:
    return list((srv.data / "storage").rglob("*.part"))


def stderr_lines(srv: Server) -> list[str]:
    return [x for x in srv.log_path.read_text(encoding="utf-8").splitlines() if x.strip()]


def assert_json_only(srv: Server) -> None:
    """Every line the server wrote on stderr is one JSON object."""
    for line in stderr_lines(srv):
        try:
            assert isinstance(json.loads(line), dict), line
        except ValueError:
            pytest.fail(f"not a JSON line on serve's stderr: {line[:200]!r}")


def assert_serving(srv: Server) -> None:
    """The server is up, answers a real request and has written only JSON lines."""
    assert srv.proc.poll() is None, "featsync serve died"
    s = session(srv)
    try:
        ctx = make_context(s, srv)
        status = s.get(f"{ctx}/status", timeout=30)
        assert status.status_code == 200 and status.json()["searchStatus"] == "Idle"
    finally:
        s.close()
    assert_json_only(srv)


def connect(srv: Server, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port_of(srv)), timeout=timeout)


def read_answer(sock: socket.socket, timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer from a raw socket: status, headers (lower-case names), body."""
    deadline = time.monotonic() + timeout
    buf = b""

    def more() -> bytes:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a whole answer: {buf[:200]!r}")
        return chunk

    while b"\r\n\r\n" not in buf:
        buf += more()
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        body += more()
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed `sock` (EOF or reset); never blocks long."""
    sock.settimeout(0.05)
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def server_temp_files(srv: Server) -> list[str]:
    """Files the server process holds open that are not its sockets, pipes or stores."""
    fd_dir = f"/proc/{srv.proc.pid}/fd"
    found = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(("socket:", "pipe:", "anon_inode:", "/dev/")):
            continue
        if str(srv.data) in target and ".search" in target:
            continue
        if target.endswith((".log", ".py", ".pyc", ".so")) or "site-packages" in target:
            continue
        found.append(target)
    return found


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `featsync serve` for the drills that need no private one."""
    server = start_server(tmp_path_factory.mktemp("hostile") / "data", "--access-log")
    yield server
    server.stop()


@pytest.fixture
def api(srv: Server) -> Iterator[tuple[requests.Session, str]]:
    """A session with a token and a fresh context of its own on the shared server."""
    s = session(srv)
    yield s, make_context(s, srv)
    s.close()


# -- 1. half-open connections --------------------------------------------------------------


def test_hundreds_of_half_open_connections_leave_room_for_a_real_client(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data")
    held: list[socket.socket] = []
    try:
        for n in range(300):  # silent, a partial request line, partial headers
            sock = connect(server)
            held.append(sock)
            if n % 3 == 1:
                sock.sendall(b"GET /v3.0/imaging/ai/imageS")
            elif n % 3 == 2:
                sock.sendall(f"POST {API}/x/features HTTP/1.1\r\nHost: a\r\n".encode())
        started = time.monotonic()
        maker = client_for(server, max_retries=0, read_timeout=20.0)
        try:
            context_id = maker.create_context()
        finally:
            maker.close()
        client = client_for(server, context_id, max_retries=0, read_timeout=20.0)
        try:
            client.add_features("a.jpg", textured_bytes(1))
            assert client.get_features("a.jpg").features_count > 0
        finally:
            client.close()
        assert time.monotonic() - started < 15  # prompt, even with the CPU busy
        assert_serving(server)
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_idle_silent_and_trickling_connections_are_closed_by_the_server(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", "--idle-timeout", "1", "--header-timeout", "2")
    silent, partial, trickle = connect(server), connect(server), connect(server)
    try:
        partial.sendall(b"GET /v3.0/imag")
        started = time.monotonic()
        request = f"GET {API}/x/status HTTP/1.1\r\nHost: a\r\nX-Slow: " + "z" * 200
        sent = 0
        while not closed_by_server(trickle):  # one byte every ~50 ms: never idle, never done
            assert time.monotonic() - started < 30, "a trickling request was never cut off"
            try:
                trickle.sendall(request[sent % len(request)].encode())
            except OSError:
                break  # closed by the server
            sent += 1
        wait_for(lambda: closed_by_server(silent), 30, "the silent connection to be closed")
        wait_for(lambda: closed_by_server(partial), 30, "the partial request to be closed")
        assert_serving(server)
    finally:
        for sock in (silent, partial, trickle):
            sock.close()
        server.stop()


def test_waitress_own_warnings_come_out_as_json_lines(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", "--connection-limit", "5")
    held: list[socket.socket] = []
    try:
        held += [connect(server) for _ in range(8)]

        def warned() -> bool:
            return any(
                e["event"] == "library_log"
                and e["logger"] == "waitress"
                and "connection limit" in e["message"]
                for e in server.log_events()
            )

        wait_for(warned, 30, "waitress's connection-limit warning")
        for sock in held:
            sock.close()
        assert_serving(server)  # closed connections make room again
    finally:
        for sock in held:
            sock.close()
        server.stop()


# -- 2. unauthenticated uploads --------------------------------------------------------------


@pytest.mark.parametrize(
    ("framing", "auth"),
    [
        ("Content-Length: 62914560", ""),
        ("Transfer-Encoding: chunked", ""),
        ("Content-Length: 62914560", "Authorization: Bearer not-a-token\r\n"),
    ],
)
def test_an_unauthenticated_upload_is_answered_401_before_its_body_is_sent(
    srv: Server, framing: str, auth: str
) -> None:
    sock = connect(srv)
    try:
        path = f"{API}/some-context/features?imageId=big.jpg"
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: a\r\n{auth}{framing}\r\n\r\n".encode())
        status, headers, body = read_answer(sock)  # not one byte of the body was sent
        assert status == 401 and headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "Unauthorized"
    finally:
        sock.close()
    logged = [e for e in srv.log_events() if e["event"] == "http_request" and e["path"] in path]
    assert logged and logged[-1]["status"] == 401
    assert_serving(srv)


def test_an_unauthenticated_blast_is_never_buffered_and_clients_still_read_the_401(
    srv: Server,
) -> None:
    url = f"{srv.url}{API}/some-context/features?imageId=big.jpg"
    sock = connect(srv)
    try:
        sock.sendall(
            f"POST {url} HTTP/1.1\r\nHost: a\r\nContent-Length: {60 * MB}\r\n\r\n".encode()
        )
        chunk = b"\0" * MB
        for _ in range(8):  # far past waitress's 512 KB in-memory buffer
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server closed: it did not read the body either
        assert server_temp_files(srv) == []  # nothing spilled to a temp file
    finally:
        sock.close()
    # a plain client sends its whole body before reading: it still gets the 401, not a reset
    s = requests.Session()
    s.trust_env = False
    try:
        whole = s.post(url, data=b"\0" * (20 * MB), timeout=60)
        assert whole.status_code == 401 and whole.json()["error"]["code"] == "Unauthorized"
        streamed = s.post(url, data=iter([b"\0" * MB] * 20), timeout=60)  # chunked
        assert streamed.status_code == 401
        token = s.post(f"{srv.url}/connect/token", data=b"a=" + b"x" * MB, timeout=60)
        assert token.status_code == 413  # the token form is small; a big one is not read
    finally:
        s.close()
    assert server_temp_files(srv) == []
    assert_serving(srv)


# -- 3. guessing secrets ---------------------------------------------------------------------


def test_wrong_secrets_are_throttled_per_address_and_logged_without_the_secret(
    tmp_path: Path,
) -> None:
    server = start_server(
        tmp_path / "data", "--token-failures", "5", "--token-failure-interval", "1"
    )
    s = requests.Session()
    s.trust_env = False
    try:
        statuses: Counter[int] = Counter()
        retry_after: list[int] = []
        started = time.monotonic()
        for n in range(300):
            if time.monotonic() - started > 20:
                break
            got = s.post(server.token_url, data=token_form(secret=f"guess-{n:04d}"), timeout=30)
            statuses[got.status_code] += 1
            if got.status_code == 429:
                retry_after.append(int(got.headers["Retry-After"]))
                assert got.json()["error"] == "too_many_attempts"
        elapsed = time.monotonic() - started
        attempts = sum(statuses.values())
        assert set(statuses) <= {400, 429}
        assert statuses[400] <= 5 + elapsed / 1.0 + 1  # only the burst and refills are checked
        assert statuses[429] >= attempts * 0.8 and min(retry_after) >= 1

        # the featsync client takes a 429 from the token endpoint as transient, not fatal
        client = client_for(server, max_retries=0)
        try:
            with pytest.raises(Transient):
                client.create_context()
        finally:
            client.close()

        events = [e for e in server.log_events() if e["event"] == "token_refused"]
        assert len(events) >= attempts
        assert {e["remote"] for e in events} == {"127.0.0.1"}
        assert {e["reason"] for e in events} >= {"bad_credentials", "throttled"}
        log_text = server.log_path.read_text(encoding="utf-8")
        assert "guess-0" not in log_text and CLIENT_SECRET not in log_text

        # the right secret works again once the address's allowance has refilled
        def accepted() -> bool:
            return s.post(server.token_url, data=token_form(), timeout=30).status_code == 200

        wait_for(accepted, timeout=max(retry_after) + 15, what="the throttle to lift")
        assert_serving(server)
    finally:
        s.close()
        server.stop()


def test_the_failure_budget_allows_a_burst_then_one_per_interval_and_refunds_successes() -> None:
    now = [100.0]
    budget = FailureBudget(burst=3, interval_s=2.0, clock=lambda: now[0], max_keys=2)
    assert [budget.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.take("a") == pytest.approx(2.0)  # out of budget: wait for one refill
    assert budget.take("b") == 0.0  # another address has its own budget
    now[0] += 1.0
    assert budget.take("a") == pytest.approx(1.0)
    now[0] += 1.0
    assert budget.take("a") == 0.0  # refilled one
    budget.refund("a")  # that attempt succeeded: it costs nothing
    assert budget.take("a") == 0.0 and budget.take("a") == pytest.approx(2.0)
    budget.take("c")  # a third key: the least recent full or oldest is forgotten
    assert len(budget._left) <= 2


@pytest.mark.parametrize(
    "form",
    [
        token_form(client_id="clé-ünïcode"),
        token_form(secret="sécret-ünïcode"),  # noqa: S106 (a wrong secret, on purpose)
        token_form(client_id="日本", secret="語"),  # noqa: S106 (a wrong secret, on purpose)
        {"grant_type": "client_credentials"},
        {"grant_type": "password", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
    ],
)
def test_odd_token_forms_are_refused_with_400(srv: Server, form: dict[str, str]) -> None:
    got = requests.post(srv.token_url, data=form, timeout=30)
    assert got.status_code == 400 and got.json()["error"] in (
        "invalid_client",
        "unsupported_grant_type",
    )
    assert_serving(srv)


# -- 4. bad input answers 400 with a reason and changes nothing -----------------------------

IMAGE = textured_bytes(3)
NO_BOUNDARY = {"Content-Type": "multipart/form-data"}
BROKEN = {"Content-Type": "multipart/form-data; boundary=xyz"}

BAD_INPUT: list[tuple[str, str, dict[str, str], bytes | None, dict[str, str], str]] = [
    ("GET", "/features", {"imageId": "a\0b"}, None, {}, "imageId"),
    ("POST", "/features", {"imageId": "a\0b"}, IMAGE, {}, "control character"),
    ("POST", "/features", {"imageId": "tab\there"}, IMAGE, {}, "control character"),
    ("POST", "/features", {"imageId": "x" * 5000}, IMAGE, {}, "too long"),
    ("POST", "/image", {"imageId": "new\nline"}, IMAGE, {}, "control character"),
    ("POST", "/image", {"imageId": "x" * 300}, IMAGE, {}, "255 bytes"),
    ("POST", "/image", {"imageId": "dir/" + "é" * 200}, IMAGE, {}, "255 bytes"),
    ("PUT", "/image", {"imageId": "x" * 256}, IMAGE, {}, "255 bytes"),
    ("GET", "/image", {"imageId": "x" * 300}, None, {}, "255 bytes"),
    ("POST", "/features", {"imageId": "y" * 300}, None, {}, "255 bytes"),
    ("POST", "/compare", {"imageId1": "a\0"}, IMAGE, {}, "imageId1"),
    ("POST", "/addTag", {"tagName": "t\0"}, IMAGE, {}, "tagName"),
    ("GET", "/findSimilar", {"similarityThreshold": "nan", "maxCount": "3"}, None, {}, "finite"),
    ("GET", "/findSimilar", {"similarityThreshold": "inf", "maxCount": "3"}, None, {}, "finite"),
    ("GET", "/findSimilar", {"similarityThreshold": "1e999", "maxCount": "3"}, None, {}, "finite"),
    ("GET", "/findSimilar", {"similarityThreshold": "101", "maxCount": "3"}, None, {}, "0 to 100"),
    ("GET", "/findSimilar", {"similarityThreshold": "50", "maxCount": "inf"}, None, {}, "maxCount"),
    ("GET", "/findSimilar", {"similarityThreshold": "50", "maxCount": "nan"}, None, {}, "maxCount"),
    (
        "GET",
        "/findSimilar",
        {"similarityThreshold": "50", "maxCount": "1e400"},
        None,
        {},
        "maxCount",
    ),
    ("GET", "/findSimilar", {"similarityThreshold": "50", "maxCount": "-1"}, None, {}, "maxCount"),
    ("GET", "/findSimilar", {"similarityThreshold": "50", "maxCount": "2.5"}, None, {}, "maxCount"),
    ("GET", "/findSimilar", {"similarityThreshold": "50", "maxCount": "1e9"}, None, {}, "maxCount"),
    ("GET", "/findDuplicates", {"similarityThreshold": "nan"}, None, {}, "finite"),
    (
        "POST",
        "/findByTags",
        {"similarityThreshold": "-inf", "maxCount": "3"},
        b'["t"]',
        {},
        "finite",
    ),
    ("POST", "/features", {"imageId": "m.jpg"}, IMAGE, NO_BOUNDARY, "malformed multipart"),
    ("POST", "/features", {"imageId": "m.jpg"}, b"garbage", BROKEN, "malformed multipart"),
    ("POST", "/image", {"imageId": "m.jpg"}, b"--xyz\r\nbad", BROKEN, "malformed multipart"),
]


@pytest.mark.parametrize(
    ("method", "path", "params", "body", "headers", "reason"),
    BAD_INPUT,
    ids=[f"{m} {p} {next(iter(q.values()))[:12]!r}" for m, p, q, _, _, _ in BAD_INPUT],
)
def test_bad_input_answers_400_with_a_reason_and_changes_nothing(
    srv: Server,
    api: tuple[requests.Session, str],
    method: str,
    path: str,
    params: dict[str, str],
    body: bytes | None,
    headers: dict[str, str],
    reason: str,
) -> None:
    s, ctx = api
    assert s.post(f"{ctx}/image", params={"imageId": "kept.jpg"}, data=IMAGE, timeout=30).ok
    before = stored_ids(srv, ctx)
    got = s.request(method, ctx + path, params=params, data=body, headers=headers, timeout=30)
    assert got.status_code == 400, got.text
    assert reason in got.json()["error"]["message"]
    assert "Traceback" not in got.text
    assert stored_ids(srv, ctx) == before and part_files(srv) == []
    assert_serving(srv)


def test_storage_file_and_folder_clashes_answer_400_and_leave_no_trace(
    srv: Server, api: tuple[requests.Session, str]
) -> None:
    s, ctx = api

    def image(method: str, image_id: str) -> requests.Response:
        return s.request(
            method, f"{ctx}/image", params={"imageId": image_id}, data=IMAGE, timeout=30
        )

    assert image("POST", "a.jpg").status_code == 200
    assert image("POST", "d/e.jpg").status_code == 200
    for method, image_id in [("POST", "a.jpg/b.jpg"), ("PUT", "a.jpg/b.jpg"), ("POST", "d")]:
        got = image(method, image_id)
        assert got.status_code == 400, got.text
        assert "storage" in got.json()["error"]["message"]
    assert stored_ids(srv, ctx) == {"a.jpg", "d/e.jpg"}  # no features for the refused ones
    assert part_files(srv) == []
    folder = s.delete(f"{ctx}/image", params={"imageId": "d"}, timeout=30)
    assert folder.status_code == 404
    under_a_file = s.get(f"{ctx}/image", params={"imageId": "a.jpg/b.jpg"}, timeout=30)
    assert under_a_file.status_code == 404
    assert s.get(f"{ctx}/image", params={"imageId": "d/e.jpg"}, timeout=30).content == IMAGE
    assert_serving(srv)


def test_a_rejected_image_on_the_image_route_leaves_storage_and_features_as_they_were(
    srv: Server, api: tuple[requests.Session, str]
) -> None:
    s, ctx = api
    assert s.post(f"{ctx}/image", params={"imageId": "p.jpg"}, data=IMAGE, timeout=30).ok
    bad = s.put(f"{ctx}/image", params={"imageId": "p.jpg"}, data=b"not an image", timeout=30)
    assert bad.status_code == 400
    assert s.get(f"{ctx}/image", params={"imageId": "p.jpg"}, timeout=30).content == IMAGE
    fresh = s.post(f"{ctx}/image", params={"imageId": "q.jpg"}, data=b"not an image", timeout=30)
    assert fresh.status_code == 400
    assert s.get(f"{ctx}/image", params={"imageId": "q.jpg"}, timeout=30).status_code == 404
    assert stored_ids(srv, ctx) == {"p.jpg"} and part_files(srv) == []
    assert_serving(srv)


# -- 5. a clean stop is logged ------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_serve_cleanly_and_logs_serve_stopped(
    tmp_path: Path, signum: signal.Signals
) -> None:
    server = start_server(tmp_path / "data")
    try:
        assert_serving(server)
        server.proc.send_signal(signum)
        wait_for(lambda: server.proc.poll() is not None, 30, "featsync serve to exit")
        assert server.proc.returncode == 0
        stopped = [e for e in server.log_events() if e["event"] == "serve_stopped"]
        assert len(stopped) == 1 and stopped[0]["signal"] == signum.name
        assert_json_only(server)
    finally:
        server.stop()


# -- 6. the unexpected: one JSON line, a JSON answer ---------------------------------------------


def test_an_unexpected_error_answers_a_json_500_and_logs_one_json_line(
    srv: Server, api: tuple[requests.Session, str]
) -> None:
    s, ctx = api
    loop = srv.data / "storage" / "loop.jpg"
    loop.symlink_to(loop.name)  # opening it fails with ELOOP: nothing the routes expect
    try:
        got = s.get(f"{ctx}/image", params={"imageId": "loop.jpg"}, timeout=30)
    finally:
        loop.unlink()
    assert got.status_code == 500
    err = got.json()["error"]
    assert err["code"] == "InternalError" and "Traceback" not in got.text
    logged = [e for e in srv.log_events() if e["event"] == "serve_error"]
    assert logged and logged[-1]["path"].endswith("/image")
    assert logged[-1]["error_type"] == "OSError" and "loop.jpg" in logged[-1]["error"]
    assert "Traceback" in logged[-1]["traceback"]  # inside the one JSON line
    assert_serving(srv)
