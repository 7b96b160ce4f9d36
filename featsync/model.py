"""Values that travel between the pieces, and the ports the adapters implement.

Per-image values (``LocalFile``, ``LedgerRow``, ``Action``) are NamedTuples rather
than frozen dataclasses: a rescan builds one per image, and at 100,000 images a
frozen dataclass's ``object.__setattr__``-per-field constructor costs several times
more than a tuple. They are just as immutable. Values made once per cycle are frozen
slotted dataclasses.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol


class Secret:
    """A credential that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


class State(enum.StrEnum):
    """Where an image ID stands in the ledger."""

    SYNCED = "synced"  # the context holds features of the file's current content
    FAILED = "failed"  # the last attempt failed; see last_error and next_attempt_at
    DELETED = "deleted"  # the file is gone and the context no longer holds its features


class Kind(enum.StrEnum):
    """What an action does to the search context."""

    ADD = "add"
    UPDATE = "update"
    DELETE = "delete"
    FORGET = "forget"  # drop ledger knowledge of an image the context never held


class LocalFile(NamedTuple):
    """One image file as the scanner saw it."""

    image_id: str
    relpath: str  # relative to the root, as the OS names it (may be NFD; the ID is NFC)
    size: int
    mtime_ns: int  # 0 when the file was modified too recently to trust (see scan)
    inode: int
    digest: str  # SHA-256 of the content, hex
    device: int = 0  # st_dev as the scan saw it (0: not known)


# (image ID, size, mtime_ns, inode) of a synced image: a file whose stat gives the same
# key is unchanged and is not read (the stat quick check). The mtime is None when it
# was recorded as 0 (too fresh to trust): no stat equals such a key.
QuickKey = tuple[str, int, int | None, int]


class LedgerRow(NamedTuple):
    """What the ledger remembers of one image ID (the columns the planner needs)."""

    image_id: str
    size: int
    mtime_ns: int
    inode: int
    digest: str
    version: int
    state: str
    remote: bool  # the context acknowledged holding features for this ID
    attempts: int
    next_attempt_at: float | None
    failed_action: str | None = None  # the kind of the action that failed last
    withheld_at: float | None = None  # its delete is withheld (persisted) since then


class Action(NamedTuple):
    """One change to make: the file for add/update, the ledger version it starts from."""

    kind: Kind
    image_id: str
    file: LocalFile | None
    version: int
    attempts: int = 0  # failed tries so far (sets the wait after another failure)
    held: bool = False  # the context holds (or may hold) this image before the action


class RootState(enum.StrEnum):
    OK = "ok"
    MISSING = "missing"
    NOT_A_DIRECTORY = "not_a_directory"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The folder as one scan saw it."""

    root: str
    root_state: RootState
    device: int | None
    marker_present: bool
    files: Mapping[str, LocalFile]  # files that were read (new, or their stat changed)
    unchanged: frozenset[str] = frozenset()  # IDs whose stat matched the ledger: not read
    # Files that exist but could not be judged this time: they are neither synced nor deleted.
    unsettled: frozenset[str] = frozenset()  # changed while being read
    unreadable: Mapping[str, str] = field(default_factory=dict)  # image ID -> reason
    unreadable_paths: Mapping[str, str] = field(default_factory=dict)  # image ID -> relpath
    problems: tuple[str, ...] = ()  # what made the scan incomplete

    @property
    def complete(self) -> bool:
        return self.root_state is RootState.OK and not self.problems


@dataclass(frozen=True, slots=True)
class Policy:
    """The rules a cycle follows, and the one piece of remembered state it checks."""

    max_delete_count: int = 10_000
    max_delete_fraction: float = 0.5
    marker: str = ""
    expected_device: int | None = None  # the root's st_dev recorded in the ledger
    confirm_deletes: bool = False  # an operator confirmed deletes over the limits
    # How many images the context holds, for the fraction limit of a targeted cycle
    # (whose rows are only those of the changed paths); None: count the plan's rows.
    held: int | None = None
    # The rolling window of the delete guard: deletes sent lately (and not confirmed),
    # and files a daemon already saw go that later cycles will judge.
    recent_deletes: int = 0
    recent_adds: int = 0
    pending_gone: int = 0
    retry_base_s: float = 30.0
    retry_factor: float = 5.0
    retry_cap_s: float = 24 * 3600.0
    # What apply checks of each image it sends:
    max_file_size: int = 256 * 1024 * 1024  # bytes; a bigger file is rejected, never read
    min_features: int = 10  # fewer: synced, but logged as weak (hardly ever found)
    follow_symlinks: bool = False  # opened with O_NOFOLLOW unless true


@dataclass(frozen=True, slots=True)
class Plan:
    """What one cycle will do, and what it holds back and why."""

    actions: tuple[Action, ...] = ()  # adds and updates first, then deletes
    forget: tuple[str, ...] = ()
    restat: tuple[LocalFile, ...] = ()  # content unchanged, stat changed: refresh the ledger
    withheld: tuple[Action, ...] = ()
    withheld_reason: str | None = None
    unchanged: int = 0
    waiting: tuple[str, ...] = ()  # failed images whose next try is not due yet
    unreadable: tuple[tuple[str, str], ...] = ()
    unreadable_paths: tuple[tuple[str, str], ...] = ()  # image ID -> path on disk
    unsettled: tuple[str, ...] = ()
    doubtful: bool = False  # the folder is no evidence: deletes withheld for that alone
    held: int = 0  # images the context held before this cycle

    def count(self, kind: Kind) -> int:
        return sum(1 for a in self.actions if a.kind is kind)

    @property
    def empty(self) -> bool:
        return not (self.actions or self.forget or self.restat or self.unreadable)


class Outcome(NamedTuple):
    """The result of one action, as apply records it."""

    action: Action
    done: Kind | None  # what actually happened (an add may become an update); None = failed
    digest: str | None
    size: int
    mtime_ns: int
    inode: int
    features_count: int | None
    error: str | None
    error_kind: str | None  # "rejected" | "transient" | "backup" | "fatal" | ...
    duration_ms: float
    # A failed add that reached the context without a clear "no": it may hold the
    # features now (the answer was lost, the call timed out, the server erred after).
    reached: bool = False
    backup: str | None = None  # the features backup before it: "kept", "skipped: why", ...


@dataclass(frozen=True, slots=True)
class OpenImage:
    """An image file that apply opened and checked against the scan (regular file, the
    same inode and size): read it from `fd` (never by its path again), `size` bytes,
    from the start (pread, or seek to 0 first: apply hashed it before). The opener
    closes it."""

    fd: int
    size: int
    name: str  # the image ID, for messages


# What an add or update sends: encoded image bytes, or a file opened by apply.
ImageData = bytes | OpenImage


@dataclass(frozen=True, slots=True)
class ImageFeatures:
    """A features record in the shape Aspose's GET .../features answers."""

    image_id: str
    features_count: int
    feature_length_in_bits: int
    features: bytes

    def as_json(self) -> dict[str, object]:
        return {
            "imageId": self.image_id,
            "featuresCount": self.features_count,
            "featureLengthInBits": self.feature_length_in_bits,
            "features": base64.b64encode(self.features).decode("ascii"),
        }


@dataclass(frozen=True, slots=True)
class SearchResult:
    image_id: str
    similarity: float  # percent, 0-100

    def as_json(self) -> dict[str, object]:
        return {"imageId": self.image_id, "similarity": self.similarity}


class SearchContext(Protocol):
    """A search context: the embedded one, or Aspose's over HTTP.

    Errors: ``AlreadyExists`` / ``NotFound`` for surprises the caller can act on,
    ``ItemRejected`` for an image the context will not take, ``Transient`` and
    ``Fatal`` as their names say.
    """

    def add_features(self, image_id: str, image: ImageData) -> int | None:
        """Extract and store features; returns the features count when known."""

    def update_features(self, image_id: str, image: ImageData) -> int | None:
        """Replace the stored features of an existing image ID."""

    def delete_features(self, image_id: str) -> None: ...

    def get_features(self, image_id: str) -> ImageFeatures: ...

    def find_similar(
        self,
        *,
        image: bytes | None = None,
        image_id: str | None = None,
        threshold: float,
        max_count: int,
    ) -> list[SearchResult]: ...

    def find_duplicates(self, threshold: float) -> list[list[SearchResult]]: ...

    def identity(self) -> str:
        """Which context this is, as a ledger records it: a new or replaced one differs."""

    def close(self) -> None: ...


class Ledger(Protocol):
    """The store of what the context has acknowledged, image by image."""

    def load(self) -> dict[str, LedgerRow]: ...

    def quick_keys(self, write_cache: bool = True) -> set[QuickKey]: ...

    def rows_for(self, image_ids: Iterable[str]) -> dict[str, LedgerRow]: ...

    def device(self) -> int | None: ...

    def set_device(self, device: int) -> None: ...

    def record(self, outcome: Outcome, now: float, next_attempt_at: float | None) -> None: ...

    def record_intents(
        self, adds: Sequence[tuple[str, str]], now: float
    ) -> dict[str, dict[str, Any] | None]: ...

    def undo_intent(self, image_id: str, before: dict[str, Any] | None) -> None: ...

    def record_restat(self, files: Sequence[LocalFile], now: float) -> None: ...

    def record_unreadable(
        self,
        problems: Sequence[tuple[str, str]],
        now: float,
        wait: Callable[[int], float] = ...,
        paths: dict[str, str] | None = None,
    ) -> None: ...

    def forget(self, image_ids: Sequence[str], now: float) -> None: ...

    def version_digests(self, keys: Sequence[tuple[str, int]]) -> dict[str, str]: ...


class CycleLedger(Ledger, Protocol):
    """What a whole cycle needs of the ledger (featsync.engine): apply's port, plus the
    scoped reads, the delete guard's memory, the cycles table and the binding to a
    context. SqlLedger implements it; the engine depends on nothing else of it."""

    def rows_in_scope(
        self, image_ids: Iterable[str], prefixes: Iterable[str]
    ) -> dict[str, LedgerRow]: ...

    def held_count(self) -> int: ...

    def recent_changes(self, since: float) -> tuple[int, int]: ...

    def withhold(self, image_ids: Sequence[str], now: float) -> None: ...

    def withheld_ids(self) -> list[str]: ...

    def release_withheld(self, image_ids: Sequence[str]) -> None: ...

    def confirm_deletes(self, now: float) -> None: ...

    def record_cycle(self, **fields: Any) -> None: ...

    def context_identity(self) -> str | None: ...

    def bind_context(self, identity: str) -> None: ...

    def resync(self, identity: str, now: float) -> int: ...

    def adopt(self, held: Iterable[str], now: float) -> int: ...

    def gone_before(self, image_ids: Sequence[str], cutoff: float) -> set[str]: ...

    def current_digests(self) -> set[str]: ...
