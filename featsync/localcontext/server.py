"""`featsync serve`: the embedded search context behind the Aspose wire protocol.

Flask routes, served by waitress (``transport.py``: connection limits, timeouts, and a
gate that answers a request before its body is read). It speaks ``shared/aspose-api.md``:
the token endpoints ``/connect/token`` and ``/oauth2/token``, every ``imageSearch``
operation of section 6 but ``features/web`` under ``/v3.0`` and ``/v3`` (and one of its
own: ``GET …/{context}/features/ids``, the IDs a context holds, in pages), camelCase
JSON, 200 for every success, ``{"error": {...}}`` with 400 / 401 / 404 / 429, image data
as the first multipart part or the raw body. Each search context is one ``<id>.search``
file (a LocalContext store) in the data folder, so contexts survive a restart; images
saved by the ``/image`` operations live under ``storage/``.

Inputs are checked before anything is touched (``inputs.py``), exceptions become answers
in one place (``answers.py``), and ``auth.py`` holds the token endpoint, whose failed
attempts are limited per address (429 with ``Retry-After``), and the gate.

Fault injection (off by default) makes the client's retry paths run for real:
added latency, a share of 500/503 answers, a share of 429 answers with
``Retry-After``, a share of connections dropped in the middle of the answer (after
the operation took effect: the client's repeat must be harmless), and short token
lifetimes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, g, request

from featsync.errors import AlreadyExists, NotFound
from featsync.localcontext import answers, auth, inputs, transport
from featsync.localcontext.auth import TokenBudget
from featsync.localcontext.contexts import ApiError, Contexts, Tokens
from featsync.localcontext.extractor import Extractor
from featsync.localcontext.transport import MAX_BODY, Gate, Limits
from featsync.model import SearchResult, Secret

API = "/imaging/ai/imageSearch"
PREFIXES = ("/v3.0", "/v3")

Route = Callable[[str, list[str]], Callable[[Callable[..., Response]], Any]]


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
    token_budget: TokenBudget | None = None,
    extractor: Extractor | None = None,
) -> Flask:
    app = Flask("featsync.serve")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    contexts = Contexts(data_dir, extractor)
    tokens = Tokens(token_lifetime_s)
    app.extensions["featsync.contexts"] = contexts
    app.extensions["featsync.gate"] = auth.gate_for(tokens, log if access_log else None)
    answers.map_errors(app, log)
    _hooks(app, tokens, faults or Faults(), log if access_log else None)
    route = _router(app)
    auth.token_routes(app, client_id, client_secret, tokens, token_budget or TokenBudget(), log)
    _context_routes(route, contexts)
    _feature_routes(route, contexts)
    _image_routes(route, contexts)
    _search_routes(route, contexts)
    return app


def _router(app: Flask) -> Route:
    """`route(path, methods)`: register a view under every API prefix."""

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

    return route


def _hooks(app: Flask, tokens: Tokens, faults: Faults, access_log: Any) -> None:
    rnd = random.Random(faults.seed)
    rnd_lock = threading.Lock()

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
        if not tokens.authorizes(request.headers.get("Authorization", "")):
            return answers.error(401, "Unauthorized", "a valid bearer token is required")
        if faults.any:
            r = roll()
            if r < faults.error_rate:
                status = 503 if r < faults.error_rate / 2 else 500
                return answers.error(status, "FaultInjected", "fault injection: server error")
            r -= faults.error_rate
            if r < faults.throttle_rate:
                resp = answers.error(429, "TooManyRequests", "fault injection: slow down")
                resp.headers["Retry-After"] = f"{faults.retry_after_s:g}"
                return resp
            r -= faults.throttle_rate
            g.drop = r < faults.drop_rate
        return None

    @app.after_request
    def _after(resp: Response) -> Response:
        dropped = bool(g.get("drop")) and resp.status_code == 200
        if access_log is not None:
            access_log.info(
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


# -- search contexts -----------------------------------------------------------------------


def _context_routes(route: Route, contexts: Contexts) -> None:
    @route(f"{API}/create", ["POST"])
    def create() -> Response:
        detector = inputs.arg("detector", required=False) or "akaze"
        algorithm = inputs.arg("matchingAlgorithm", required=False) or "randomBinaryTree"
        if detector.lower() != "akaze":
            raise ApiError(400, "BadRequest", f"detector {detector!r} is not supported (akaze)")
        if algorithm.lower() != "randombinarytree":
            raise ApiError(400, "BadRequest", f"matching algorithm {algorithm!r} is not supported")
        return answers.ok({"id": contexts.create(), "searchStatus": "Idle"})

    @route(f"{API}/<context_id>/status", ["GET"])
    def status(context_id: str) -> Response:
        contexts.get(context_id)
        return answers.ok({"id": context_id, "searchStatus": "Idle"})

    @route(f"{API}/<context_id>", ["DELETE"])
    def delete_context(context_id: str) -> Response:
        contexts.delete(context_id)
        return answers.ok()


# -- features ------------------------------------------------------------------------------


def _feature_routes(route: Route, contexts: Contexts) -> None:
    @route(f"{API}/<context_id>/features", ["POST", "PUT", "GET", "DELETE"])
    def features(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        if request.method == "GET":
            return answers.features(ctx.get_features(inputs.id_arg()))
        if request.method == "DELETE":
            ctx.delete_features(inputs.id_arg())
            return answers.ok()
        if request.method == "PUT":
            target = inputs.id_arg()
            ctx.update_features(target, inputs.image(False) or contexts.read_storage(target))
            return answers.ok()
        image_id = inputs.optional_id_arg("imageId")
        folder = inputs.optional_id_arg("imagesFolder")
        image = inputs.image(False)
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
        return answers.ok()

    @route(f"{API}/<context_id>/features/ids", ["GET"])
    def feature_ids(context_id: str) -> Response:
        """featsync's own extension, not in the Aspose API: the image IDs the context
        holds, in order, a page at a time: after ``after`` (exclusive, default the
        start), up to ``until`` (inclusive, default the end), at most ``limit`` (1 to
        10,000, default 1,000); a page shorter than ``limit`` is the last. `featsync
        verify` finds orphans with it; against Aspose, which has no such route, the
        client says it cannot list and does without."""
        ctx = contexts.get(context_id)
        after = inputs.bound_arg("after") or ""
        until = inputs.bound_arg("until")
        return answers.ok({"imageIds": ctx.image_id_page(after, until, inputs.page_limit())})

    @route(f"{API}/<context_id>/image2features", ["GET", "POST"])
    def image2features(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        image_id = inputs.id_arg()
        image = inputs.image(False) or contexts.read_storage(image_id)
        return answers.features(ctx.extract(image_id, image))


# -- images in storage with their features ---------------------------------------------------


def _image_routes(route: Route, contexts: Contexts) -> None:
    @route(f"{API}/<context_id>/image", ["POST", "PUT", "GET", "DELETE"])
    def image(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        image_id = inputs.id_arg()
        if request.method == "GET":
            stored = contexts.read_storage(image_id)
            return Response(stored, status=200, mimetype="application/octet-stream")
        if request.method == "DELETE":
            contexts.delete_storage(image_id)
            with contextlib.suppress(NotFound):
                ctx.delete_features(image_id)
            return answers.ok()
        data = inputs.image(True)
        assert data is not None
        # storage is checked and staged first, the features stored next, and only then
        # does the image enter storage: a refusal at any step leaves both as they were
        staged = contexts.stage(image_id, data)
        try:
            added = False
            if request.method == "POST":
                try:
                    ctx.add_features(image_id, data)
                    added = True
                except AlreadyExists:
                    ctx.update_features(image_id, data)
            else:
                ctx.update_features(image_id, data)
            try:
                staged.commit()
            except ApiError:  # a clashing name was stored meanwhile
                if added:
                    ctx.delete_features(image_id)
                raise
        finally:
            staged.discard()
        return answers.ok()


# -- searches ------------------------------------------------------------------------------


def _search_routes(route: Route, contexts: Contexts) -> None:
    @route(f"{API}/<context_id>/findSimilar", ["GET", "POST"])
    def find_similar(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        threshold, max_count = inputs.threshold(), inputs.max_count()
        image_id = inputs.optional_id_arg("imageId")
        data = inputs.image(False)
        if data is None and image_id and image_id not in ctx.image_ids():
            data = contexts.read_storage(image_id)  # a storage image, not in the context
        if data is not None:
            found = ctx.find_similar(image=data, threshold=threshold, max_count=max_count)
        elif image_id:
            found = ctx.find_similar(image_id=image_id, threshold=threshold, max_count=max_count)
        else:
            raise ApiError(400, "BadRequest", "give imageId or image data")
        return answers.ok(answers.results(found))

    @route(f"{API}/<context_id>/findDuplicates", ["GET"])
    def find_duplicates(context_id: str) -> Response:
        groups = contexts.get(context_id).find_duplicates(inputs.threshold())
        body = [{"duplicateImages": answers.results(group)["results"]} for group in groups]
        return answers.ok({"duplicates": body})

    @route(f"{API}/<context_id>/addTag", ["POST"])
    def add_tag(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        name = inputs.id_arg("tagName")
        data = inputs.image(True)
        assert data is not None
        ctx.add_tag(name, data)
        return answers.ok()

    @route(f"{API}/<context_id>/findByTags", ["POST"])
    def find_by_tags(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        threshold, max_count = inputs.threshold(), inputs.max_count()
        return answers.ok(answers.results(ctx.find_by_tags(inputs.tags(), threshold, max_count)))

    @route(f"{API}/<context_id>/compare", ["POST"])
    def compare(context_id: str) -> Response:
        ctx = contexts.get(context_id)
        first = inputs.id_arg("imageId1")
        second = inputs.optional_id_arg("imageId2")
        if second:
            score = ctx.compare(first, other=second)
        else:
            score = ctx.compare(first, image=inputs.image(True))
        return answers.ok(answers.results([SearchResult(second or "", score)]))


# -- serving -------------------------------------------------------------------------------


def serve(
    app: Flask,
    host: str,
    port: int,
    threads: int,
    ready: Callable[[str, int, Limits], None],
    quiet_drops: bool = False,
    limits: Limits | None = None,
    log: Any = None,
) -> None:
    """Serve `app` with waitress until interrupted; `ready` gets the bound address and
    the limits in force (the connection limit lowered if the open-files limit is short)."""
    wanted = limits or Limits()
    if quiet_drops:  # each injected drop would log a traceback
        logging.getLogger("waitress").setLevel(logging.CRITICAL)
    fits, nofile = transport.fit_connection_limit(wanted.connection_limit, threads)
    if fits < wanted.connection_limit and log is not None:
        log.warning(
            "connection_limit_lowered",
            wanted=wanted.connection_limit,
            connection_limit=fits,
            nofile=nofile,
        )
    limits = dataclasses.replace(wanted, connection_limit=fits)
    gate: Gate = app.extensions["featsync.gate"]
    server, bound = transport.build(app, host, port, threads, gate, limits)
    try:
        ready(host, bound, limits)
        server.run()  # returns once a signal's KeyboardInterrupt stops waitress's loop
    finally:
        server.close()
        app.extensions["featsync.contexts"].close()
