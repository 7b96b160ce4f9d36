"""The wire under the Aspose client: the HTTP session (urllib3's ``Retry``, each retry
logged), the bearer token, and reading Aspose's answers: JSON fields in any case, the
token, features and search results, the reason in an error body, whether a body is an
Aspose error at all and a status answer the API's, a run of identical refusals, what to
say when the server is not the API, how a failed request is described (never with a
header, so never with the token), which statuses are worth a retry."""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from featsync.errors import Fatal, Transient
from featsync.model import ImageFeatures, SearchResult, Secret

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


def session(
    *,
    trust_env: bool,
    verify_tls: bool,
    max_retries: int,
    backoff_max: float,
    pool_size: int,
    log: Any,
) -> requests.Session:
    """A session whose calls urllib3 retries (exponential backoff with jitter,
    ``Retry-After`` honoured up to `backoff_max`), every method included: why that is
    safe is said in featsync.aspose."""
    s = requests.Session()
    s.trust_env = trust_env
    s.verify = verify_tls
    retry = RetryLogged(
        total=max_retries,
        connect=max_retries,
        read=max_retries,
        status=max_retries,
        other=0,
        allowed_methods=None,  # every method, on purpose
        status_forcelist=TRANSIENT_STATUS,
        backoff_factor=0.25,
        backoff_jitter=0.25,
        backoff_max=backoff_max,
        respect_retry_after_header=True,
        raise_on_status=False,
        raise_on_redirect=False,
        log=log,
    )
    adapter = HTTPAdapter(max_retries=retry, pool_connections=2, pool_maxsize=pool_size)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.headers["Accept"] = "application/json"
    s.headers["User-Agent"] = "featsync"
    return s


class TokenSource:
    """The bearer token of the client credentials: fetched when there is none or it is
    about to run out, forgotten after a 401. Never put in a repr, a log line or a message."""

    def __init__(
        self,
        session: requests.Session,
        url: str,
        client_id: str,
        secret: Secret,
        timeout: tuple[float, float],
        log: Any = None,
    ) -> None:
        self._session, self._url, self._timeout, self._log = session, url, timeout, log
        self._client_id, self._secret = client_id, secret
        self._lock = threading.Lock()
        self._access: str | None = None
        self._refresh_at = 0.0

    def __repr__(self) -> str:
        return f"TokenSource({self._url!r}, client {self._client_id!r})"

    def get(self) -> str:
        with self._lock:
            if self._access is None or time.monotonic() >= self._refresh_at:
                self._fetch()
            assert self._access is not None
            return self._access

    def forget(self, token: str) -> None:
        with self._lock:
            if self._access == token:
                self._access = None

    def _fetch(self) -> None:
        url = self._url
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._secret.reveal(),
        }
        try:
            r = self._session.post(url, data=form, timeout=self._timeout, allow_redirects=False)
        except requests.exceptions.SSLError as exc:
            raise Fatal(tls_refused(f"token endpoint {url}", exc)) from None
        except requests.RequestException as exc:
            raise Transient(f"token endpoint {url}: {describe(exc)}") from None
        token, lifetime = read_token(r, url, self._client_id, self._secret.reveal())
        # Refresh a little before it runs out: a tenth of its life, at most a minute.
        self._refresh_at = time.monotonic() + lifetime - min(60.0, lifetime / 10)
        self._access = token
        if self._log is not None:
            self._log.info("token_fetched", url=url, expires_in=lifetime)


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


def read_token(r: requests.Response, url: str, client_id: str, secret: str) -> tuple[str, float]:
    """(access token, lifetime in s) from the token endpoint's answer; Fatal if it
    refused the client, Transient if it is busy or the answer garbled."""
    where = f"token endpoint {url}"
    no_redirect(r, where, "context.auth_url")
    if r.status_code in TRANSIENT_STATUS:
        raise Transient(f"{where}: HTTP {r.status_code}")
    if r.status_code != 200:
        _code, reason = error_reason(r)
        reason = reason.replace(secret, "[secret]") if secret else reason  # an echoed form
        raise Fatal(
            f"{where} refused client {client_id!r} (HTTP {r.status_code}: {reason}); "
            "check the client ID and secret"
        )
    try:
        body = r.json()
    except ValueError:
        raise Transient(f"{where}: the answer is not JSON") from None
    token = field(body, "access_token")
    if not isinstance(token, str) or not token:
        raise Transient(f"{where}: no access_token in the answer")
    try:
        lifetime = float(field(body, "expires_in") or 3600)
    except (TypeError, ValueError):
        lifetime = 3600.0
    return token, lifetime


def image_features(body: Any, image_id: str, what: str) -> ImageFeatures:
    try:
        blob = base64.b64decode(field(body, "features") or "", validate=True)
        return ImageFeatures(
            str(field(body, "imageId") or image_id),
            int(field(body, "featuresCount") or 0),
            int(field(body, "featureLengthInBits") or 0),
            blob,
        )
    except (TypeError, ValueError) as exc:
        raise Transient(f"{what}: malformed answer ({exc})") from None


def search_results(items: Any) -> list[SearchResult]:
    if items is not None and not isinstance(items, list):
        raise Transient(f"malformed search results {str(items)[:200]!r}")
    out = []
    for item in items or []:
        try:
            similarity = float(field(item, "similarity"))
            if not 0.0 <= similarity <= 100.0:  # NaN, infinities, not a percentage
                raise ValueError(similarity)
            out.append(SearchResult(str(field(item, "imageId") or ""), similarity))
        except (TypeError, ValueError):
            raise Transient(f"malformed search result {item!r}") from None
    return out


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


def api_status(response: requests.Response) -> bool:
    """Whether a search context status answer is the imageSearch API's: 200, JSON with a
    ``searchStatus``."""
    if response.status_code != 200:
        return False
    try:
        state = field(response.json(), "searchStatus")
    except ValueError:
        return False
    return isinstance(state, str) and bool(state)


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


def not_the_api(what: str, answer: str, base_url: str) -> str:
    return (
        f"{what}: {answer}: the server at {shown_url(base_url)} is not the Aspose "
        "imageSearch API (another service, a wrong path prefix or API version?); nothing "
        "is the images' fault; check [context] base_url"
    )


def no_context_or_route(what: str, answer: str, context_id: str, base_url: str) -> str:
    return (
        f"{what}: {answer}: no search context {context_id!r} or no such route at "
        f"{shown_url(base_url)}; check [context] base_url and context_id"
    )


def refused_alike(what: str, answer: str, base_url: str) -> str:
    return (
        f"{what}: {SAME_REFUSALS_FATAL} different images in a row were refused with the "
        f"same answer, {answer}, which is not an Aspose error: something at "
        f"{shown_url(base_url)} refuses every call, not the images; check [context] "
        "base_url (and any proxy); the images refused meanwhile wait: `featsync retry "
        "--all` after the fix"
    )


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
