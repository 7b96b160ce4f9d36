"""The planner, on plain values: the three piles, the delete guard, and its properties."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from featsync.model import Kind, LedgerRow, LocalFile, Policy, RootState, Snapshot, State
from featsync.plan import assume_applied, plan, retry_delay

NOW = 1_000_000.0


def f(image_id: str, digest: str = "h1", size: int = 10, mtime: int = 5) -> LocalFile:
    return LocalFile(image_id, image_id, size, mtime, 7, digest)


def row(
    image_id: str,
    digest: str = "h1",
    state: str = State.SYNCED,
    remote: bool = True,
    version: int = 1,
    attempts: int = 0,
    next_at: float | None = None,
) -> LedgerRow:
    return LedgerRow(image_id, 10, 5, 7, digest, version, state, remote, attempts, next_at)


def snap(
    *files: LocalFile,
    problems: tuple[str, ...] = (),
    device: int = 1,
    root_state: RootState = RootState.OK,
    marker: bool = True,
    unchanged: tuple[str, ...] = (),
) -> Snapshot:
    return Snapshot(
        "/r",
        root_state,
        device,
        marker,
        {x.image_id: x for x in files},
        unchanged=frozenset(unchanged),
        problems=problems,
    )


def kinds(p: object) -> list[tuple[str, str]]:
    return [(a.kind.value, a.image_id) for a in p.actions]  # type: ignore[attr-defined]


def rows_of(*rs: LedgerRow) -> dict[str, LedgerRow]:
    return {r.image_id: r for r in rs}


def test_new_changed_gone_files_become_add_update_delete() -> None:
    rows = rows_of(row("same"), row("changed"), row("gone"), row("a"), row("b"), row("c"))
    s = snap(f("changed", "h2"), f("new"), f("a"), unchanged=("same", "b", "c"))
    p = plan(s, rows, Policy(), NOW)
    assert kinds(p) == [("update", "changed"), ("add", "new"), ("delete", "gone")]
    assert p.unchanged == 4 and p.restat == ()  # "a" was read: same content, same stat


def test_rows_of_unchanged_images_may_be_left_out() -> None:
    rows = rows_of(row("same"), row("changed"), row("gone"), *(row(f"u{n}") for n in range(5)))
    s = snap(f("changed", "h2"), f("new"), unchanged=("same", *(f"u{n}" for n in range(5))))
    partial = {i: r for i, r in rows.items() if i not in s.unchanged}
    policy = Policy(max_delete_fraction=0.1)  # 1 of 8 held: over only if 8 were not counted
    assert plan(s, partial, policy, NOW) == plan(s, rows, policy, NOW)
    assert kinds(plan(s, partial, policy, NOW))[-1] == ("delete", "gone")


def test_touch_without_change_only_refreshes_the_stat() -> None:
    p = plan(snap(f("x", "h1", mtime=99)), rows_of(row("x")), Policy(), NOW)
    assert p.actions == () and p.unchanged == 1
    assert [x.mtime_ns for x in p.restat] == [99]


def test_failed_image_waits_until_due_or_changed() -> None:
    failed = row("x", state=State.FAILED, remote=False, version=0, attempts=2, next_at=NOW + 10)
    assert plan(snap(f("x")), rows_of(failed), Policy(), NOW).waiting == ("x",)
    assert kinds(plan(snap(f("x")), rows_of(failed), Policy(), NOW + 10)) == [("add", "x")]
    changed = plan(snap(f("x", "h2")), rows_of(failed), Policy(), NOW)
    # a changed file starts its escalating wait afresh
    assert kinds(changed) == [("add", "x")] and changed.actions[0].attempts == 0


def test_gone_image_the_context_never_held_is_forgotten_without_a_call() -> None:
    failed = row("x", state=State.FAILED, remote=False, version=0)
    p = plan(snap(f("y")), rows_of(failed), Policy(), NOW)
    assert p.forget == ("x",) and kinds(p) == [("add", "y")]


def test_deleted_row_coming_back_is_added_with_the_next_version() -> None:
    p = plan(
        snap(f("x")), rows_of(row("x", state=State.DELETED, remote=False, version=3)), Policy(), NOW
    )
    assert kinds(p) == [("add", "x")] and p.actions[0].version == 3


def test_moves_do_not_count_against_the_delete_limits() -> None:
    rows = rows_of(row("old", digest="hx"))
    p = plan(snap(f("new", "hx")), rows, Policy(max_delete_count=0), NOW)
    assert kinds(p) == [("add", "new"), ("delete", "old")] and not p.withheld


def test_count_limit_withholds_every_delete_before_any_is_sent() -> None:
    rows = rows_of(*(row(f"i{n}") for n in range(10)))
    s = snap(unchanged=tuple(f"i{n}" for n in range(7)))
    p = plan(s, rows, Policy(max_delete_count=2), NOW)
    assert p.actions == () and len(p.withheld) == 3
    assert "max_delete_count" in (p.withheld_reason or "")
    confirmed = plan(s, rows, Policy(max_delete_count=2, confirm_deletes=True), NOW)
    assert len(confirmed.actions) == 3 and not confirmed.withheld


def test_fraction_limit_counts_against_images_the_context_holds() -> None:
    rows = rows_of(*(row(f"i{n}") for n in range(4)))
    half = plan(snap(unchanged=("i0", "i1")), rows, Policy(max_delete_fraction=0.5), NOW)
    assert len(half.actions) == 2
    most = plan(snap(unchanged=("i0",)), rows, Policy(max_delete_fraction=0.5), NOW)
    assert most.actions == () and "max_delete_fraction" in (most.withheld_reason or "")


def test_a_targeted_cycle_measures_the_fraction_against_the_whole_context() -> None:
    # A targeted cycle plans over the rows of the changed paths only: one delete among
    # one row is 100% of what it sees, but 1% of what the context holds.
    one = rows_of(row("gone"))
    assert kinds(plan(snap(), one, Policy(max_delete_fraction=0.5, held=100), NOW)) == [
        ("delete", "gone")
    ]
    many = rows_of(*(row(f"i{n}") for n in range(60)))
    p = plan(snap(), many, Policy(max_delete_fraction=0.5, held=100), NOW)
    assert p.actions == () and "60 deletes of 100 images" in (p.withheld_reason or "")


def test_doubtful_snapshots_never_delete() -> None:
    rows = rows_of(row("x"), row("y", state=State.FAILED, remote=False))
    cases = {
        "missing": snap(root_state=RootState.MISSING),
        "not a directory": snap(root_state=RootState.NOT_A_DIRECTORY),
        "device": snap(device=2),
        "marker": snap(marker=False),
        "incomplete": snap(problems=("/r/sub: cannot list folder",)),
    }
    policy = Policy(expected_device=1, marker=".featsync-root", confirm_deletes=True)
    for why, s in cases.items():
        p = plan(s, rows, policy, NOW)
        assert p.actions == () and p.forget == (), why
        assert [a.image_id for a in p.withheld] == ["x"], why
        assert why.split()[0] in (p.withheld_reason or ""), why


def test_retry_delay_grows_and_is_capped() -> None:
    policy = Policy(retry_base_s=30, retry_factor=5, retry_cap_s=3600)
    assert [retry_delay(n, policy) for n in range(5)] == [0, 30, 150, 750, 3600]
    assert retry_delay(10_000, policy) == 3600


# -- properties ------------------------------------------------------------------------

ids = st.sampled_from([f"img{n}.jpg" for n in range(12)])
digests = st.sampled_from(["h1", "h2", "h3"])


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Snapshot, dict[str, LedgerRow]]:
    files = draw(st.dictionaries(ids, digests, max_size=10))
    rows: dict[str, LedgerRow] = {}
    for image_id in draw(st.lists(ids, unique=True, max_size=10)):
        state = draw(st.sampled_from(list(State)))
        remote = state == State.SYNCED or (state == State.FAILED and draw(st.booleans()))
        rows[image_id] = row(
            image_id,
            draw(digests),
            state,
            remote,
            draw(st.integers(0, 5)),
            draw(st.integers(0, 3)),
            draw(st.none() | st.just(NOW + 5)),
        )
    # A file whose synced row has its content may have passed the stat quick check
    # (the scanner then lists it as unchanged without reading it).
    quick = {
        i
        for i, d in files.items()
        if i in rows
        and rows[i].state == State.SYNCED
        and rows[i].digest == d
        and draw(st.booleans())
    }
    snapshot = snap(
        *(f(i, d) for i, d in files.items() if i not in quick),
        unchanged=tuple(quick),
        problems=draw(st.sampled_from([(), ("boom",)])),
    )
    return snapshot, rows


def present(snapshot: Snapshot, rows: dict[str, LedgerRow]) -> dict[str, str]:
    """What the folder holds: image ID -> content."""
    out = {i: x.digest for i, x in snapshot.files.items()}
    out.update({i: rows[i].digest for i in snapshot.unchanged})
    return out


def synced(rows: dict[str, LedgerRow]) -> dict[str, str]:
    return {i: r.digest for i, r in rows.items() if r.remote and r.state != State.DELETED}


@settings(max_examples=300)
@given(worlds())
def test_applying_a_plan_reproduces_the_snapshot_and_planning_again_is_empty(
    world: tuple[Snapshot, dict[str, LedgerRow]],
) -> None:
    snapshot, rows = world
    policy = Policy(max_delete_fraction=1.0)
    later = NOW + 10  # every wait is over
    p = plan(snapshot, rows, policy, later)
    after = assume_applied(rows, p, later)
    want = present(snapshot, rows)
    got = synced(after)
    if snapshot.complete:
        assert got == want
    else:  # nothing may be deleted; everything present is synced
        assert {i: got[i] for i in want} == want
        assert set(got) >= {i for i, d in synced(rows).items()}
    again = plan(snapshot, after, policy, later)
    assert again.actions == () and again.forget == ()


@given(worlds())
def test_an_incomplete_scan_never_plans_a_delete(
    world: tuple[Snapshot, dict[str, LedgerRow]],
) -> None:
    snapshot, rows = world
    incomplete = snap(
        *snapshot.files.values(),
        unchanged=tuple(snapshot.unchanged),
        problems=("unreadable folder",),
    )
    p = plan(incomplete, rows, Policy(max_delete_fraction=1.0, confirm_deletes=True), NOW)
    assert all(a.kind is not Kind.DELETE for a in p.actions)
    assert p.forget == ()


@given(worlds(), st.floats(0.0, 1.0), st.integers(0, 5))
def test_leaving_out_the_rows_of_unchanged_images_changes_nothing(
    world: tuple[Snapshot, dict[str, LedgerRow]], fraction: float, count: int
) -> None:
    snapshot, rows = world
    partial = {i: r for i, r in rows.items() if i not in snapshot.unchanged}
    policy = Policy(max_delete_fraction=fraction, max_delete_count=count)
    assert plan(snapshot, partial, policy, NOW) == plan(snapshot, rows, policy, NOW)


def test_rows_of_unknown_content_never_count_as_a_move() -> None:
    """A digest of "" means the content is not known (sent while it changed, never
    read): four such images gone and a fifth re-sent must not excuse the deletes."""
    gone = [row(f"gone{n}", digest="") for n in range(4)]
    rows = rows_of(*gone, row("kept", digest=""), *[row(f"k{n}") for n in range(20)])
    s = snap(f("kept", "h-now"), unchanged=tuple(f"k{n}" for n in range(20)))
    p = plan(s, rows, Policy(max_delete_count=2), NOW)
    assert kinds(p) == [("update", "kept")]
    assert len(p.withheld) == 4 and "max_delete_count" in (p.withheld_reason or "")
