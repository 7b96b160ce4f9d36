"""Findability, `featsync report --probe N`: for N synced images picked at random, search
the context with the image's own file and see whether it comes back first, and with
what similarity. And the context's near-duplicate groups (`--duplicates`).

A probe is not fooled: the file is read (featsync.report_files) and its SHA-256 must be
the content hash the ledger synced; a file changed since (or gone, or unreadable) is
reported as such and not searched for. An image "finds itself" when it is among the
results with the top similarity (an exact duplicate, the same content under another
ID, may tie with it). Costs: one find call per image searched (Aspose: one API call
each; the embedded context, one search of its index and an exact score of the best
candidates).
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from featsync.errors import Fatal, FeatsyncError
from featsync.model import SearchContext, State
from featsync.report_files import Folder, NotRead
from featsync.schema import images

if TYPE_CHECKING:
    from featsync.ledger import SqlLedger

PROBE_THRESHOLD = 0.0  # every image is a candidate: the rank is what is measured
PROBE_RESULTS = 5  # results asked for besides the image's exact duplicates


def sample(ledger: SqlLedger, n: int) -> list[dict[str, Any]]:
    """N synced images at random: ID, relpath, content hash, and how many synced
    images share that content (counted for the picked contents only, by the digest
    index: a subquery per row would scan the synced rows for each)."""
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(images.c.image_id, images.c.relpath, images.c.digest, images.c.features_count)
            .where(images.c.state == State.SYNCED.value)
            .order_by(sa.func.random())
            .limit(n)
        ).all()
        digests = sorted({str(r[2]) for r in rows})
        copies: dict[str, int] = {}
        for start in range(0, len(digests), 500):
            chunk = digests[start : start + 500]
            copies.update(
                (str(d), int(c))
                for d, c in conn.execute(
                    sa.select(images.c.digest, sa.func.count())
                    .where(images.c.digest.in_(chunk), images.c.state == State.SYNCED.value)
                    .group_by(images.c.digest)
                )
            )
    return sorted(
        (
            {
                "image_id": str(r[0]),
                "relpath": r[1] if isinstance(r[1], str) else None,
                "digest": str(r[2]),
                "copies": copies.get(str(r[2]), 1),
                "features_count": _count(r[3]),
            }
            for r in rows
        ),
        key=lambda r: r["image_id"],
    )


def _count(value: Any) -> int | None:
    """A features count as a number; None when the ledger holds none (or not a number)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def probe(
    context: SearchContext,
    folder: Folder,
    picked: list[dict[str, Any]],
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Search for each picked image with its own file; what came back. `find_calls`:
    the searches the context answered; `failed_calls`: those that ended in an error.
    A refusal of the whole context (credentials, a context that is not there) ends the
    probe: `error` says it, and the images not yet searched say so. `stop` set: the
    images not yet searched are left out (`stopped`)."""
    results: list[dict[str, Any]] = []
    calls = failed = 0
    fatal: str | None = None
    started = time.monotonic()
    for p in picked:
        if stop is not None and stop.is_set():
            break
        one: dict[str, Any] = {
            "image_id": p["image_id"],
            "relpath": p["relpath"],
            "features_count": p["features_count"],
        }
        results.append(one)
        if fatal is not None:
            one.update(outcome="error", reason=f"not searched: {fatal}")
            continue
        if not p["relpath"]:
            one.update(outcome="unreadable", reason="the ledger has no path for it")
            continue
        try:
            data = folder.read(p["relpath"])
        except NotRead as exc:
            one.update(outcome="unreadable", reason=str(exc))
            continue
        if hashlib.sha256(data).hexdigest() != p["digest"]:
            one.update(outcome="changed", reason="the file changed since it was synced")
            continue
        try:
            found = context.find_similar(
                image=data, threshold=PROBE_THRESHOLD, max_count=PROBE_RESULTS + p["copies"]
            )
        except FeatsyncError as exc:  # Fatal among them: the context refused us
            failed += 1
            if isinstance(exc, Fatal):
                fatal = str(exc)
            one.update(outcome="error", reason=str(exc))
            continue
        except (TypeError, ValueError, AttributeError) as exc:  # an answer of another shape
            failed += 1
            one.update(outcome="error", reason=f"find similar: malformed answer ({exc})")
            continue
        calls += 1
        one.update(_judge(p["image_id"], [(r.image_id, r.similarity) for r in found]))
    seconds = time.monotonic() - started
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return {
        "asked": len(picked),
        "find_calls": calls,
        "failed_calls": failed,
        "error": fatal,
        "stopped": len(results) < len(picked),
        "seconds": round(seconds, 3),
        "outcomes": counts,
        "images": results,
        "not_finding_themselves": [
            r for r in results if r["outcome"] in ("not_found", "found_lower")
        ],
    }


def _judge(image_id: str, found: list[tuple[str, float]]) -> dict[str, Any]:
    """found_first (the top similarity, above 0; ties allowed: an exact duplicate),
    found_lower (ranked below another image, or nothing matched at all), not_found (not
    among the results)."""
    top = found[0] if found else None
    own = next(((n, s) for n, (i, s) in enumerate(found, 1) if i == image_id), None)
    out: dict[str, Any] = {
        "top": None if top is None else {"image_id": top[0], "similarity": top[1]},
        "rank": None if own is None else own[0],
        "similarity": None if own is None else own[1],
    }
    if own is None:
        out["outcome"] = "not_found"
    elif top is not None and own[1] >= top[1] and own[1] > 0:
        out["outcome"] = "found_first"
    else:
        out["outcome"] = "found_lower"
    return out


def duplicates(context: SearchContext, threshold: float) -> dict[str, Any]:
    """The context's near-duplicate groups at `threshold` (one find-duplicates call);
    a call that fails is recorded (`error`), not the end of the report."""
    started = time.monotonic()
    error: str | None = None
    groups: list[list[dict[str, Any]]] = []
    try:
        found = context.find_duplicates(threshold)
        groups = [[{"image_id": r.image_id, "similarity": r.similarity} for r in g] for g in found]
    except FeatsyncError as exc:
        error = str(exc)
    except (TypeError, ValueError, AttributeError) as exc:  # an answer of another shape
        error = f"find duplicates: malformed answer ({type(exc).__name__}: {exc})"
    return {
        "threshold": threshold,
        "find_calls": 1,
        "error": error,
        "seconds": round(time.monotonic() - started, 3),
        "groups": groups,
    }
