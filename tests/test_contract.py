"""The SearchContext port's contract, run over both of its implementations:

- ``local``: the embedded context, in process;
- ``http``: the Aspose client against `featsync serve` (a real subprocess on loopback).

Whatever passes here can sit behind the engine.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from featsync.errors import AlreadyExists, ItemRejected, NotFound
from featsync.localcontext import LocalContext
from featsync.model import OpenImage, SearchContext
from featsync.samples import encode, textured_bytes, textured_image
from tests.conftest import Server, new_context

ODD_IDS = [
    "dir/sub dir/a #1?&=+%20.jpg",
    "quotes \"double\" and 'single'.png",
    unicodedata.normalize("NFC", "café/日本語.jpg"),
    "x" * 200 + ".jpg",
    "deep/" * 12 + "leaf.jpg",
]


@pytest.fixture(params=["local", "http"])
def context(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SearchContext]:
    ctx: SearchContext
    if request.param == "local":
        ctx = LocalContext(str(tmp_path / "ctx.db"))
    else:
        srv: Server = request.getfixturevalue("server")
        ctx = new_context(srv)
    yield ctx
    ctx.close()


def test_added_features_come_back_in_the_aspose_shape(context: SearchContext) -> None:
    context.add_features("a.jpg", textured_bytes(1))
    got = context.get_features("a.jpg")
    assert got.image_id == "a.jpg" and got.features_count > 20
    assert got.feature_length_in_bits == 488
    assert len(got.features) == got.features_count * 61


def test_update_replaces_and_delete_removes(context: SearchContext) -> None:
    context.add_features("a.jpg", textured_bytes(1, size=(320, 240)))
    before = context.get_features("a.jpg")
    context.update_features("a.jpg", textured_bytes(2, size=(640, 480)))
    after = context.get_features("a.jpg")
    assert after.features != before.features
    context.delete_features("a.jpg")
    with pytest.raises(NotFound):
        context.get_features("a.jpg")


def test_surprises_are_named_so_the_caller_can_act(context: SearchContext) -> None:
    context.add_features("a.jpg", textured_bytes(1))
    with pytest.raises(AlreadyExists):
        context.add_features("a.jpg", textured_bytes(1))
    with pytest.raises(NotFound):
        context.update_features("missing.jpg", textured_bytes(1))
    with pytest.raises(NotFound):
        context.delete_features("missing.jpg")
    with pytest.raises(NotFound):
        context.get_features("missing.jpg")


@pytest.mark.parametrize(
    ("data", "why"),
    [(b"", "empty file"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image"), (b"hello", "image")],
)
def test_a_bad_image_is_rejected_with_its_name_and_reason(
    context: SearchContext, data: bytes, why: str
) -> None:
    with pytest.raises(ItemRejected) as caught:
        context.add_features("bad one.jpg", data)
    assert "bad one.jpg" in str(caught.value) and why in str(caught.value)
    with pytest.raises(NotFound):
        context.get_features("bad one.jpg")


def test_odd_image_ids_round_trip_exactly(context: SearchContext) -> None:
    for n, image_id in enumerate(ODD_IDS):
        context.add_features(image_id, textured_bytes(n))
    for image_id in ODD_IDS:
        assert context.get_features(image_id).image_id == image_id
    found = context.find_similar(image_id=ODD_IDS[0], threshold=90, max_count=5)
    assert [r.image_id for r in found] == [ODD_IDS[0]]
    context.delete_features(ODD_IDS[2])
    with pytest.raises(NotFound):
        context.get_features(ODD_IDS[2])


def test_similar_images_are_found_and_unrelated_ones_are_not(context: SearchContext) -> None:
    original = textured_image(7, (640, 480))
    context.add_features("original.jpg", encode(original))
    context.add_features("other.jpg", textured_bytes(8, size=(640, 480)))
    small = encode(original.resize((480, 360)), "PNG")
    found = context.find_similar(image=small, threshold=30, max_count=10)
    assert [r.image_id for r in found] == ["original.jpg"]
    assert found[0].similarity >= 50
    by_id = context.find_similar(image_id="original.jpg", threshold=0, max_count=1)
    assert by_id[0].image_id == "original.jpg" and by_id[0].similarity == 100


def test_duplicates_are_grouped(context: SearchContext) -> None:
    original = textured_image(3, (640, 480))
    context.add_features("a.jpg", encode(original))
    context.add_features("a-copy.jpg", encode(original, "JPEG", quality=70))
    context.add_features("b.jpg", textured_bytes(4, size=(640, 480)))
    groups = context.find_duplicates(threshold=60)
    assert [sorted(r.image_id for r in g) for g in groups] == [["a-copy.jpg", "a.jpg"]]
    assert all(0 <= r.similarity <= 100 for r in groups[0])


def test_an_image_given_as_an_open_file_gives_the_features_of_its_bytes(
    context: SearchContext, tmp_path: Path
) -> None:
    """apply hands over an open descriptor (read with pread, the offset left alone):
    the embedded context's workers decode from it, the HTTP client streams it."""
    data = textured_bytes(5, "PNG", size=(480, 360))
    path = tmp_path / "five.png"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 7, os.SEEK_SET)  # wherever the offset is, the whole file is sent
        context.add_features("from-file.png", OpenImage(fd, len(data), "from-file.png"))
        context.update_features("from-file.png", OpenImage(fd, len(data), "from-file.png"))
    finally:
        os.close(fd)
    context.add_features("from-bytes.png", data)
    a, b = context.get_features("from-file.png"), context.get_features("from-bytes.png")
    assert a.features_count == b.features_count > 20 and a.features == b.features
