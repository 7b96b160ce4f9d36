"""Listing the image IDs a context holds: the embedded context lists them, `featsync
serve` pages through them (its own extension, ``GET …/features/ids``); Aspose cannot.

A page is taken only as promised (at most `limit` IDs, strictly increasing, each after
`after` and at most `until`), so a server that answers garbage ends a listing instead of
making it page for ever; and only the IDs under this configuration's ``id_prefix`` are
this ledger's: a context shared by several configurations (one prefix each) holds the
others' images too, which are neither adopted nor orphans.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from featsync.model import SearchContext

LIST_PAGE = 1000  # image IDs asked for per page
MAX_IDS = 20_000_000  # a listing longer than this is taken for a server gone wrong

# A context's image_id_page(after, until, limit): a page of the IDs it holds, in order;
# None: it cannot list.
PageOf = Callable[[str, str | None, int], list[str] | None]


class CannotList(Exception):
    """The context cannot list what it holds, or answered a page that is no page."""


def proper_page(ids: Sequence[object], after: str, until: str | None, limit: int) -> bool:
    """Whether `ids` is a page as promised."""
    if len(ids) > limit:
        return False
    last = after
    for i in ids:
        if not isinstance(i, str) or i <= last or (until is not None and i > until):
            return False
        last = i
    return True


def pages(
    page_of: PageOf,
    after: str = "",
    until: str | None = None,
    prefix: str = "",
    stop: Callable[[], bool] = lambda: False,
    limit: int = LIST_PAGE,
) -> Iterator[list[str]]:
    """The IDs under `prefix` after `after` (up to `until`), a page at a time; raises
    CannotList. Every ID under a prefix is longer than the prefix, so the listing
    starts at it, and ends at the first ID past it."""
    if prefix and after < prefix:
        after = prefix
    seen = 0
    while not stop():
        page = page_of(after, until, limit)
        if page is None:
            raise CannotList("the context cannot list the image IDs it holds")
        if not proper_page(page, after, until, limit):
            raise CannotList(
                "the context's list of image IDs is no proper page (too long, out of order "
                "or out of the range asked for)"
            )
        mine = [i for i in page if i.startswith(prefix)]
        if mine:
            yield mine
        seen += len(page)
        if seen > MAX_IDS:
            raise CannotList(f"the context listed more than {MAX_IDS:,} image IDs")
        if len(page) < limit or len(mine) < len(page):
            return  # the last page, or past the prefix's IDs (they sort together)
        after = page[-1]


def held_ids(context: SearchContext, prefix: str = "", limit: int = LIST_PAGE) -> list[str] | None:
    """Every image ID under `prefix` the context holds, or None if it cannot say."""
    listing = getattr(context, "image_ids", None)
    if callable(listing):
        return [i for i in listing() if i.startswith(prefix)]
    page_of = getattr(context, "image_id_page", None)
    if not callable(page_of):
        return None
    out: list[str] = []
    try:
        for page in pages(page_of, prefix=prefix, limit=limit):
            out += page
    except CannotList:
        return None
    return out
