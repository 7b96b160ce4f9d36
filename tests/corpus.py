"""A corpus of bad and odd image files, generated (none is checked in).

Each entry says what a user must see: the image synced, synced but weak (too few
features to be found), rejected with a reason that matches a pattern, or skipped (not
a regular file: never read, never in the ledger). Real image folders are full of
these: tracking pixels, spacer GIFs, 16-bit scans, half-copied files.
"""

from __future__ import annotations

import io
import os
import socket
import stat
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from featsync.samples import encode, textured_bytes, textured_image

# The workspace config the corpus expects (small limits, so big files stay cheap).
MAX_FILE_SIZE = 3_000_000
MAX_PIXELS = 20_000_000


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # "synced" | "weak" | "rejected" | "skipped"
    reason: str = ""  # a regex the rejection's reason matches


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def header_only_bomb() -> bytes:
    """A PNG that claims 100000 x 100000 pixels and holds almost nothing."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def real_bomb() -> bytes:
    """A real PNG of 16000 x 16000 black pixels (256 megapixels, past the default limit
    of 250 and the corpus's 20): a 31 kB file that would take 256 MB to decode."""
    return encode(Image.new("1", (16000, 16000)), "PNG", optimize=True)


def bad_crc_png() -> bytes:
    data = bytearray(textured_bytes(5, "PNG"))
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


def sixteen_bit_png() -> bytes:
    grey = np.asarray(textured_image(21).convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")


def twelve_bit_in_sixteen_tiff() -> bytes:
    """A scan that uses 0..4095 of 16 bits (a 12-bit sensor): dark unless stretched."""
    grey = np.asarray(textured_image(22).convert("L"), dtype=np.uint16) * 16
    return encode(Image.fromarray(grey), "TIFF")


def float_tiff() -> bytes:
    grey = np.asarray(textured_image(23).convert("L"), dtype=np.float32) / 255.0
    return encode(Image.fromarray(grey, mode="F"), "TIFF")


def palette_with_transparency() -> bytes:
    img = textured_image(24).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return encode(img, "PNG", transparency=0)


def rgba_png() -> bytes:
    img = textured_image(25).convert("RGBA")
    img.putalpha(200)
    return encode(img, "PNG")


def la_png() -> bytes:
    return encode(textured_image(26).convert("LA"), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(textured_image(27).convert("CMYK"), "JPEG")


def animated_gif() -> bytes:
    frames = [textured_image(28 + n) for n in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def multipage_tiff() -> bytes:
    frames = [textured_image(31 + n) for n in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(textured_image(34).transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)


def oversized() -> bytes:
    """A valid JPEG padded past MAX_FILE_SIZE (bytes after EOI are ignored by decoders)."""
    return textured_bytes(35) + b"\0" * MAX_FILE_SIZE


def tiny(size: tuple[int, int]) -> bytes:
    return encode(Image.new("L", size, 128), "PNG")


def flat() -> bytes:
    return encode(Image.new("RGB", (320, 240), (90, 120, 150)), "PNG")


CASES: dict[str, tuple[Case, bytes | None]] = {}


def _add(name: str, expect: str, data: bytes | None, reason: str = "") -> None:
    CASES[name] = (Case(name, expect, reason), data)


def build_cases() -> dict[str, tuple[Case, bytes | None]]:
    if CASES:
        return CASES
    good = textured_bytes(40)
    _add("good/one.jpg", "synced", textured_bytes(41))
    _add("good/two.png", "synced", textured_bytes(42, "PNG"))
    _add("good/three.jpg", "synced", textured_bytes(43))
    _add("bad/truncated.jpg", "rejected", good[: len(good) // 3], "corrupt|truncated")
    _add("bad/zero-byte.jpg", "rejected", b"", "empty file")
    _add("bad/text-as.jpg", "rejected", b"this is a note, not a photo\n" * 20, "not an image")
    _add("bad/bad-crc.png", "rejected", bad_crc_png(), "corrupt|broken|crc|not an image")
    _add("bad/bomb-header-only.png", "rejected", header_only_bomb(), "too many pixels")
    _add("bad/bomb-real.png", "rejected", real_bomb(), "too many pixels")
    _add("bad/pixel-1x1.gif", "rejected", tiny((1, 1)), "too small to describe: 1x1")
    _add("bad/row-500x1.png", "rejected", tiny((500, 1)), "too small to describe: 500x1")
    _add("bad/column-1x500.png", "rejected", tiny((1, 500)), "too small to describe: 1x500")
    _add("bad/strip-500x2.png", "rejected", tiny((500, 2)), "too small to describe: 500x2")
    _add("bad/oversized.jpg", "rejected", oversized(), "max_file_size")
    _add(
        "bad/strip-5000x16.png",
        "rejected",
        encode(textured_image(46, (5000, 16)), "PNG"),
        "too elongated to describe: 5000x16",
    )
    _add("odd/flat.png", "weak", flat())
    _add("odd/cmyk.jpg", "synced", cmyk_jpeg())
    _add("odd/sixteen-bit.png", "synced", sixteen_bit_png())
    _add("odd/twelve-bit.tif", "synced", twelve_bit_in_sixteen_tiff())
    _add("odd/float.tiff", "synced", float_tiff())
    _add("odd/palette-transparent.png", "synced", palette_with_transparency())
    _add("odd/rgba.png", "synced", rgba_png())
    _add("odd/la.png", "synced", la_png())
    _add("odd/animated.gif", "synced", animated_gif())
    _add("odd/multipage.tif", "synced", multipage_tiff())
    _add("odd/photo.webp", "synced", textured_bytes(44, "WEBP"))
    _add("odd/exif-rotated.jpg", "synced", exif_rotated())
    _add("odd/strip-4000x16.png", "weak", encode(textured_image(45, (4000, 16)), "PNG"))
    _add("special/fifo.jpg", "skipped", None)
    _add("special/socket.jpg", "skipped", None)
    _add("special/device.jpg", "skipped", None)
    return CASES


@contextmanager
def written(folder: Path) -> Iterator[dict[str, Case]]:
    """Write the corpus into `folder` (special files too); yield the cases by image ID."""
    cases = build_cases()
    sockets: list[socket.socket] = []
    try:
        for name, (_case, data) in cases.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if data is not None:
                path.write_bytes(data)
            elif name.endswith("fifo.jpg"):
                os.mkfifo(path)
            elif name.endswith("socket.jpg"):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(str(path))
                sockets.append(s)
            else:
                # /dev/null's numbers: a character device (root only; else a FIFO stands in)
                try:
                    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
                except PermissionError:
                    os.mkfifo(path)
        yield {name: case for name, (case, _) in cases.items()}
    finally:
        for s in sockets:
            s.close()


def config() -> dict[str, dict[str, object]]:
    return {
        "sync": {"folder": "images", "max_file_size": MAX_FILE_SIZE, "min_features": 10},
        "context": {"max_pixels": MAX_PIXELS},
    }
