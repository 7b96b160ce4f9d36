"""`featsync serve`: the embedded search context behind the Aspose wire protocol.

Flask routes, served by waitress (TCP_NODELAY set: without it small requests on
loopback wait ~40 ms for delayed ACKs). It speaks ``shared/aspose-api.md``: the
token endpoints ``/connect/token`` and ``/oauth2/token``, every ``imageSearch``
operation of section 6 but ``features/web`` under ``/v3.0`` and ``/v3``, camelCase
JSON, 200 for every success, ``{"error": {...}}`` with 400 / 401 / 404, image data
as the first multipart part or the raw body. Each search context is one
``<id>.search`` file (a LocalContext store) in the data folder, so contexts survive
a restart; images saved by the ``/image`` operations live under ``storage/``.

Fault injection (off by default) makes the client's retry paths run for real:
added latency, a share of 500/503 answers, a share of 429 answers with
``Retry-After``, a share of connections dropped in the middle of the answer (after
the operation took effect: the client's repeat must be harmless), and short token
lifetimes.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from featsync.errors import AlreadyExists, FeatsyncError, ItemRejected, NotFound
from featsync.localcontext.contexts import ApiError, Contexts, Tokens
from featsync.model import ImageFeatures, SearchResult, Secret

API = "/imaging/ai/imageSearch"
PREFIXES = ("/v3.0", "/v3")
MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Faults:
    latency_s: float = 0.0  # added to every request
    error_rate: float = 0.0  # share of API calls answered 500 or 503
    throttle_rate: float = 0.0  # share answered 429 with Retry-After
    retry_after_s: float = 1.0
    drop_rate: float = 0.0  # share whose answer is cut off after the operation ran
    seed: int | None = None

    @property
    def any(self) -> bool:
        return bool(self.latency_s or self.error_rate or self.throttle_rate or self.drop_rate)


# -- request helpers ---------------------------------------------------------------------


def _arg(name: str, required: bool = True) -> str | None:
    value = request.args.get(name)
    if value is None:
        # query names are matched case-insensitively, as the service does
        lower = name.lower()
        value = next((v for k, v in request.args.items() if k.lower() == lower), None)
    if required and not value:
        raise ApiError(400, "BadRequest", f"the query parameter {name!r} is required")
    return value


def _number(name: str) -> float:
    raw = _arg(name)
    try:
        return float(raw or "")
    except ValueError:
        raise ApiError(400, "BadRequest", f"{name} must be a number, got {raw!r}") from None


def _image(required: bool) -> bytes | None:
    """Image data: the first multipart part, or the raw body."""
    if request.mimetype == "multipart/form-data":
        for part in request.files.values():
            content: bytes = part.read()
            return content
        for value in request.form.values():
            return value.encode("utf-8", "surrogateescape")
        data = b""
    else:
        data = request.get_data(cache=False)
    if not data:
        if required:
            raise ApiError(400, "BadRequest", "image data is required (multipart or raw body)")
        return None
    return data


def _tags() -> list[str]:
    raw: str | bytes | None = None
    if request.mimetype == "multipart/form-data":
        raw = request.form.get("tags")
        if raw is None and "tags" in request.files:
            raw = request.files["tags"].read()
    else:
        raw = request.get_data(cache=False)
    try:
        tags = json.loads(raw or b"")
    except ValueError:
        raise ApiError(400, "BadRequest", "tags must be a JSON array of tag names") from None
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags) or not tags:
        raise ApiError(400, "BadRequest", "tags must be a non-empty JSON array of tag names")
    return tags


def _ok(body: Any = None) -> Response:
    if body is None:
        return Response(b"", status=200)
    return Response(json.dumps(body), status=200, mimetype="application/json")


def _features(f: ImageFeatures) -> Response:
    return _ok(f.as_json())


def _results(results: list[SearchResult]) -> dict[str, Any]:
    return {"results": [r.as_json() for r in results]}


def _error(status: int, code: str, message: str) -> Response:
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "requestId": g.get("request_id", ""),
                "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            },
        }
    }
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _dropped() -> Iterator[bytes]:
    """An answer whose connection breaks after the first byte (waitress then closes it)."""
    yield b"{"
    raise ConnectionAbortedError("fault injection: connection dropped")


# -- the application ---------------------------------------------------------------------


def create_app(
    data_dir: str,
    client_id: str,
    client_secret: Secret,
    token_lifetime_s: float = 3600.0,
    faults: Faults | None = None,
    log: Any = None,
    access_log: bool = False,
) -> Flask:
    app = Flask("featsync.serve")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    contexts = Contexts(data_dir)
    tokens = Tokens(token_lifetime_s)
    faults = faults or Faults()
    rnd = random.Random(faults.seed)
    rnd_lock = threading.Lock()
    app.extensions["featsync.contexts"] = contexts

    def roll() -> float:
        with rnd_lock:
            return rnd.random()

    @app.before_request
    def _before() -> Response | None:
        g.started = time.perf_counter()
        g.request_id = uuid.uuid4().hex[:16]
        g.drop = False
        if faults.latency_s:
            time.sleep(faults.latency_s)
        if request.path.endswith("/token"):
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not tokens.valid(token.strip()):
            return _error(401, "Unauthorized", "a valid bearer token is required")
        if faults.any:
            r = roll()
            if r < faults.error_rate:
                status = 503 if r < faults.error_rate / 2 else 500
                return _error(status, "FaultInjected", "fault injection: server error")
            r -= faults.error_rate
            if r < faults.throttle_rate:
                resp = _error(429, "TooManyRequests", "fault injection: slow down")
                resp.headers["Retry-After"] = f"{faults.retry_after_s:g}"
                return resp
            r -= faults.throttle_rate
            g.drop = r < faults.drop_rate
        return None

    @app.after_request
    def _after(resp: Response) -> Response:
        dropped = bool(g.get("drop")) and resp.status_code == 200
        if access_log and log is not None:
            log.info(
                "http_request",
                method=request.method,
                path=request.path,
                image_id=request.args.get("imageId"),
                status=resp.status_code,
                dropped=dropped,
                duration_ms=round((time.perf_counter() - g.get("started", 0.0)) * 1000, 1),
            )
        if dropped:
            return Response(_dropped(), status=200, headers={"Content-Length": "100"})
        return resp

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return _error(exc.status, exc.code, exc.message)

    @app.errorhandler(FeatsyncError)
    def _featsync_error(exc: FeatsyncError) -> Response:
        if isinstance(exc, NotFound):
            return _error(404, "NotFound", str(exc))
        if isinstance(exc, AlreadyExists):
            return _error(400, "AlreadyExists", str(exc))
        if isinstance(exc, ItemRejected):
            return _error(400, "BadRequest", str(exc))
        if log is not None:
            log.error("serve_error", path=request.path, error=str(exc))
        return _error(500, "InternalError", str(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        return _error(status, exc.name.replace(" ", ""), exc.description or exc.name)

    def route(path: str, methods: list[str]) -> Callable[[Callable[..., Response]], Any]:
        def register(view: Callable[..., Response]) -> Callable[..., Response]:
            for prefix in PREFIXES:
                app.add_url_rule(
                    prefix + path,
                    endpoint=f"{view.__name__}{prefix}",
                    view_func=view,
                    methods=methods,
                )
            return view

        return register

    # -- token -------------------------------------------------------------------------

    def token() -> Response:
        form = request.form
        ok = (
            form.get("grant_type") == "client_credentials"
            and hmac.compare_digest(form.get("client_id", ""), client_id)
            and hmac.compare_digest(form.get("client_secret", ""), client_secret.reveal())
        )
        if not ok:
            body = {"error": "invalid_client", "error_description": "unknown client or secret"}
            return Response(json.dumps(body), status=400, mimetype="application/json")
        return _ok(
            {
                "access_token": tokens.issue(),
                "expires_in": token_lifetime_s,
                "token_type": "Bearer",
            }
        )

    for path in ("/connect/token", "/oauth2/token"):
        app.add_url_rule(path, endpoint=path, view_func=token, methods=["POST"])

    # -- search contexts ---------------------------------------------------------------

    @route(f"{API}/create", ["POST"])
    def create() -> Response:
        detector = _arg("detector", required=False) or "akaze"
        algorithm = _arg("matchingAlgorithm", required=False) or "randomBinaryTree"
        if detector.lower() != "akaze":
            raise ApiError(400, "BadRequest", f"detector {detector!r} is not supported (akaze)")
        if algorithm.lower() != "randombinarytree":
            raise ApiError(400, "BadRequest", f"matching algorithm {algorithm!r} is not supported")
        return _ok({"id": contexts.create(), "searchStatus": "Idle"})

    @route(f"{API}/<context_id>/status", ["GET"])
    def status(context_id: str) -> Response:
        contexts.get(context_id)
        return _ok({"id": context_id, "searchStatus": "Idle"})

    @route(f"{API}/<context_id>", ["DELETE"])
    def delete_context(context_id: str) -> Response:
        contexts.delete(context_id)
        return _ok()

    # -- features ----------------------------------------------------------------------

    @route(f"{API}/<context_id>/features", ["POST", "PUT", "GET", "DELETE"])
    def features(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        if request.method == "GET":
            return _features(ctx.get_features(str(_arg("imageId"))))
        if request.method == "DELETE":
            ctx.delete_features(str(_arg("imageId")))
            return _ok()
        if request.method == "PUT":
            target = str(_arg("imageId"))
            ctx.update_features(target, _image(False) or contexts.read_storage(target))
            return _ok()
        image = _image(False)
        image_id = _arg("imageId", required=False)
        folder = _arg("imagesFolder", required=False)
        if image is not None:
            if not image_id:
                raise ApiError(400, "BadRequest", "imageId names the uploaded image's entry")
            ctx.add_features(image_id, image)
        elif image_id:
            ctx.add_features(image_id, contexts.read_storage(image_id))
        elif folder:
            for name in contexts.storage_folder(folder):
                data = contexts.read_storage(name)
                try:
                    ctx.add_features(name, data)
                except AlreadyExists:
                    ctx.update_features(name, data)
        else:
            raise ApiError(400, "BadRequest", "give image data, imageId or imagesFolder")
        return _ok()

    @route(f"{API}/<context_id>/image2features", ["GET", "POST"])
    def image2features(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        image_id = str(_arg("imageId"))
        return _features(ctx.extract(image_id, _image(False) or contexts.read_storage(image_id)))

    # -- images in storage with their features -------------------------------------------

    @route(f"{API}/<context_id>/image", ["POST", "PUT", "GET", "DELETE"])
    def image(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        image_id = str(_arg("imageId"))
        if request.method == "GET":
            stored = contexts.read_storage(image_id)
            return Response(stored, status=200, mimetype="application/octet-stream")
        if request.method == "DELETE":
            contexts.delete_storage(image_id)
            with contextlib.suppress(NotFound):
                ctx.delete_features(image_id)
            return _ok()
        data = _image(True)
        assert data is not None
        if request.method == "POST":
            try:
                ctx.add_features(image_id, data)
            except AlreadyExists:
                ctx.update_features(image_id, data)
        else:
            ctx.update_features(image_id, data)
        contexts.write_storage(image_id, data)
        return _ok()

    # -- searches ----------------------------------------------------------------------

    @route(f"{API}/<context_id>/findSimilar", ["GET", "POST"])
    def find_similar(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        threshold = _number("similarityThreshold")
        max_count = int(_number("maxCount"))
        image_id = _arg("imageId", required=False)
        data = _image(False)
        if data is None and image_id and image_id not in ctx.image_ids():
            data = contexts.read_storage(image_id)  # a storage image, not in the context
        if data is not None:
            found = ctx.find_similar(image=data, threshold=threshold, max_count=max_count)
        elif image_id:
            found = ctx.find_similar(image_id=image_id, threshold=threshold, max_count=max_count)
        else:
            raise ApiError(400, "BadRequest", "give imageId or image data")
        return _ok(_results(found))

    @route(f"{API}/<context_id>/findDuplicates", ["GET"])
    def find_duplicates(context_id: str) -> Response:
        groups = contexts.get(context_id).find_duplicates(_number("similarityThreshold"))
        return _ok({"duplicates": [{"duplicateImages": _results(gr)["results"]} for gr in groups]})

    @route(f"{API}/<context_id>/addTag", ["POST"])
    def add_tag(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        data = _image(True)
        assert data is not None
        ctx.add_tag(str(_arg("tagName")), data)
        return _ok()

    @route(f"{API}/<context_id>/findByTags", ["POST"])
    def find_by_tags(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        threshold, max_count = _number("similarityThreshold"), int(_number("maxCount"))
        return _ok(_results(ctx.find_by_tags(_tags(), threshold, max_count)))

    @route(f"{API}/<context_id>/compare", ["POST"])
    def compare(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        first = str(_arg("imageId1"))
        second = _arg("imageId2", required=False)
        if second:
            score = ctx.compare(first, other=second)
        else:
            score = ctx.compare(first, image=_image(True))
        return _ok(_results([SearchResult(second or "", score)]))

    return app


def serve(
    app: Flask,
    host: str,
    port: int,
    threads: int,
    ready: Callable[[str, int], None],
    quiet_drops: bool = False,
) -> None:
    """Serve `app` with waitress until interrupted; `ready` gets the bound address."""
    from waitress import create_server

    if quiet_drops:  # each injected drop would log a traceback
        logging.getLogger("waitress").setLevel(logging.CRITICAL)
    server: Any = create_server(
        app,
        host=host,
        port=port,
        threads=threads,
        ident="featsync",
        max_request_body_size=MAX_BODY,
    )
    # waitress sets TCP_NODELAY on its sockets by default; make sure it stays so.
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if nodelay not in server.adj.socket_options:
        server.socket.setsockopt(*nodelay)
    ready(host, int(server.effective_port))
    try:
        server.run()
    finally:
        server.close()
        app.extensions["featsync.contexts"].close()
