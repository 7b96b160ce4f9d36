"""Who may talk to `featsync serve`: the token endpoint, with a budget of failed attempts
per remote address (an address out of budget gets 429 and ``Retry-After``, its attempt
not even checked, so guessing a secret is slow; no server thread ever sleeps), and the
gate that refuses a request's body, before it is read, unless the request carries a
valid bearer token (or is a small token request)."""

from __future__ import annotations

import hmac
import math
import uuid
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, request

from featsync.localcontext import answers
from featsync.localcontext.contexts import Tokens
from featsync.localcontext.throttle import FailureBudget
from featsync.localcontext.transport import Gate, Head, Refusal
from featsync.model import Secret

TOKEN_FORM_MAX = 16 * 1024  # a token request's form: three short fields
MAX_LOGGED_CLIENT_ID = 64


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """Failed token requests allowed per remote address: a burst, then one per interval."""

    failures: int = 10
    interval_s: float = 2.0


def gate_for(tokens: Tokens, access_log: Any) -> Gate:
    """Decides, from its headers alone, whether a request's body will be read at all."""

    def gate(head: Head) -> Refusal | None:
        if head.path.endswith("/token"):
            if head.body_size is not None and head.body_size <= TOKEN_FORM_MAX:
                return None
            status, reason, code = 413, "Request Entity Too Large", "RequestEntityTooLarge"
            message = f"a token request's form is at most {TOKEN_FORM_MAX} bytes"
        elif tokens.authorizes(head.authorization):
            return None
        else:
            status, reason, code = 401, "Unauthorized", "Unauthorized"
            message = "a valid bearer token is required"
        request_id = uuid.uuid4().hex[:16]
        if access_log is not None:
            access_log.info(
                "http_request",
                method=head.method,
                path=head.path,
                image_id=head.param("imageId"),
                status=status,
                dropped=False,
                duration_ms=0.0,
                request_id=request_id,
                body_read=False,
            )
        return Refusal(status, reason, answers.error_body(code, message, request_id))

    return gate


# -- token -------------------------------------------------------------------------------


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of UTF-8 bytes (compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def token_routes(
    app: Flask,
    client_id: str,
    client_secret: Secret,
    tokens: Tokens,
    budget: TokenBudget,
    log: Any,
) -> None:
    failures = FailureBudget(budget.failures, budget.interval_s)

    def refused(reason: str, given_id: str, **fields: Any) -> None:
        if log is not None:  # never the secret
            log.warning(
                "token_refused",
                remote=request.remote_addr,
                client_id=given_id[:MAX_LOGGED_CLIENT_ID],
                reason=reason,
                **fields,
            )

    def token() -> Response:
        remote = request.remote_addr or ""
        form = request.form
        given_id = form.get("client_id", "")
        wait = failures.take(remote)
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            refused("throttled", given_id, retry_after_s=retry_after)
            resp = answers.oauth_error(
                429,
                "too_many_attempts",
                f"too many failed token requests from this address; retry in {retry_after} s",
            )
            resp.headers["Retry-After"] = str(retry_after)
            return resp
        if form.get("grant_type") != "client_credentials":
            refused("unsupported_grant_type", given_id)
            return answers.oauth_error(
                400, "unsupported_grant_type", "grant_type must be client_credentials"
            )
        id_ok = _same(given_id, client_id)
        secret_ok = _same(form.get("client_secret", ""), client_secret.reveal())
        if not (id_ok and secret_ok):
            refused("bad_credentials", given_id)
            return answers.oauth_error(400, "invalid_client", "unknown client or secret")
        failures.refund(remote)
        return answers.ok(
            {
                "access_token": tokens.issue(),
                "expires_in": tokens.lifetime_s,
                "token_type": "Bearer",
            }
        )

    for path in ("/connect/token", "/oauth2/token"):
        app.add_url_rule(path, endpoint=path, view_func=token, methods=["POST"])
