"""Reading Aspose's answers: JSON fields in any case, the reason in an error body,
whether a body is an Aspose error at all, a run of identical refusals, how a failed
request is described (never with a header, so never with the token), which statuses are
worth a retry, and urllib3's ``Retry`` with each retry logged."""

from __future__ import annotations

import json
import threading
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import requests
from urllib3.util.retry import Retry

from featsync.errors import Fatal

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # 408: request timeout

# Different images in a row refused with one and the same answer that is not an Aspose
# error body, with no success between: the refusal is of the route (a proxy or another
# service at base_url), not of the images. Aspose's own refusals never count (see
# RefusalRun).
SAME_REFUSALS_FATAL = 5


class RetryLogged(Retry):
    """urllib3's Retry with ``Retry-After`` capped and each retry logged."""

    def __init__(self, *args: Any, log: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log = log

    def new(self, **kw: Any) -> Self:
        new = super().new(**kw)
        new.log = self.log
        return new

    def get_retry_after(self, response: Any) -> float | None:
        after = super().get_retry_after(response)
        return None if after is None else min(after, self.backoff_max)

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: Any = None,
    ) -> Self:
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        if self.log is not None:
            self.log.info(
                "http_retry",
                method=method,
                path=(url or "").split("?")[0],
                status=getattr(response, "status", None),
                error=type(error).__name__ if error is not None else None,
                retries_left=new.total,
            )
        return new


def field(data: Any, name: str) -> Any:
    """A JSON object's field by name, whatever its case (v3 camelCase, v2 PascalCase)."""
    if not isinstance(data, dict):
        return None
    if name in data:
        return data[name]
    lower = name.lower()
    for key, value in data.items():
        if isinstance(key, str) and key.lower() == lower:
            return value
    return None


def error_reason(response: requests.Response) -> tuple[str, str]:
    """(error code, readable reason) from an Aspose error body, or the body's start."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip().replace("\n", " ")
        return "", (text[:200] or response.reason or "no reason given")
    err = field(body, "error")
    if isinstance(err, dict):
        code = str(field(err, "code") or "")
        parts = [str(field(err, k)) for k in ("message", "description") if field(err, k)]
        return code, ": ".join(parts) or code or "no reason given"
    if isinstance(err, str):  # OAuth style: {"error": "invalid_client", "error_description": ...}
        return err, str(field(body, "error_description") or err)
    message = field(body, "message")
    if message:
        return "", str(message)
    return "", json.dumps(body)[:200]


def aspose_error(response: requests.Response) -> bool:
    """Whether the body is an error as the Aspose API writes it: ``{"error": {...}}``
    (v3) or the legacy ``{"Message": "..."}``. An HTML page, plain text, an empty body or
    JSON of another shape comes from something else: a proxy, another service, a web
    server that has no such route."""
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(field(body, "error"), dict) or isinstance(field(body, "message"), str)


class RefusalRun:
    """Identical refusals of different images in a row, with nothing else between.

    Only answers that are not Aspose error bodies are counted: five corrupt images in a
    row may well get the same reason from Aspose itself (its refusals are JSON errors),
    while the same HTML page or plain "Bad Request" for five different images is the
    answer of something that refuses every call. Thread-safe: the calls run in a pool.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answer: tuple[int, str] | None = None
        self._images: set[str] = set()

    def reset(self) -> None:
        """A success, or an answer from the API proper: the run is broken."""
        with self._lock:
            self._answer, self._images = None, set()

    def refused(self, image_id: str, answer: tuple[int, str]) -> int:
        """Count one refusal (status, reason); how many different images the run holds."""
        with self._lock:
            if answer != self._answer:
                self._answer, self._images = answer, set()
            self._images.add(image_id)
            return len(self._images)


def shown_url(url: str) -> str:
    """A URL fit for a message: no user:password part, no query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:  # a port that is not a number: show none
        port = None
    netloc = host + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def no_redirect(r: requests.Response, what: str, key: str) -> None:
    """A redirect answer is a configuration error: fatal, naming the key to fix."""
    if 300 <= r.status_code < 400:
        where = r.headers.get("Location", "")
        raise Fatal(
            f"{what}: the server answered HTTP {r.status_code}, a redirect to {where!r}; "
            f"featsync does not follow redirects: check {key}"
        )


def tls_refused(what: str, exc: requests.exceptions.SSLError) -> str:
    """Why a TLS connection failed, and what to do: fatal, retrying cannot help."""
    return (
        f"{what}: TLS failed ({type(exc).__name__}: certificate not trusted, expired or "
        "for another name?); install the CA (REQUESTS_CA_BUNDLE, or the system store) "
        "or fix the certificate; context.verify_tls = false is for tests only"
    )


def describe(exc: requests.RequestException) -> str:
    """A short reason for a failed request (no headers in it, so no token)."""
    if isinstance(exc, requests.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, requests.ReadTimeout):
        return "no answer within the read timeout"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error (certificate not trusted?)"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed or was dropped"
    if isinstance(
        exc, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError
    ):
        return "the connection broke in the middle of the answer"
    return type(exc).__name__
