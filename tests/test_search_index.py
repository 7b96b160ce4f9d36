"""The embedded context's search index: candidates from the index, scores exact.

Real AKAZE descriptors of generated images, a real store file, a real index file;
the exhaustive matcher (matching.rank, matching.duplicate_groups) is what the indexed
answers are held to.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from featsync.localcontext import LocalContext, matching
from featsync.localcontext.features import extract
from featsync.localcontext.index import DescriptorIndex
from featsync.samples import encode, textured_bytes, textured_image

N = 40  # stored images: enough for the index to have a vocabulary of its own


@cache
def stored(seed: int) -> np.ndarray:
    return extract(textured_bytes(seed, size=(400, 300)), f"seed {seed}")


@cache
def resized(seed: int) -> np.ndarray:
    img = textured_image(seed, (400, 300))
    return extract(encode(img.resize((280, 210)), quality=75), f"resized {seed}")


@cache
def cropped(seed: int) -> np.ndarray:
    img = textured_image(seed, (400, 300))
    return extract(encode(img.crop((40, 30, 360, 270)), quality=85), f"cropped {seed}")


def name(seed: int) -> str:
    return f"img{seed:03d}.jpg"


def fill(ctx: LocalContext, seeds: range = range(N)) -> dict[str, np.ndarray]:
    entries = {name(s): stored(s) for s in seeds}
    ctx.load_descriptors(entries.items())
    return entries


@pytest.fixture
def store(tmp_path: Path) -> str:
    return str(tmp_path / "ctx.search")


@pytest.fixture
def ctx(store: str) -> Iterator[LocalContext]:
    c = LocalContext(store)
    yield c
    c.close()


def answers(ctx: LocalContext, queries: list[np.ndarray]) -> list[list[tuple[str, float]]]:
    return [[(h.image_id, h.similarity) for h in ctx.similar(q, 0, 10)] for q in queries]


def test_the_fast_exact_matcher_gives_opencvs_scores() -> None:
    sets = [stored(1), stored(2), resized(1), cropped(1), stored(1)[:1], stored(2)[:2]]
    sets.append(np.zeros((0, 61), dtype=np.uint8))
    for a in sets:
        for b in sets:
            assert matching.similarity(a, b) == matching.reference_similarity(a, b)
    assert matching.similarity(stored(1), stored(1)) == 100.0
    assert (
        matching.similarity(stored(1), resized(1)) > 60 > matching.similarity(stored(1), stored(2))
    )


def test_copies_are_found_first_and_scored_as_the_exhaustive_matcher_scores(
    ctx: LocalContext,
) -> None:
    entries = fill(ctx)
    for seed in range(0, N, 3):
        for query in (resized(seed), cropped(seed)):
            for threshold in (60, 30):
                got = [(h.image_id, h.similarity) for h in ctx.similar(query, threshold, 10)]
                assert got == matching.rank(query, entries, threshold, 10)
            assert ctx.similar(query, 0, 1)[0].image_id == name(seed)
    info = ctx.index_info()
    assert info["images"] == N and info["lists"] > 1 and info["bytes"] > 0


def test_an_unrelated_image_matches_nothing_above_the_threshold(ctx: LocalContext) -> None:
    fill(ctx)
    for seed in range(1000, 1010):
        assert ctx.similar(stored(seed), 60, 10) == []
        top = ctx.similar(stored(seed), 0, 1)
        assert not top or top[0].similarity < 20


def test_an_updated_image_is_found_by_its_new_content_only(store: str) -> None:
    ctx = LocalContext(store)
    try:
        fill(ctx, range(12))
        assert ctx.find_similar(image_id=name(3), threshold=60, max_count=5)[0].image_id == name(3)
        # the index is loaded now: the update goes through the extractor and into it
        ctx.update_features(name(3), textured_bytes(500, size=(400, 300)))
        old = ctx.similar(resized(3), 30, 10)
        assert name(3) not in [h.image_id for h in old]
        new = ctx.similar(stored(500), 60, 10)
        assert [h.image_id for h in new][:1] == [name(3)] and new[0].similarity > 90
    finally:
        ctx.close()


def test_a_deleted_image_is_never_returned(ctx: LocalContext) -> None:
    fill(ctx)
    held = ctx.index_info()["entries"]
    assert ctx.similar(resized(5), 0, 10)[0].image_id == name(5)
    ctx.delete_features(name(5))
    assert name(5) not in [h.image_id for h in ctx.similar(resized(5), 0, 50)]
    assert ctx.index_info()["images"] == N - 1
    # deletes past an eighth of the entries purge them from the lists
    for seed in range(6, 6 + N // 4):
        ctx.delete_features(name(seed))
    info = ctx.index_info()
    assert info["entries"] < held - sum(len(stored(s)) for s in range(5, 6 + N // 8))
    survivors = {name(s): stored(s) for s in range(N) if s == 4 or s > 5 + N // 4}
    for seed in (4, N - 1):
        got = [(h.image_id, h.similarity) for h in ctx.similar(cropped(seed), 60, 10)]
        assert got == matching.rank(cropped(seed), survivors, 60, 10)


def test_a_restart_loads_the_index_and_gives_the_same_answers(store: str) -> None:
    queries = [resized(s) for s in range(0, N, 4)] + [stored(1001)]
    ctx = LocalContext(store)
    fill(ctx)
    before = answers(ctx, queries)
    ctx.close()
    assert os.path.exists(store + ".index")
    again = LocalContext(store)
    try:
        assert answers(again, queries) == before
        assert again.index_info()["source"] == "file"
    finally:
        again.close()


def test_changes_made_while_the_index_was_not_loaded_are_caught_up(store: str) -> None:
    ctx = LocalContext(store)
    fill(ctx, range(20))
    ctx.similar(stored(0), 60, 1)  # loaded
    ctx.close()  # and saved
    other = LocalContext(store)  # a sync: adds and deletes, never loads the index
    other.load_descriptors([(name(s), stored(s)) for s in range(20, 30)])
    other.delete_features(name(2))
    other.close()
    again = LocalContext(store)
    try:
        assert again.similar(resized(25), 60, 1)[0].image_id == name(25)
        assert name(2) not in [h.image_id for h in again.similar(resized(2), 0, 50)]
        assert again.index_info()["images"] == 29
    finally:
        again.close()


def test_another_processs_changes_are_seen_by_a_loaded_index(store: str) -> None:
    server, sync = LocalContext(store), LocalContext(store)  # two connections
    try:
        fill(server, range(15))
        assert server.similar(resized(3), 60, 1)[0].image_id == name(3)  # loaded
        sync.load_descriptors([(name(30), stored(30))])
        sync.delete_features(name(3))
        assert server.similar(resized(30), 60, 1)[0].image_id == name(30)
        assert name(3) not in [h.image_id for h in server.similar(resized(3), 0, 50)]
    finally:
        sync.close()
        server.close()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "another store's"])
def test_a_damaged_or_foreign_index_file_is_rebuilt_from_the_store(
    tmp_path: Path, store: str, damage: str
) -> None:
    queries = [cropped(s) for s in range(0, N, 5)]
    ctx = LocalContext(store)
    fill(ctx)
    before = answers(ctx, queries)
    ctx.close()
    index = store + ".index"
    if damage == "truncated":
        with open(index, "r+b") as fh:
            fh.truncate(os.path.getsize(index) // 2)
    elif damage == "garbage":
        Path(index).write_bytes(os.urandom(4096))
    else:
        foreign = str(tmp_path / "other.search")
        other = LocalContext(foreign)
        fill(other, range(100, 110))
        other.similar(stored(100), 0, 1)
        other.close()
        shutil.copyfile(foreign + ".index", index)
    again = LocalContext(store)
    try:
        with capture_logs() as logged:
            assert answers(again, queries) == before
        assert again.index_info()["source"] == "built"
    finally:
        again.close()
    [loaded] = [e for e in logged if e["event"] == "index_loaded"]
    why = "of another store" if damage == "another store's" else "damaged"
    assert loaded["source"] == "built" and why in loaded["why"], loaded
    assert DescriptorIndex.load(index, "not this store") == (
        None,
        "the index file is of another store",
    )


def test_duplicates_are_the_exhaustive_matchers_groups(ctx: LocalContext) -> None:
    entries = fill(ctx, range(24))
    for seed in (1, 7, 7, 12):  # a pair, a triple, a pair
        copy = extract(encode(textured_image(seed, (400, 300)), quality=90), "copy")
        copy_id = f"copy{len(entries)}-of-{seed}.jpg"
        ctx.load_descriptors([(copy_id, copy)])
        entries[copy_id] = copy
    got = [[(r.image_id, r.similarity) for r in g] for g in ctx.find_duplicates(90)]
    want = matching.duplicate_groups(entries, 90)
    assert got == want and len(want) == 3
    assert sorted(len(g) for g in got) == [2, 2, 3]


def test_the_vocabulary_is_rebuilt_in_the_background_as_the_collection_grows(
    ctx: LocalContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featsync.localcontext import index

    monkeypatch.setattr(index, "MIN_BUILT_FOR", 1)  # forty images grow it here
    fill(ctx, range(2))
    first = ctx.index_info()
    fill(ctx, range(2, N))  # twenty times the descriptors the index was built for
    assert ctx.wait_index_rebuilt(60)
    grown = ctx.index_info()
    assert grown["rebuilds"] >= 1 and grown["lists"] > first["lists"]
    assert grown["images"] == N
    entries = {name(s): stored(s) for s in range(N)}
    for seed in (0, 1, N - 1):
        got = [(h.image_id, h.similarity) for h in ctx.similar(resized(seed), 60, 10)]
        assert got == matching.rank(resized(seed), entries, 60, 10) and got[0][0] == name(seed)


def test_a_store_of_the_previous_schema_is_upgraded_and_searchable(store: str) -> None:
    db = sqlite3.connect(store)
    db.executescript(
        """
        CREATE TABLE features (image_id TEXT PRIMARY KEY, count INTEGER NOT NULL,
            descriptors BLOB NOT NULL, updated_at REAL NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE tags (name TEXT PRIMARY KEY, descriptors BLOB NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1'), ('store_id', 'old-store');
        """
    )
    for s in range(10):
        db.execute(
            "INSERT INTO features VALUES (?, ?, ?, 0)",
            (name(s), len(stored(s)), stored(s).tobytes()),
        )
    db.commit()
    db.close()
    looks = LocalContext(store, read_only=True)  # a look reads the old schema in place
    try:
        assert looks.similar(resized(4), 60, 1)[0].image_id == name(4)
    finally:
        looks.close()
    # its slots are row numbers that the upgrade renumbers: no index file of them
    assert not os.path.exists(store + ".index")
    ctx = LocalContext(store)
    try:
        assert ctx.identity().startswith("local store old-store")
        assert ctx.image_ids() == [name(s) for s in range(10)]
        assert ctx.similar(resized(4), 60, 1)[0].image_id == name(4)
        ctx.update_features(name(4), textured_bytes(600, size=(400, 300)))
        assert ctx.similar(stored(600), 60, 1)[0].image_id == name(4)
    finally:
        ctx.close()


def test_an_index_that_cannot_be_saved_is_logged_and_nothing_else_breaks(store: str) -> None:
    os.mkdir(store + ".index")  # where the file goes: a folder (as a full disk would fail)
    ctx = LocalContext(store)
    fill(ctx, range(10))
    assert ctx.similar(resized(2), 60, 1)[0].image_id == name(2)
    with capture_logs() as logs:
        ctx.close()  # saving fails: logged, not raised
    failed = [e for e in logs if e["event"] == "index_save_failed"]
    assert len(failed) == 1 and store + ".index" in failed[0]["file"]
    assert os.path.isdir(store + ".index") and os.listdir(store + ".index") == []
    again = LocalContext(store)
    try:
        assert again.similar(resized(2), 60, 1)[0].image_id == name(2)
        assert again.index_info()["source"] == "built"
    finally:
        again.close()


def test_a_look_saves_the_index_beside_the_store_and_leaves_the_store_alone(store: str) -> None:
    ctx = LocalContext(store)
    fill(ctx, range(10))
    ctx.close()  # never searched: no index was loaded, nothing saved
    assert not os.path.exists(store + ".index")
    before = Path(store).read_bytes()
    looks = LocalContext(store, read_only=True)  # `featsync search`, `report --probe`
    try:
        assert looks.similar(resized(2), 60, 1)[0].image_id == name(2)
    finally:
        looks.close()
    assert Path(store).read_bytes() == before
    again = LocalContext(store, read_only=True)  # the next look reads the file
    try:
        assert again.similar(resized(2), 60, 1)[0].image_id == name(2)
        assert again.index_info()["source"] == "file"
    finally:
        again.close()


def test_a_store_put_back_from_a_copy_is_not_confused_with_the_index_of_its_future(
    tmp_path: Path, store: str
) -> None:
    def same_size(seed: int) -> np.ndarray:  # as photos are: every one at the cap
        return stored(seed)[:100]

    ctx = LocalContext(store)
    ctx.load_descriptors((name(s), same_size(s)) for s in range(N))
    ctx.close()
    shutil.copyfile(store, tmp_path / "copy.search")  # the user's backup of the store
    ctx = LocalContext(store)
    ctx.load_descriptors([(name(s), same_size(s)) for s in range(100, 110)])
    assert ctx.similar(same_size(105), 60, 1)[0].image_id == name(105)
    ctx.close()  # the index file now holds the next slots as images 100-109
    shutil.copyfile(tmp_path / "copy.search", store)  # put back: the numbering goes on
    ctx = LocalContext(store)  # from where the copy stood, for other images
    try:
        ctx.load_descriptors([(name(s), same_size(s)) for s in range(200, 210)])
        entries = {name(s): same_size(s) for s in [*range(N), *range(200, 210)]}
        for seed in range(200, 210):
            got = [(h.image_id, h.similarity) for h in ctx.similar(same_size(seed), 30, 10)]
            assert got == matching.rank(same_size(seed), entries, 30, 10)
            assert got[0][0] == name(seed)
        # the index holds what the store holds, no row of the discarded future
        assert ctx.index_info()["descriptors"] == sum(len(d) for d in entries.values())
    finally:
        ctx.close()


def test_twenty_copies_of_one_image_are_one_group(ctx: LocalContext) -> None:
    entries = fill(ctx, range(20))
    copies = {f"copy{n:02d}.jpg": stored(3) for n in range(19)}
    ctx.load_descriptors(copies.items())
    entries.update(copies)
    got = [[(r.image_id, r.similarity) for r in g] for g in ctx.find_duplicates(90)]
    assert got == matching.duplicate_groups(entries, 90)
    assert [len(g) for g in got] == [20]
    top = ctx.similar(stored(3), 90, 50)
    assert sorted(h.image_id for h in top) == sorted([*copies, name(3)])


def test_a_near_copy_is_found_beside_many_exact_copies_of_its_original(ctx: LocalContext) -> None:
    entries = fill(ctx)
    copies = {f"copy{n}.jpg": stored(3) for n in range(6)}
    ctx.load_descriptors([*copies.items(), ("variant.jpg", resized(3))])
    entries.update(copies)
    entries["variant.jpg"] = resized(3)
    for query in (stored(3), cropped(3)):
        got = [(h.image_id, h.similarity) for h in ctx.similar(query, 50, 10)]
        assert got == matching.rank(query, entries, 50, 10)
    assert "variant.jpg" in [h.image_id for h in ctx.similar(stored(3), 50, 10)]
    # the filed copy deleted: another takes its place in the index
    for image_id in [name(3), *sorted(copies)[:5]]:
        ctx.delete_features(image_id)
    assert [h.image_id for h in ctx.similar(stored(3), 50, 2)] == ["copy5.jpg", "variant.jpg"]


def test_damage_anywhere_in_the_index_file_means_a_rebuild_never_an_error(store: str) -> None:
    queries = [cropped(s) for s in range(0, N, 7)]
    ctx = LocalContext(store)
    fill(ctx)
    before = answers(ctx, queries)
    ctx.close()
    index = store + ".index"
    good = Path(index).read_bytes()
    rng = np.random.default_rng(7)
    for offset in [*rng.integers(0, len(good), 10).tolist(), 100, len(good) - 20]:
        damaged = bytearray(good)
        damaged[offset] ^= 0x5A
        Path(index).write_bytes(bytes(damaged))
        again = LocalContext(store)
        try:
            assert answers(again, queries) == before, offset
            assert again.index_info()["source"] == "built", offset
        finally:
            again.close()
        assert Path(index).read_bytes() == good  # rebuilt and saved again


def test_a_fifo_or_a_killed_saves_leftover_beside_the_store_hangs_or_keeps_nothing(
    store: str,
) -> None:
    os.mkfifo(store + ".index")
    Path(store + ".index.tmp-999999999").write_bytes(b"half a save")
    ctx = LocalContext(store)
    try:
        fill(ctx, range(10))
        assert ctx.similar(resized(2), 60, 1)[0].image_id == name(2)  # no wait on the FIFO
    finally:
        ctx.close()
    assert not os.path.exists(store + ".index.tmp-999999999")


def test_searches_score_only_the_indexs_candidates(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featsync.localcontext import searches

    many = 120
    ctx = LocalContext(store)
    try:
        entries = fill(ctx, range(many))
        want = matching.rank(resized(7), entries, 60, 10)
        scored: list[int] = []
        real = matching.similarity

        def counting(a: np.ndarray, b: np.ndarray) -> float:
            scored.append(1)
            return real(a, b)

        monkeypatch.setattr(matching, "similarity", counting)
        got = [(h.image_id, h.similarity) for h in ctx.similar(resized(7), 60, 10)]
        assert got == want and got[0][0] == name(7)
        assert 0 < len(scored) <= searches.CANDIDATES < many
        scored.clear()
        ctx.find_duplicates(90)
        assert 0 < len(scored) <= many * searches.DUPLICATE_CANDIDATES // 2 < many * (many - 1) // 2
    finally:
        ctx.close()


def test_a_first_search_building_the_index_never_holds_up_an_add(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from featsync.localcontext import searchindex

    ctx = LocalContext(store)
    try:
        fill(ctx, range(20))
        building, go = threading.Event(), threading.Event()
        real_build = searchindex.build

        def slow_build(*args: object, **kw: object) -> object:
            building.set()
            assert go.wait(60)
            return real_build(*args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(searchindex, "build", slow_build)
        found: list[object] = []
        first = threading.Thread(target=lambda: found.extend(ctx.similar(resized(30), 60, 1)))
        first.start()
        assert building.wait(30)
        added = threading.Thread(target=lambda: ctx.load_descriptors([(name(30), stored(30))]))
        added.start()
        added.join(30)
        assert not added.is_alive()  # the add went on while the index was being built
        go.set()
        first.join(60)
        assert [h.image_id for h in found] == [name(30)]  # type: ignore[attr-defined]
        ctx.update_features(name(30), textured_bytes(31, size=(400, 300)))
        assert ctx.similar(stored(31), 60, 1)[0].image_id == name(30)
    finally:
        ctx.close()


def test_a_look_builds_an_outgrown_vocabulary_anew_and_keeps_it(
    store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featsync.localcontext import index

    monkeypatch.setattr(index, "MIN_BUILT_FOR", 1)
    ctx = LocalContext(store)
    fill(ctx, range(2))
    small = ctx.index_info()["lists"]
    ctx.close()  # the file: a vocabulary for two images
    grower = LocalContext(store)  # a sync: adds, never searches
    grower.load_descriptors((name(s), stored(s)) for s in range(2, N))
    grower.close()
    for _ in range(2):
        look = LocalContext(store, read_only=True)  # `featsync search`
        try:
            assert look.similar(resized(9), 60, 1)[0].image_id == name(9)
            info = look.index_info()
            assert info["lists"] > small and info["state"] == "ready"
        finally:
            look.close()
    assert info["source"] == "file"  # the second look read what the first saved
