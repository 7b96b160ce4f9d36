"""Drift: where the search context differs from what the ledger believes, and the
check that finds it (`featsync verify`, and the daemon's reviews).

The check GETs each image's features with a bounded pool of threads (the context
clients are thread-safe: the Aspose one shares one session and one token), keeps only
each answer's features count, never the features (memory stays flat at any size),
and judges it against the ledger's row (`judge`, pure). A context that can list the
IDs it holds (the embedded one, `featsync serve`) is also asked for them, a page at a
time over the range checked: an ID the ledger does not know is an orphan.

Every drift is confirmed before it is reported: a drift found through the listing is
GET once more, and each drift's ledger row is read again at the end; one that changed
meanwhile (a daemon syncing beside a `verify`) is no evidence and is left out.

Errors: a ``Fatal`` answer ends the check (raised once the calls in flight are done);
a transient one leaves that image unverified, and `BREAKER` of them in a row end the
check early (the context is down: no point in 10,000 more timeouts).
"""

from __future__ import annotations

import queue
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from featsync import listing
from featsync.errors import Fatal, ItemRejected, NotFound, Transient
from featsync.listing import LIST_PAGE as LIST_PAGE  # re-exported (tests)
from featsync.listing import PageOf
from featsync.model import SearchContext, State

KINDS = ("missing", "count_differs", "held_but_deleted", "orphan")
BREAKER = 3  # transient failures in a row that end a check early
FILL_BATCH = 500  # features counts written to the ledger at a time

T = TypeVar("T")
_END: Any = object()


class Believed(NamedTuple):
    """What the ledger believes of one image ID, as a check reads it."""

    image_id: str
    state: str
    remote: bool
    features_count: int | None
    version: int


class Drift(NamedTuple):
    image_id: str
    kind: str  # one of KINDS
    detail: str

    def as_json(self) -> dict[str, str]:
        return {"image_id": self.image_id, "kind": self.kind, "detail": self.detail}


Lookup = Callable[[Sequence[str]], Mapping[str, Believed]]  # the ledger's rows of these IDs
Fill = Callable[[Sequence[tuple[str, int, int]]], int]  # (ID, version, count): how many written


def checkable(row: Believed) -> bool:
    """Whether a GET can tell anything of this row: synced (held) or deleted (not held).
    A failed row is in flux: the context may or may not hold it."""
    return row.state in (State.SYNCED.value, State.DELETED.value)


def judge(row: Believed, held: int | None) -> Drift | None:
    """A checked row against the features count the context answered (None: it holds
    no features for the ID)."""
    if row.state == State.SYNCED.value:
        if held is None:
            return Drift(row.image_id, "missing", "synced by the ledger, absent")
        if row.features_count is not None and held != row.features_count:
            why = f"{held} features held, {row.features_count} recorded"
            return Drift(row.image_id, "count_differs", why)
    elif row.state == State.DELETED.value and held is not None:
        return Drift(row.image_id, "held_but_deleted", "deleted by the ledger, held")
    return None


def judge_listed(image_id: str, row: Believed | None) -> Drift | None:
    """An ID the context listed, against the ledger's row of it."""
    if row is None:
        return Drift(image_id, "orphan", "held, unknown to the ledger")
    if row.state == State.DELETED.value:
        return Drift(image_id, "held_but_deleted", "deleted by the ledger, held")
    if not row.remote:
        return Drift(image_id, "orphan", f"held, the ledger says not held ({row.state})")
    return None


@dataclass(slots=True)
class Findings:
    checked: int = 0  # rows GET and judged
    drifts: list[Drift] = field(default_factory=list)
    unverified: list[tuple[str, str]] = field(default_factory=list)  # (image ID, error)
    filled: int = 0  # features counts the ledger lacked, written from the answers
    listed: bool | None = None  # orphans looked for; False: the context cannot list
    stopped: str | None = None  # why the check ended early
    not_checked: int = 0  # rows left when it did

    def by_kind(self) -> dict[str, int]:
        return dict(Counter(d.kind for d in self.drifts))

    @property
    def clean(self) -> bool:
        return not (self.drifts or self.unverified or self.stopped)


def held_count(context: SearchContext, image_id: str) -> int | None:
    """The features count the context holds for `image_id`; None if it holds none."""
    try:
        return context.get_features(image_id).features_count
    except NotFound:
        return None


class Check:
    """One check: rows GET and judged (`rows`), IDs listed (`listing`), drifts
    confirmed (`confirm`). `stop` is asked before each call; `progress` told of each
    answer; `fill` writes the counts the ledger lacks."""

    def __init__(
        self,
        context: SearchContext,
        concurrency: int,
        stop: Callable[[], bool] = lambda: False,
        progress: Callable[[], None] = lambda: None,
        fill: Fill | None = None,
        prefix: str = "",
    ) -> None:
        self.context = context
        self.prefix = prefix  # the configuration's id_prefix: other IDs are not its own
        self.concurrency = max(1, concurrency)
        self.stop = stop
        self.progress = progress
        self.fill = fill
        self.found = Findings()
        self._seen: dict[str, tuple[str, int] | None] = {}  # a drift's row as judged
        self._to_fill: list[tuple[str, int, int]] = []
        self._transient_run = 0

    # -- rows of the ledger ------------------------------------------------------------

    def rows(self, rows: Iterable[Believed]) -> None:
        """GET every checkable row and judge it."""
        self._gets(((r.image_id, r) for r in rows if checkable(r)), self._judged)
        self._flush()

    def _judged(self, row: Believed, held: int | None) -> None:
        self.found.checked += 1
        drift = judge(row, held)
        if drift is not None:
            self._note(drift, (row.state, row.version))
        elif held is not None and row.features_count is None and row.state == State.SYNCED:
            self._to_fill.append((row.image_id, row.version, held))
            if len(self._to_fill) >= FILL_BATCH:
                self._flush()

    def _flush(self) -> None:
        batch, self._to_fill = self._to_fill, []
        if batch and self.fill is not None:
            self.found.filled += self.fill(batch)

    # -- IDs the context holds ------------------------------------------------------------

    def listing(self, lookup: Lookup, after: str = "", until: str | None = None) -> None:
        """Ask the context for the IDs it holds after `after` (up to `until`), a page at
        a time, and judge each against the ledger; each drift is GET again to confirm."""
        page_of = getattr(self.context, "image_id_page", None)
        if not callable(page_of):
            self.found.listed = False
            return
        for page in self._pages(page_of, after, until):
            rows = lookup(page)
            candidates = []
            for image_id in page:
                if image_id in self._seen:  # judged already by its row's GET
                    continue
                row = rows.get(image_id)
                drift = judge_listed(image_id, row)
                if drift is not None:
                    seen = None if row is None else (row.state, row.version)
                    candidates.append((image_id, (drift, seen)))
            self._gets(candidates, self._listed)
            if self.found.stopped:
                return

    def _pages(self, page_of: PageOf, after: str, until: str | None) -> Iterator[list[str]]:
        listed = listing.pages(page_of, after, until, self.prefix, self._should_stop)
        try:
            for page in listed:
                self.found.listed = True
                yield page
            if self.found.listed is None and not self.found.stopped:
                self.found.listed = True  # an empty listing is a listing
        except listing.CannotList:
            self.found.listed = False

    def _listed(self, what: tuple[Drift, tuple[str, int] | None], held: int | None) -> None:
        drift, seen = what
        if held is not None:  # still held: the drift stands
            self._note(drift, seen)

    def _note(self, drift: Drift, seen: tuple[str, int] | None) -> None:
        if drift.image_id not in self._seen:
            self._seen[drift.image_id] = seen
            self.found.drifts.append(drift)

    # -- the end ---------------------------------------------------------------------------

    def confirm(self, lookup: Lookup) -> Findings:
        """Leave out the drifts whose ledger rows changed since they were judged (a
        daemon synced them meanwhile): no evidence either way. The findings, sorted."""
        f = self.found
        now = lookup([d.image_id for d in f.drifts]) if f.drifts else {}

        def same(d: Drift) -> bool:
            row = now.get(d.image_id)
            was = self._seen[d.image_id]
            return (row.state, row.version) == was if row is not None else was is None

        f.drifts = sorted((d for d in f.drifts if same(d)), key=lambda d: (d.image_id, d.kind))
        f.unverified.sort()
        return f

    # -- the pool ---------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        if self.found.stopped is None and self.stop():
            self.found.stopped = "stop requested"
        return self.found.stopped is not None

    def _gets(self, items: Iterable[tuple[str, T]], then: Callable[[T, int | None], None]) -> None:
        """GET each (image ID, payload) with the pool, at most 2 x concurrency at once
        (memory stays bounded over any number), and hand each answer to `then` on this
        thread. Answers come back through a queue, O(1) each (`concurrent.futures.wait`
        over the calls in flight costs O(in flight) per answer: 3% of the rate at 16).
        A Fatal answer is raised once the calls in flight are done."""
        todo = iter(items)
        answers: queue.SimpleQueue[tuple[str, T, Future[int | None]]] = queue.SimpleQueue()
        in_flight = 0
        fatal: Fatal | None = None
        ctx = self.context
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="featsync-verify") as pool:
            while True:
                while in_flight < 2 * self.concurrency and fatal is None:
                    if self._should_stop() or (item := next(todo, _END)) is _END:
                        break
                    image_id, payload = item
                    fut = pool.submit(held_count, ctx, image_id)
                    fut.add_done_callback(_post(answers, image_id, payload))
                    in_flight += 1
                if not in_flight:
                    break
                try:
                    # with a timeout: a stop is seen even while every call hangs
                    image_id, payload, fut = answers.get(timeout=0.5)
                except queue.Empty:
                    continue
                in_flight -= 1
                try:
                    held = fut.result()
                except Fatal as exc:
                    fatal = fatal or exc
                    continue
                except Exception as exc:  # transient, refused, a bug: this image's alone
                    self._unverified(image_id, exc)
                    continue
                self._transient_run = 0
                self.progress()
                then(payload, held)
        if fatal is not None:
            raise fatal
        if self.found.stopped:
            self.found.not_checked += sum(1 for _ in todo)

    def _unverified(self, image_id: str, exc: Exception) -> None:
        self.progress()
        error = str(exc) if isinstance(exc, Transient | ItemRejected) else repr(exc)
        self.found.unverified.append((image_id, error))
        if isinstance(exc, Transient):
            self._transient_run += 1
            if self._transient_run >= BREAKER and self.found.stopped is None:
                self.found.stopped = f"the search context failed {BREAKER} times in a row: {exc}"
        else:
            self._transient_run = 0


def _post(
    answers: queue.SimpleQueue[tuple[str, T, Future[int | None]]], image_id: str, payload: T
) -> Callable[[Future[int | None]], None]:
    """A call's done-callback: its answer into the queue (on the worker's thread)."""
    return lambda fut: answers.put((image_id, payload, fut))


def describe(f: Findings) -> dict[str, Any]:
    """The findings as JSON."""
    return {
        "checked": f.checked,
        "drifts": [d.as_json() for d in f.drifts],
        "by_kind": f.by_kind(),
        "unverified": [{"image_id": i, "error": e} for i, e in f.unverified],
        "filled": f.filled,
        "orphans_looked_for": f.listed,
        "stopped": f.stopped,
        "not_checked": f.not_checked,
    }


class DriftKept:
    """Drift found by a daemon's reviews and not yet mended, for the heartbeat: image ID
    -> (kind, its ledger row's (state, version) when found; None: no row). An ID goes
    when a cycle records it (synced or deleted at another version) or a later review of
    its range finds it clean. `counts` is by kind ({}: none; None: no review finished
    yet), a new dict each time (another thread reads it)."""

    def __init__(self) -> None:
        self.drifted: dict[str, tuple[str, tuple[str, int] | None]] = {}
        self.counts: dict[str, int] | None = None

    def reviewed(self, start: str, end: str | None, f: Findings, lookup: Lookup) -> None:
        """A finished review of (start, end]: the drift it found joins; a drifted ID in
        its range that it found clean goes."""

        def in_range(image_id: str) -> bool:
            return image_id > start and (end is None or image_id <= end)

        found = {d.image_id: d.kind for d in f.drifts}
        unverified = {i for i, _error in f.unverified}
        again = [i for i in self.drifted if in_range(i) and i not in found and i not in unverified]
        rows = lookup([*found, *again])
        for image_id in again:
            row = rows.get(image_id)
            if row is not None and checkable(row):
                del self.drifted[image_id]  # its GET found it as the ledger says
            elif (row is None or not row.remote) and f.listed:
                del self.drifted[image_id]  # the listing found it not held
            # else in flux (a mark, a failed send): no evidence either way
        for image_id, kind in found.items():
            row = rows.get(image_id)
            self.drifted[image_id] = (kind, None if row is None else (row.state, row.version))
        self._count()

    def drop_mended(self, lookup: Lookup) -> None:
        """After a cycle that changed the context: a drifted ID whose row that cycle
        recorded (synced or deleted, another version than when found) is mended. Raises
        what `lookup` raises (the drift is then kept as it is)."""
        if not self.drifted:
            return
        rows = lookup(list(self.drifted))
        for image_id, (_kind, seen) in list(self.drifted.items()):
            row = rows.get(image_id)
            if row is None or not checkable(row):
                continue
            if seen is None or (row.state, row.version) != seen:
                del self.drifted[image_id]
        self._count()

    def _count(self) -> None:
        self.counts = dict(Counter(kind for kind, _seen in self.drifted.values()))
