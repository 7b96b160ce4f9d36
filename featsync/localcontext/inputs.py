"""What a `featsync serve` request carries, read and checked at the boundary.

Every check here runs before a route touches a context or the storage, so a refused
request changes nothing. A refusal is an ``ApiError`` 400 whose message names the
parameter and the reason (and shows at most the start of the bad value).
"""

from __future__ import annotations

import json
import math
import unicodedata

from flask import request

from featsync.localcontext.contexts import ApiError

MAX_ID_BYTES = 4096  # an image ID or tag name, as UTF-8 (a POSIX path's length)
MAX_COUNT = 10_000  # maxCount: more results than this is no search
PAGE_DEFAULT, MAX_PAGE = 1000, 10_000  # image IDs per page of a listing


def _bad(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def _shown(value: str) -> str:
    """The start of a client's value, safe to echo in an error."""
    return repr(value[:40] + ("..." if len(value) > 40 else ""))


def arg(name: str, required: bool = True) -> str | None:
    value = request.args.get(name)
    if value is None:
        # query names are matched case-insensitively, as the service does
        lower = name.lower()
        value = next((v for k, v in request.args.items() if k.lower() == lower), None)
    if required and not value:
        raise _bad(f"the query parameter {name!r} is required")
    return value


def checked_id(name: str, value: str) -> str:
    """An image ID, tag name or folder: no control characters, a sane length."""
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise _bad(f"{name} must not contain control characters (got {_shown(value)})")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_ID_BYTES:
        raise _bad(f"{name} is too long: {size} bytes as UTF-8 (at most {MAX_ID_BYTES})")
    return value


def id_arg(name: str = "imageId") -> str:
    return checked_id(name, str(arg(name)))


def optional_id_arg(name: str) -> str | None:
    value = arg(name, required=False)
    return checked_id(name, value) if value else None


def bound_arg(name: str) -> str | None:
    """A bound of a listing (``after``, ``until``): compared with IDs, never stored or
    used as one, so any text is fine (a ledger's ID with a control character, which no
    context holds, is still a place to start or stop); only its length is limited."""
    value = arg(name, required=False)
    if not value:
        return None
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_ID_BYTES:
        raise _bad(f"{name} is too long: {size} bytes as UTF-8 (at most {MAX_ID_BYTES})")
    return value


def _finite(name: str) -> float:
    raw = str(arg(name))
    try:
        value = float(raw)
    except ValueError:
        raise _bad(f"{name} must be a number, got {_shown(raw)}") from None
    if not math.isfinite(value):
        raise _bad(f"{name} must be a finite number, got {_shown(raw)}")
    return value


def threshold() -> float:
    value = _finite("similarityThreshold")
    if not 0.0 <= value <= 100.0:
        raise _bad(f"similarityThreshold must be from 0 to 100 (percent), got {value:g}")
    return value


def max_count() -> int:
    value = _finite("maxCount")
    if value != int(value) or not 0 <= value <= MAX_COUNT:
        raise _bad(f"maxCount must be a whole number from 0 to {MAX_COUNT}, got {value:g}")
    return int(value)


def page_limit(default: int = PAGE_DEFAULT) -> int:
    """``limit`` of a listing page: a whole number from 1 to MAX_PAGE (else `default`)."""
    if arg("limit", required=False) is None:
        return default
    value = _finite("limit")
    if value != int(value) or not 1 <= value <= MAX_PAGE:
        raise _bad(f"limit must be a whole number from 1 to {MAX_PAGE}, got {value:g}")
    return int(value)


def _multipart_checked() -> None:
    """A multipart body must have a boundary and at least one part that parses.

    An empty body is no image, whatever its Content-Type says (Aspose's own SDK sends
    ``multipart/form-data`` with no boundary and no body on a search by imageId)."""
    if not request.content_length:  # waitress gives a chunked body its length
        return
    if "boundary" not in request.mimetype_params:
        raise _bad("malformed multipart body: the Content-Type has no boundary")
    if not request.files and not request.form:
        raise _bad("malformed multipart body: no part could be read")


def image(required: bool) -> bytes | None:
    """Image data: the first multipart part, or the raw body."""
    if request.mimetype == "multipart/form-data":
        _multipart_checked()
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
            raise _bad("image data is required (multipart or raw body)")
        return None
    return data


def tags() -> list[str]:
    raw: str | bytes | None = None
    if request.mimetype == "multipart/form-data":
        _multipart_checked()
        raw = request.form.get("tags")
        if raw is None and "tags" in request.files:
            raw = request.files["tags"].read()
    else:
        raw = request.get_data(cache=False)
    try:
        found = json.loads(raw or b"")
    except ValueError:
        raise _bad("tags must be a JSON array of tag names") from None
    if not isinstance(found, list) or not all(isinstance(t, str) for t in found) or not found:
        raise _bad("tags must be a non-empty JSON array of tag names")
    return [checked_id("a tag name", t) for t in found]
