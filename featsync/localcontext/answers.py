"""What `featsync serve` answers: the success shapes, the Aspose error body, and the one
place where exceptions become answers. Anything unexpected is answered with a JSON 500
that names the request, never a traceback, and logged as one ``serve_error`` line."""

from __future__ import annotations

import json
import traceback
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from featsync.errors import AlreadyExists, FeatsyncError, ItemRejected, NotFound, Transient
from featsync.localcontext.contexts import ApiError
from featsync.model import ImageFeatures, SearchResult


def ok(body: Any = None) -> Response:
    if body is None:
        return Response(b"", status=200)
    return Response(json.dumps(body), status=200, mimetype="application/json")


def features(f: ImageFeatures) -> Response:
    return ok(f.as_json())


def results(found: list[SearchResult]) -> dict[str, Any]:
    return {"results": [r.as_json() for r in found]}


def error_body(code: str, message: str, request_id: str) -> bytes:
    body = {
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "requestId": request_id,
                "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            },
        }
    }
    return json.dumps(body).encode("utf-8")


def error(status: int, code: str, message: str) -> Response:
    body = error_body(code, message, g.get("request_id", ""))
    return Response(body, status=status, mimetype="application/json")


def oauth_error(status: int, code: str, description: str) -> Response:
    """The token endpoint's error shape (OAuth 2.0): ``{"error": code, ...}``."""
    body = {"error": code, "error_description": description}
    return Response(json.dumps(body), status=status, mimetype="application/json")


def map_errors(app: Flask, log: Any) -> None:
    """Turn every exception a route raises into an answer, in one place."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error(exc.status, exc.code, exc.message)

    @app.errorhandler(FeatsyncError)
    def _featsync_error(exc: FeatsyncError) -> Response:
        if isinstance(exc, NotFound):
            return error(404, "NotFound", str(exc))
        if isinstance(exc, AlreadyExists):
            return error(400, "AlreadyExists", str(exc))
        if isinstance(exc, ItemRejected):
            return error(400, "BadRequest", str(exc))
        if isinstance(exc, Transient):  # the extractor busy or stopping: the client backs off
            if log is not None:
                log.warning("serve_unavailable", path=request.path, error=str(exc))
            busy = error(503, "ServiceUnavailable", str(exc))
            busy.headers["Retry-After"] = "2"
            return busy
        if log is not None:
            log.error(
                "serve_error",
                path=request.path,
                request_id=g.get("request_id", ""),
                error_type=type(exc).__name__,
                error=str(exc),
            )
        return error(500, "InternalError", str(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        return error(status, exc.name.replace(" ", ""), exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        request_id = g.get("request_id", "")
        if log is not None:
            log.error(
                "serve_error",
                path=request.path,
                method=request.method,
                request_id=request_id,
                error_type=type(exc).__name__,
                error=str(exc)[:1000],
                traceback=traceback.format_exc(),
            )
        message = f"internal error; the server log has it under request {request_id}"
        return error(500, "InternalError", message)
