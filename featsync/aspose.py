"""The Aspose.Imaging Cloud search context over HTTP: ``[context] kind = "aspose"``.

The wire contract is ``shared/aspose-api.md``: camelCase JSON read case-insensitively,
image data as the first multipart part named ``imageData`` (as the official SDKs
send it), status 200 for every success, errors as ``{"error": {...}}`` or the legacy
``{"Message": ...}``.

Errors are classified here, where they happen:

- connection errors, timeouts, 408, 429, 500, 502, 503, 504 are retried by urllib3's
  ``Retry`` mounted on the session (exponential backoff with jitter, ``Retry-After``
  honoured up to ``backoff_max``; POST, PUT and DELETE too, on purpose: a repeated
  add finds the features there and becomes an update, a repeated delete finds
  nothing and is a success) and become ``Transient`` once the retries are spent;
- 401 fetches a new token once and repeats the call once; a second 401, a 403, or a
  token endpoint that refuses the client are ``Fatal`` for the run;
- a redirect is never followed, and is ``Fatal`` naming the URL to fix; so is a TLS
  certificate that is not trusted (retrying cannot help).

A wrong ``[context] base_url`` (another service, a wrong path prefix or API version)
makes every call fail with 400, 404 or 405. That must stop the run with one message
naming base_url, not reject (quarantine) every image one by one, nor count a delete as
done. So:

- 405 is ``Fatal``: the method of a call is fixed by the operation, never by the image;
- 404 is ``NotFound`` only on a call that looks an image up (update, delete, get) and
  only once the server has shown it is the imageSearch API (below); a 404 whose body
  is not an Aspose error (an HTML page, a plain "Not Found"), or on a call that looks no
  image up (add, create, status), is ``Fatal``: the route is missing (the search
  context is, if the server says ``ContextNotFound``);
- any other 4xx rejects the one image (``ItemRejected``) with the server's reason, once
  the server has shown it is the imageSearch API; a run of ``SAME_REFUSALS_FATAL``
  different images refused with one and the same answer that is not an Aspose error
  body, with no success between, is ``Fatal`` naming base_url and that answer.

"Shown it is the imageSearch API": before the first 404 or refusal is blamed on an
image, the client asks the search context's status once (``GET …/{id}/status``); a
200 with a ``searchStatus`` is the API (remembered for the client's life, as a status
call that succeeds is), anything else is ``Fatal`` naming base_url (and stands for
``NOT_API_HOLDS_S``, so the calls in flight do not each ask). A body's shape alone
cannot tell: ``featsync serve`` (Flask) answers an unknown route with an Aspose-shaped
``{"error": {"code": "NotFound"}}``, the same code as a missing image, and another API
version of Aspose would write its errors the same way. And a refusal's sameness alone
cannot either: five corrupt images in a row may get the same reason from Aspose itself
(its refusals are JSON error bodies, so they never count towards the run). The cost is
one status call in a run that meets a 404 or a refusal.

The session, the token and reading the answers (fields in any case, error reasons, the
retry policy) are featsync.aspose_wire.

The token and the client secret are never put in a log line, an exception or a repr;
an error answer that echoes them (a server that is not the API may) has them blanked.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import requests

from featsync.aspose_wire import (
    SAME_REFUSALS_FATAL,
    TRANSIENT_STATUS,
    RefusalRun,
    TokenSource,
    api_status,
    aspose_error,
    describe,
    error_reason,
    field,
    image_features,
    no_context_or_route,
    no_redirect,
    not_the_api,
    refused_alike,
    search_results,
    session,
    tls_refused,
)
from featsync.errors import (
    AlreadyExists,
    Fatal,
    ItemRejected,
    NotFound,
    Transient,
)
from featsync.listing import LIST_PAGE, proper_page
from featsync.model import ImageData, ImageFeatures, SearchResult, Secret
from featsync.upload import Upload

API = "/imaging/ai/imageSearch"
CONTEXT_NOT_FOUND = "ContextNotFound"  # the error code featsync serve gives a missing context
NOT_API_HOLDS_S = 5.0  # how long "base_url is not the imageSearch API" stands unasked


@dataclass(frozen=True, slots=True)
class ClientSettings:
    base_url: str = "https://api.aspose.cloud/v3.0"
    auth_url: str = "https://api.aspose.cloud/connect/token"
    context_id: str = ""
    storage: str = ""
    folder: str = ""
    connect_timeout: float = 10.0
    read_timeout: float = 120.0
    verify_tls: bool = True
    trust_env: bool = True
    max_retries: int = 5
    backoff_max: float = 60.0
    idle_timeout: float = 300.0
    pool_size: int = 16


class AsposeContext:
    """A search context in Aspose.Imaging Cloud (or in ``featsync serve``)."""

    def __init__(
        self, settings: ClientSettings, client_id: str, secret: Secret, log: Any = None
    ) -> None:
        self.settings = settings
        self._probe_lock = threading.Lock()
        self._is_api = False  # the status route answered as the imageSearch API does
        self._not_api: tuple[float, str] | None = None  # (when, what status answered)
        self._refusals = RefusalRun()
        self._cannot_list = False  # the server has no listing of image IDs (Aspose itself)
        self._timeout = (settings.connect_timeout, settings.read_timeout)
        self._session = session(
            trust_env=settings.trust_env,
            verify_tls=settings.verify_tls,
            max_retries=settings.max_retries,
            backoff_max=settings.backoff_max,
            pool_size=settings.pool_size,
            log=log,
        )
        self._tokens = TokenSource(
            self._session, settings.auth_url, client_id, secret, self._timeout, log
        )

    def __repr__(self) -> str:
        return f"AsposeContext({self.settings.base_url!r}, context {self.settings.context_id!r})"

    def identity(self) -> str:
        s = self.settings
        where = "".join(
            f", {k} {v!r}" for k, v in (("storage", s.storage), ("folder", s.folder)) if v
        )
        return f"Aspose context {s.context_id!r} at {s.base_url}{where}"

    def close(self) -> None:
        self._session.close()

    # -- calls -------------------------------------------------------------------------

    def _url(self, path: str, params: dict[str, str] | None = None, in_context: bool = True) -> str:
        s = self.settings
        query = dict(params or {})
        if s.storage:
            query["storage"] = s.storage
        if s.folder:
            query["folder"] = s.folder
        base = f"{s.base_url}{API}"
        if in_context:
            if not s.context_id:
                raise Fatal(
                    "context.context_id is empty: create a search context with "
                    "`featsync context create` and put its id in the config"
                )
            base += "/" + quote(s.context_id, safe="")
        qs = urlencode(query, quote_via=quote)
        return f"{base}{path}" + (f"?{qs}" if qs else "")

    def _send(
        self,
        method: str,
        url: str,
        what: str,
        image: ImageData | None = None,
        redirect_fatal: bool = True,
    ) -> tuple[requests.Response, str]:
        """One call, with a fresh token and one more try after a 401; (answer, token).
        A redirect is Fatal (naming base_url) unless `redirect_fatal` is false."""
        for attempt in (1, 2):
            token = self._tokens.get()
            headers = {"Authorization": f"Bearer {token}"}
            body = None
            if image is not None:
                body = Upload(image)
                headers["Content-Type"] = body.content_type
            try:
                # No redirects: following one would turn a POST into a GET whose 200
                # looks like success (and would carry the token elsewhere).
                r = self._session.request(
                    method,
                    url,
                    data=body,
                    headers=headers,
                    timeout=self._timeout,
                    allow_redirects=False,
                )
            except requests.exceptions.SSLError as exc:
                raise Fatal(tls_refused(what, exc)) from None
            except requests.RequestException as exc:
                raise Transient(f"{what}: {describe(exc)}") from None
            if redirect_fatal:
                no_redirect(r, what, "context.base_url")
            if r.status_code != 401:
                break
            self._tokens.forget(token)  # expired or revoked: one fresh token, one more try
            if attempt == 2:
                _code, reason = self._reason(r, token)
                raise Fatal(f"{what}: the server refused a fresh token (HTTP 401: {reason})")
        return r, token

    def _reason(self, r: requests.Response, token: str) -> tuple[str, str]:
        """The error's code and reason, the token blanked out: a server that is not the
        API (an echo service, a debug page) may repeat the request, headers and all."""
        code, reason = error_reason(r)
        return code, reason.replace(token, "[token]") if token else reason

    def _request(
        self,
        method: str,
        url: str,
        what: str,
        image: ImageData | None = None,
        image_id: str | None = None,
        lookup: bool = False,
    ) -> requests.Response:
        """A call, its failure classified (see the module docstring). `image_id`: the
        call is about this image (a refusal may be its fault); `lookup`: the call looks
        the image up (a 404 may mean it is not there)."""
        r, token = self._send(method, url, what, image)
        status = r.status_code
        if status == 200:
            self._refusals.reset()
            return r
        code, reason = self._reason(r, token)
        if status in TRANSIENT_STATUS:
            raise Transient(f"{what}: HTTP {status} ({reason}), retries spent")
        ours, base_url = aspose_error(r), self.settings.base_url
        if status == 403:
            raise Fatal(f"{what}: forbidden (HTTP 403: {reason})")
        if status == 405:  # the operation fixes the method: never the image's fault
            raise Fatal(not_the_api(what, f"HTTP 405 ({reason})", base_url))
        if status == 404:
            if code == CONTEXT_NOT_FOUND:
                raise Fatal(self._context_missing(reason))
            if not ours:
                raise Fatal(
                    not_the_api(what, f"HTTP 404, not an Aspose error ({reason})", base_url)
                )
            if not lookup:  # no image is looked up: the context or the route is missing
                answer = f"HTTP 404 ({reason})"
                raise Fatal(no_context_or_route(what, answer, self.settings.context_id, base_url))
            self._check_api(what, f"HTTP 404 ({reason})")
            raise NotFound(f"{what}: not found ({reason})")
        if code == "AlreadyExists":
            raise AlreadyExists(f"{what}: {reason}")
        if image_id is not None:
            self._check_api(what, f"HTTP {status} ({reason})")
            if ours:  # the API itself refused an upload: the route works
                self._refusals.reset()
            elif self._refusals.refused(image_id, (status, reason)) >= SAME_REFUSALS_FATAL:
                raise Fatal(refused_alike(what, f"HTTP {status} ({reason})", base_url))
        raise ItemRejected(f"HTTP {status}: {reason}")

    def _check_api(self, what: str, answer: str) -> None:
        """Before a 404 or a refusal is blamed on an image: is the server at base_url the
        imageSearch API? A yes is remembered; a no for NOT_API_HOLDS_S only (the calls in
        flight share it; a daemon's next cycle asks again). Fatal naming base_url if not."""
        if self._is_api:
            return
        with self._probe_lock:
            if self._is_api:
                return
            seen = self._not_api
            if seen is None or time.monotonic() - seen[0] > NOT_API_HOLDS_S:
                seen = self._ask_status(what, answer)
                if seen is None:
                    self._is_api = True
                    return
                self._not_api = seen
        answer = f"{answer}, and its search context {seen[1]}"
        raise Fatal(not_the_api(what, answer, self.settings.base_url))

    def _ask_status(self, what: str, answer: str) -> tuple[float, str] | None:
        """None if the status route answers as the API does, else (now, its answer)."""
        r, token = self._send("GET", self._url("/status"), "search context status")
        if api_status(r):
            return None
        if r.status_code in TRANSIENT_STATUS:
            raise Transient(
                f"{what}: {answer}; the status check that tells an image's fault from a "
                f"wrong base_url answered HTTP {r.status_code}"
            )
        code, reason = self._reason(r, token)
        if r.status_code == 404 and code == CONTEXT_NOT_FOUND:
            raise Fatal(self._context_missing(reason))
        return time.monotonic(), f"status HTTP {r.status_code} ({reason})"

    def _context_missing(self, reason: str) -> str:
        return f"search context {self.settings.context_id!r} not found ({reason})"

    def _json(self, r: requests.Response, what: str) -> Any:
        try:
            return r.json()
        except ValueError:
            text = r.text[:80].replace("\n", " ")
            raise Transient(f"{what}: the answer is not JSON ({text!r})") from None

    # -- the search context ----------------------------------------------------------

    def create_context(self, detector: str = "akaze", algorithm: str = "randomBinaryTree") -> str:
        url = self._url(
            "/create", {"detector": detector, "matchingAlgorithm": algorithm}, in_context=False
        )
        body = self._json(self._request("POST", url, "create search context"), "create")
        context_id = field(body, "id")
        if not isinstance(context_id, str) or not context_id:
            raise Transient("create search context: no id in the answer")
        return context_id

    def status(self) -> str:
        r = self._request("GET", self._url("/status"), "search context status")
        self._is_api = self._is_api or api_status(r)
        return str(field(self._json(r, "status"), "searchStatus") or "")

    def check_access(self) -> None:
        """Fetch a token now (tokens are otherwise fetched by the first call): a wrong
        client ID or secret is Fatal before a cycle plans, even one that would send
        nothing. No call to the context: a cycle with nothing to send makes none."""
        self._tokens.get()

    def delete_context(self) -> None:
        self._request("DELETE", self._url(""), "delete search context")

    def wait_idle(self, timeout: float | None = None) -> None:
        """Poll the status until it is Idle; Transient if it is not within `timeout`."""
        limit = self.settings.idle_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        pause = 0.2
        while (state := self.status()) != "Idle":
            if time.monotonic() + pause > deadline:
                raise Transient(f"search context still {state!r} after {limit:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 5.0)

    # -- features by image ID (the SearchContext port) ----------------------------------

    def add_features(self, image_id: str, image: ImageData) -> int | None:
        what = f"add features of {image_id!r}"
        url = self._url("/features", {"imageId": image_id})
        try:
            # Not a lookup: a missing image cannot be the reason for a 404 on add.
            self._request("POST", url, what, image, image_id)
        except ItemRejected:
            # The contract does not say what a POST for an existing ID answers: if the
            # features are there, say so, and the caller sends an update instead.
            if self._exists(image_id):
                raise AlreadyExists(f"{what}: features already exist") from None
            raise
        return None

    def update_features(self, image_id: str, image: ImageData) -> int | None:
        url = self._url("/features", {"imageId": image_id})
        self._request("PUT", url, f"update features of {image_id!r}", image, image_id, True)
        return None

    def delete_features(self, image_id: str) -> None:
        url = self._url("/features", {"imageId": image_id})
        self._request("DELETE", url, f"delete features of {image_id!r}", None, image_id, True)

    def _exists(self, image_id: str) -> bool:
        try:
            self.get_features(image_id)
        except NotFound:
            return False
        return True

    def get_features(self, image_id: str) -> ImageFeatures:
        what = f"get features of {image_id!r}"
        url = self._url("/features", {"imageId": image_id})
        r = self._request("GET", url, what, None, image_id, True)
        return image_features(self._json(r, what), image_id, what)

    def image_id_page(
        self, after: str, until: str | None = None, limit: int = LIST_PAGE
    ) -> list[str] | None:
        """Up to `limit` image IDs the context holds, in order, after `after` (and up to
        `until`); a page shorter than `limit` is the last. This is featsync serve's own
        extension (``GET …/features/ids``): None means the server cannot list (Aspose
        itself has no such route), which is no error.

        Its answer is judged here alone, never by the rules that make a 404 or 405 of
        an image call fatal (module docstring): that a route featsync made up is missing
        says nothing about base_url. Any answer but a transient one or a 200 with
        ``imageIds`` (a 404 or 405 of any shape, a redirect, another body) is "cannot
        list", remembered for the client's life; the status probe and the run of
        refusals are left alone. A 400 is about this request (a bound, say), not the
        route: "cannot list" for this call only. So is a page that is no proper page
        (more IDs than asked for, out of order, out of the range): a server that
        answers garbage must not make a caller page for ever."""
        if self._cannot_list:
            return None
        what = "list image IDs"
        params = {"after": after, "limit": str(limit)}
        if until is not None:
            params["until"] = until
        r, token = self._send("GET", self._url("/features/ids", params), what, None, False)
        if r.status_code in TRANSIENT_STATUS:
            _code, reason = self._reason(r, token)
            raise Transient(f"{what}: HTTP {r.status_code} ({reason}), retries spent")
        if r.status_code in (400, 401, 403):  # about this request or its token, not the route
            return None
        ids = None
        if r.status_code == 200:
            try:
                ids = field(r.json(), "imageIds")
            except ValueError:
                ids = None
        if not isinstance(ids, list):
            self._cannot_list = True
            return None
        return ids if proper_page(ids, after, until, limit) else None

    def find_similar(
        self,
        *,
        image: bytes | None = None,
        image_id: str | None = None,
        threshold: float,
        max_count: int,
    ) -> list[SearchResult]:
        params = {"similarityThreshold": f"{threshold:g}", "maxCount": str(max_count)}
        if image_id is not None:
            params["imageId"] = image_id
        url = self._url("/findSimilar", params)
        # With image data: POST (featsync serve takes it; the official SDKs cannot send
        # a body on the GET, see the contract, section 2.1).
        method = "GET" if image is None else "POST"
        # With an image ID it is looked up (in the storage): a 404 may be its absence.
        r = self._request(method, url, "find similar", image, lookup=image_id is not None)
        body = self._json(r, "find similar")
        return search_results(field(body, "results"))

    def find_duplicates(self, threshold: float) -> list[list[SearchResult]]:
        url = self._url("/findDuplicates", {"similarityThreshold": f"{threshold:g}"})
        body = self._json(self._request("GET", url, "find duplicates"), "find duplicates")
        groups = field(body, "duplicates") or []
        return [search_results(field(g, "duplicateImages")) for g in groups]
