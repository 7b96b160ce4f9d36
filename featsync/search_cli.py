"""`featsync search` and `featsync duplicates` on the command line: the configured
search context asked through its port (SearchContext.find_similar / find_duplicates:
the embedded context directly, Aspose through findSimilar / findDuplicates), each
image ID shown with its similarity and the path the ledger recorded for it.

Read-only, as the report is: the ledger and the embedded store are opened only to
look, the sync lock is never taken. Only the context the ledger mirrors is searched
(another one's IDs would be shown with this folder's paths).

Exit codes, as grep's: 0 something was found; 1 nothing was; 2 a bad argument, a bad
config or an error (the file, the image ID, the context); 130 / 143 stopped by SIGINT
/ SIGTERM (nothing is printed then).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from featsync import jsonout, logs
from featsync.argtypes import percent, whole_number
from featsync.config import Settings
from featsync.errors import Fatal, FeatsyncError, ItemRejected, NotFound
from featsync.escapes import printable
from featsync.looks import EXIT_NOT_IN_STEP, EXIT_OK
from featsync.model import SearchContext, SearchResult
from featsync.schema import images

if TYPE_CHECKING:
    from featsync.ledger import SqlLedger

SEARCH_THRESHOLD = 60.0  # percent similarity, the default of `search --threshold`
DUPLICATES_THRESHOLD = 90.0  # the default of `duplicates --threshold`
SEARCH_MAX = 10  # results at most, the default of --max
MAX_LIMIT = 1000  # --max at most: a page of results, not a listing of the context
EXIT_NOTHING = EXIT_NOT_IN_STEP  # 1: nothing found (grep's 1)
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO named by mistake cannot hang us
_CODES = (
    "Exit 0 something was found; 1 nothing was; 2 a bad argument, a bad config or an "
    "error; 130 Ctrl-C (143 SIGTERM)."
)


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "search",
        parents=[common],
        help="images of the context similar to FILE or to a stored image",
        description="Search the configured context for images similar to FILE (an "
        "image file anywhere) or to the image stored under --id (which is not listed "
        "among its own results). Each result: similarity (0-100), image ID, and the "
        "path in the folder the ledger recorded for it. Read-only. " + _CODES,
    )
    s.add_argument("file", nargs="?", metavar="FILE", help="an image file to search with")
    s.add_argument("--id", dest="image_id", metavar="IMAGE_ID", help="a stored image instead")
    s.add_argument(
        "--threshold",
        type=percent,
        default=SEARCH_THRESHOLD,
        metavar="PERCENT",
        help=f"least similarity shown (default {SEARCH_THRESHOLD:g})",
    )
    s.add_argument(
        "--max",
        type=whole_number(1, MAX_LIMIT),
        default=SEARCH_MAX,
        metavar="N",
        help=f"results at most, 1 to {MAX_LIMIT} (default {SEARCH_MAX})",
    )
    s.add_argument("--json", action="store_true", help="print one JSON document")
    d = sub.add_parser(
        "duplicates",
        parents=[common],
        help="groups of near-duplicate images in the context",
        description="Ask the configured context for its near-duplicate groups (one "
        "call; the embedded context queries its index once per image), largest group "
        "first, each image with its similarity to the group's first one and its path in "
        "the folder. Read-only. " + _CODES,
    )
    d.add_argument(
        "--threshold",
        type=percent,
        default=DUPLICATES_THRESHOLD,
        metavar="PERCENT",
        help=f"least similarity within a group (default {DUPLICATES_THRESHOLD:g})",
    )
    d.add_argument("--json", action="store_true", help="print one JSON document")


def run(settings: Settings, args: argparse.Namespace) -> int:
    """`search` or `duplicates`; errors are raised as Fatal (featsync.cli: exit 2)."""
    from featsync.stopping import stop_on_signals

    query: bytes | None = None
    if args.command == "search":
        if args.file is not None and args.image_id is not None:
            raise Fatal("search: give an image FILE or --id IMAGE_ID, not both")
        if args.file is None and args.image_id is None:
            raise Fatal("search: give an image FILE or --id IMAGE_ID to search with")
        if args.image_id == "":
            raise Fatal("search --id: an empty image ID names no image")
        if args.file is not None:
            query = read_query(args.file, settings.sync.max_file_size)
    # Ctrl-C: the call in flight finishes, nothing is printed, exit 130 (SIGTERM: 143).
    with stop_on_signals(args.command) as stop:
        try:
            found = _ask(settings, args, query)
            if stop.signum is not None:
                return stop.exit_code
            code = _show(settings, args, found)
        finally:
            sys.stdout.flush()  # a reader gone (`| head`): raised here, said by cli.main
    return stop.exit_code if stop.signum is not None else code


def _ask(
    settings: Settings, args: argparse.Namespace, query: bytes | None
) -> list[list[dict[str, Any]]]:
    """The context's answer (search: one group of results), each result with its path."""
    from featsync.ledger import SqlLedger
    from featsync.wiring import open_context

    ledger = SqlLedger(settings.ledger.url, read_only=True)
    try:
        context = open_context(settings, logs.get(), read_only=True)
        try:
            same_context(context.identity(), ledger.context_identity())
            if args.command == "search":
                name = f"search FILE {printable(str(args.file))!r}"
                found = search(context, query, args.image_id, args.threshold, args.max, name)
                groups = [found]
            else:
                groups = duplicates(context, args.threshold)
        finally:
            context.close()
        ids = {r.image_id for g in groups for r in g}
        paths = paths_of(ledger, ids)
    finally:
        ledger.close()
    if unknown := ids - paths.keys():
        # A sync may have added them since the look at the ledger was taken (it records
        # an add before it sends it): asked again of the ledger as it is now.
        now = SqlLedger(settings.ledger.url, read_only=True)
        try:
            paths |= paths_of(now, unknown)
        finally:
            now.close()
    return [[_entry(r, paths) for r in g] for g in groups]


def same_context(configured: str, mirrored: str | None) -> None:
    """Search only the context the ledger mirrors: the paths are the ledger's."""
    if mirrored is not None and configured != mirrored:
        raise Fatal(
            f"[context] names {printable(configured)}, but the ledger mirrors "
            f"{printable(mirrored)}: its paths are not those of this context's images; set "
            "[context] back, or run `featsync reconcile --resync` to sync this one"
        )


def search(
    context: SearchContext,
    image: bytes | None,
    image_id: str | None,
    threshold: float,
    max_count: int,
    name: str = "search FILE",
) -> list[SearchResult]:
    """find_similar, its errors named by what was asked (`name`: the file's, for its
    refusal). With an image ID the image itself is left out of its results (one more
    is asked for in its place)."""
    try:
        if image is not None:
            return context.find_similar(image=image, threshold=threshold, max_count=max_count)
        assert image_id is not None
        found = context.find_similar(
            image_id=image_id, threshold=threshold, max_count=max_count + 1
        )
    except ItemRejected as exc:
        what = f"{name}: not an image the context takes" if image is not None else "search --id"
        raise Fatal(f"{what}: {printable(str(exc))}") from None
    except NotFound as exc:
        raise Fatal(
            f"search --id {printable(str(image_id))!r}: the context holds no image of "
            f"that ID ({printable(str(exc))})"
        ) from None
    except Fatal:
        raise
    except FeatsyncError as exc:  # Transient (retries spent) and the rest: an error here
        raise Fatal(f"search: {printable(str(exc))}") from None
    except Exception as exc:  # a fault in the context: exit 2, never 1 ("nothing found")
        raise Fatal(f"search: the context failed ({_fault(exc)})") from exc
    return [r for r in found if r.image_id != image_id][:max_count]


def duplicates(context: SearchContext, threshold: float) -> list[list[SearchResult]]:
    """find_duplicates' groups, largest first (then by their first image ID)."""
    try:
        groups = context.find_duplicates(threshold)
    except Fatal:
        raise
    except FeatsyncError as exc:
        raise Fatal(f"duplicates: {printable(str(exc))}") from None
    except Exception as exc:  # a fault in the context: exit 2, never 1 ("nothing found")
        raise Fatal(f"duplicates: the context failed ({_fault(exc)})") from exc
    return sorted((g for g in groups if g), key=lambda g: (-len(g), g[0].image_id))


def _fault(exc: Exception) -> str:
    return printable(f"{type(exc).__name__}: {exc}")


def paths_of(ledger: SqlLedger, image_ids: Iterable[str]) -> dict[str, str | None]:
    """The path (relative to the folder) the ledger recorded for each image ID it knows
    (None: it knows the ID but has no path for it); IDs it does not know are absent."""
    ids = sorted(set(image_ids))
    out: dict[str, str | None] = {}
    with ledger.engine.connect() as conn:
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = conn.execute(
                sa.select(images.c.image_id, images.c.relpath).where(images.c.image_id.in_(chunk))
            )
            out.update((str(i), p if isinstance(p, str) and p else None) for i, p in rows)
    return out


def _entry(r: SearchResult, paths: dict[str, str | None]) -> dict[str, Any]:
    return {
        "imageId": r.image_id,
        "similarity": r.similarity,
        "path": paths.get(r.image_id),
        "inLedger": r.image_id in paths,
    }


def read_query(path: str, limit: int) -> bytes:
    """The bytes of the image file to search with: a regular file of 1 to `limit`
    bytes ([sync] max_file_size: no bigger image is ever synced), or Fatal saying why."""
    name = f"search FILE {printable(path)!r}"
    try:
        fd = os.open(path, _FLAGS)
    except FileNotFoundError:
        raise Fatal(f"{name}: no such file") from None
    except OSError as exc:
        raise Fatal(f"{name}: cannot open it: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise Fatal(f"{name}: is a folder, not an image file")
        if not stat.S_ISREG(st.st_mode):
            raise Fatal(f"{name}: not a regular file (a FIFO, a device or a socket)")
        if st.st_size > limit:
            raise Fatal(f"{name}: {st.st_size:,} bytes, more than [sync] max_file_size {limit:,}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise Fatal(f"{name}: cannot read it: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise Fatal(f"{name}: grew past [sync] max_file_size {limit:,} while read")
    if not data:
        raise Fatal(f"{name}: is empty, not an image")
    return data


def _show(settings: Settings, args: argparse.Namespace, groups: list[list[dict[str, Any]]]) -> int:
    if args.command == "search":
        [results] = groups
        if args.json:
            jsonout.emit(
                {
                    "query": {"file": args.file, "imageId": args.image_id},
                    "threshold": args.threshold,
                    "max": args.max,
                    "folder": settings.sync.folder,
                    "contextKind": settings.context.kind,
                    "results": results,
                }
            )
        else:
            print("\n".join(search_lines(args.file, args.image_id, args.threshold, results)))
        return EXIT_OK if results else EXIT_NOTHING
    if args.json:
        jsonout.emit(
            {
                "threshold": args.threshold,
                "folder": settings.sync.folder,
                "contextKind": settings.context.kind,
                "groups": groups,
            }
        )
    else:
        print("\n".join(duplicate_lines(args.threshold, groups)))
    return EXIT_OK if groups else EXIT_NOTHING


def search_lines(
    file: str | None, image_id: str | None, threshold: float, results: list[dict[str, Any]]
) -> list[str]:
    what = f"FILE {file}" if file is not None else f"image {image_id}"
    head = f"similar to {printable(what)} (similarity >= {threshold:g}): "
    if not results:
        return [head + "none found"]
    return [head + f"{len(results)} found", *(result_line(r) for r in results)]


def duplicate_lines(threshold: float, groups: list[list[dict[str, Any]]]) -> list[str]:
    head = f"near duplicates (similarity >= {threshold:g}): "
    if not groups:
        return [head + "none found"]
    n = sum(len(g) for g in groups)
    out = [head + f"{len(groups)} group(s) of {n} images"]
    for k, group in enumerate(groups, 1):
        out += ["", f"group {k} ({len(group)} images, similarity to its first):"]
        out += [result_line(r) for r in group]
    return out


def result_line(r: dict[str, Any]) -> str:
    """`  97.5  IMAGE_ID  PATH`: the similarity with one decimal, the ID and the path
    escaped for the terminal (a newline or an escape in a name is shown as `\\n`, `\\x1b`)."""
    if r["path"] is not None:
        where = printable(r["path"])
    elif r["inLedger"]:
        where = "(the ledger has no path for it)"
    else:
        where = "(not in the ledger: no path known)"
    return f"  {r['similarity']:5.1f}  {printable(r['imageId'])}  {where}"
