"""The embedded search context: real AKAZE features, matching, its store."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from featsync.errors import AlreadyExists, Fatal, ItemRejected, NotFound
from featsync.localcontext import LocalContext
from featsync.localcontext.features import (
    FEATURE_LENGTH_BITS,
    MAX_KEYPOINTS,
    decode,
    extract,
)
from featsync.samples import encode, textured_bytes, textured_image


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[LocalContext]:
    c = LocalContext(str(tmp_path / "ctx.db"))
    yield c
    c.close()


def test_get_answers_in_the_aspose_shape(ctx: LocalContext) -> None:
    count = ctx.add_features("dir/a b.jpg", textured_bytes(1))
    got = ctx.get_features("dir/a b.jpg").as_json()
    assert set(got) == {"imageId", "featuresCount", "featureLengthInBits", "features"}
    assert got["imageId"] == "dir/a b.jpg" and got["featuresCount"] == count > 20
    assert got["featureLengthInBits"] == FEATURE_LENGTH_BITS == 488
    assert len(base64.b64decode(str(got["features"]))) == count * 61


def test_an_image_is_found_similar_to_itself_and_its_copies_not_to_others(
    ctx: LocalContext,
) -> None:
    original = textured_image(7)
    ctx.add_features("original.jpg", encode(original))
    for n in range(8):
        ctx.add_features(f"other{n}.jpg", textured_bytes(100 + n))
    resized = encode(original.resize((240, 180)), quality=70)
    reencoded = encode(original, "PNG")
    for query in (encode(original), resized, reencoded):
        hits = ctx.find_similar(image=query, threshold=30, max_count=5)
        assert [h.image_id for h in hits] == ["original.jpg"], hits
    assert ctx.find_similar(image=encode(original), threshold=0, max_count=1)[0].similarity > 90
    assert ctx.find_similar(image=resized, threshold=0, max_count=1)[0].similarity > 50
    by_id = ctx.find_similar(image_id="original.jpg", threshold=0, max_count=3)
    assert by_id[0].image_id == "original.jpg" and by_id[0].similarity == 100.0
    assert all(h.similarity < 15 for h in by_id[1:])


def test_find_duplicates_groups_copies_together(ctx: LocalContext) -> None:
    a, b = textured_image(1), textured_image(2)
    ctx.add_features("a.jpg", encode(a))
    ctx.add_features("a-small.jpg", encode(a.resize((200, 150))))
    ctx.add_features("b.png", encode(b, "PNG"))
    ctx.add_features("b.jpg", encode(b, quality=60))
    ctx.add_features("c.jpg", textured_bytes(3))
    groups = ctx.find_duplicates(threshold=40)
    assert sorted(sorted(r.image_id for r in g) for g in groups) == [
        ["a-small.jpg", "a.jpg"],
        ["b.jpg", "b.png"],
    ]


def test_add_update_delete_follow_the_aspose_surprises(ctx: LocalContext) -> None:
    ctx.add_features("x.jpg", textured_bytes(1))
    with pytest.raises(AlreadyExists):
        ctx.add_features("x.jpg", textured_bytes(1))
    with pytest.raises(NotFound):
        ctx.update_features("y.jpg", textured_bytes(2))
    before = ctx.get_features("x.jpg").features
    ctx.update_features("x.jpg", textured_bytes(2))
    assert ctx.get_features("x.jpg").features != before
    ctx.delete_features("x.jpg")
    with pytest.raises(NotFound, match=r"x\.jpg"):
        ctx.get_features("x.jpg")
    with pytest.raises(NotFound):
        ctx.delete_features("x.jpg")


def test_the_store_persists_across_opens(tmp_path: Path) -> None:
    path = str(tmp_path / "ctx.db")
    c = LocalContext(path)
    c.add_features("keep.jpg", textured_bytes(5))
    c.close()
    again = LocalContext(path)
    try:
        assert again.image_ids() == ["keep.jpg"]
        assert again.find_similar(image=textured_bytes(5), threshold=90, max_count=1)
    finally:
        again.close()


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty file"), (b"hello", "not an image"), (textured_bytes(1)[:300], "corrupt")],
)
def test_an_undecodable_image_is_rejected_naming_it_and_the_reason(
    ctx: LocalContext, data: bytes, reason: str
) -> None:
    with pytest.raises(ItemRejected, match=rf"'broken\.jpg'.*{reason}"):
        ctx.add_features("broken.jpg", data)
    assert ctx.image_ids() == []


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_every_supported_format_decodes(fmt: str) -> None:
    assert len(extract(textured_bytes(3, fmt), f"x.{fmt}")) > 20


def test_exif_orientation_is_applied() -> None:
    img = textured_image(4)  # 320 x 240
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the pixels are stored turned the other way
    stored = encode(img.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes())
    assert decode(stored, "tagged.jpg").shape == (240, 320)  # rows, columns: upright again
    assert decode(encode(img.transpose(Image.Transpose.ROTATE_90)), "plain.jpg").shape == (
        320,
        240,
    )


def test_a_large_photo_is_downscaled_and_keypoints_capped() -> None:
    big = textured_image(9, (1500, 1000)).resize((6000, 4000))  # 24 megapixels
    data = encode(big, quality=80)
    assert decode(data, "big.jpg").shape == (683, 1024)
    assert 100 < len(extract(data, "big.jpg")) <= MAX_KEYPOINTS


def test_a_real_144_megapixel_photo_is_within_the_default_pixel_limit() -> None:
    """Pillow's own default (89 megapixels, refused past twice that) turned away real
    camera photos; featsync's default of 250 admits them, decoded at 1/8 in JPEG draft."""
    img = Image.new("L", (14400, 10000), 128)
    img.paste(textured_image(8, (1440, 1000)).convert("L").resize((14400, 10000)))
    data = encode(img, quality=70)
    assert decode(data, "big.jpg").shape == (711, 1024)
    assert len(extract(data, "big.jpg")) > 20


def test_an_image_over_the_pixel_limit_is_rejected() -> None:
    with pytest.raises(ItemRejected, match=r"too many pixels \(the limit is 1,000\)"):
        extract(textured_bytes(1), "bomb.png", max_pixels=1000)


def test_a_newer_store_is_refused(tmp_path: Path) -> None:
    import sqlite3

    path = str(tmp_path / "ctx.db")
    LocalContext(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(Fatal, match="schema version 99"):
        LocalContext(path)
