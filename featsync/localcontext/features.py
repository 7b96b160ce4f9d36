"""Decode an image (Pillow) and extract AKAZE binary descriptors (OpenCV).

This is native code that a hostile or degenerate image can crash (a 500x1 image
corrupts the heap inside AKAZE) or keep busy: it runs in the extractor's worker
processes (featsync.localcontext.extractor), never in the syncing process.

Every image the decoder can read gets honest features: 16-bit and float images are
stretched to 8 bits (not clipped to white), transparency is laid on white, palette,
CMYK and the rest are converted, a multi-frame file gives its first frame. Images are
downscaled before extraction (at most ``MAX_SIDE``), so a 24-megapixel photo costs
about what a 1-megapixel one does; JPEGs are downscaled while decoding (``draft``),
which keeps memory bounded too. An image with a side under ``MIN_SIDE`` is refused
before OpenCV sees it. Keypoints are capped at the strongest ``MAX_KEYPOINTS``.
"""

from __future__ import annotations

import threading
import warnings
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from featsync.errors import ItemRejected

MAX_SIDE = 1024  # pixels, longest side after downscaling
MIN_SIDE = 16  # pixels: AKAZE needs room for its scale space (a 500x1 image crashes it)
MAX_ASPECT = 256  # long side : short side; a thinner strip is refused (memory, see decode)
DEFAULT_MAX_PIXELS = 250_000_000  # a 144-megapixel camera photo passes, a bomb does not
MAX_KEYPOINTS = 500  # the Aspose example shows ~500 per image
DESCRIPTOR_BYTES = 61  # full-size AKAZE M-LDB descriptor, 486 bits padded to bytes
FEATURE_LENGTH_BITS = DESCRIPTOR_BYTES * 8  # 488, as Aspose reports it

Descriptors = np.ndarray[Any, np.dtype[np.uint8]]
_WIDE = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_local = threading.local()


def _akaze() -> Any:
    # cv2 is imported here, not at module load: importing it costs more than a
    # no-change rescan. One detector per thread: OpenCV algorithm objects are not
    # documented as thread-safe.
    detector = getattr(_local, "akaze", None)
    if detector is None:
        import cv2

        cv2.setNumThreads(1)  # the worker processes are the parallelism
        detector = cv2.AKAZE_create()  # type: ignore[attr-defined]
        _local.akaze = detector
    return detector


def warm_up() -> None:
    """Import OpenCV and make this thread's detector (a worker does it before its first
    image, so that no image's time limit pays for it)."""
    _akaze()


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]} pixels"


def _to_grey(img: Image.Image) -> Image.Image:
    """Mode "L", whatever the mode: wide modes stretched, transparency on white.
    (Called on the downscaled image: its copies are small.)"""
    if img.mode in _WIDE:
        arr = np.asarray(img.convert("F") if img.mode.startswith("I;16") else img)
        arr = arr.astype(np.float32)
        finite = np.isfinite(arr)
        if not finite.all():
            arr = np.where(finite, arr, np.float32(0.0))
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(((arr - lo) * scale).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("L")
    return img.convert("L")


def _shrink(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Downscale in the image's own mode (before any full-size conversion): LANCZOS
    with a cheap reduce first; BOX for the modes reduce does not take (16-bit);
    palette and bilevel images are converted first (resizing them would be NEAREST)."""
    if img.mode in ("P", "PA", "1"):
        img = img.convert("RGBA" if img.mode != "1" else "L")
    try:
        return img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    except ValueError:
        pass
    try:
        return img.resize(target, Image.Resampling.BOX)
    except ValueError:  # Pillow before 11 resizes no 16-bit image: widen it first
        wide = img.convert("I") if img.mode.startswith("I;16") else _to_grey(img)
        return wide.resize(target, Image.Resampling.LANCZOS)


# EXIF orientation -> the transpose that shows the image upright (as ImageOps does)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def decode(
    source: bytes | IO[bytes],
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> Descriptors:
    """Decode to an 8-bit grey array, downscaled to at most MAX_SIDE (never below
    `min_side` on its short side), EXIF orientation applied."""
    import io

    fh = io.BytesIO(source) if isinstance(source, bytes) else source
    old_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette transparency notes, odd EXIF, ...
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max_pixels
            img: Image.Image = Image.open(fh)
            w, h = img.size
            if min(w, h) < min_side:
                raise ItemRejected(
                    f"image {name!r} is too small to describe: {_size_text(img.size)} "
                    f"(each side needs at least {min_side})"
                )
            if max(w, h) > MAX_ASPECT * min(w, h):
                # Downscaled, its short side would be under min_side, or its long side
                # too long for AKAZE's memory (a 3,000,000 x 16 strip takes 4.7 GB).
                raise ItemRejected(
                    f"image {name!r} is too elongated to describe: {_size_text(img.size)} "
                    f"(the long side may be at most {MAX_ASPECT} times the short one)"
                )
            orientation = img.getexif().get(0x0112)
            img.draft("L", (MAX_SIDE, MAX_SIDE))  # JPEG: DCT-domain downscale, cheap
            w, h = img.size
            # Downscale to MAX_SIDE on the long side, unless that would make the short
            # side thinner than min_side (a 10000x20 strip becomes 8000x16).
            factor = max(MAX_SIDE / max(w, h), min_side / min(w, h))
            if factor < 1.0:
                img = _shrink(img, (max(1, round(w * factor)), max(1, round(h * factor))))
            img = _to_grey(img)
            if orientation in _UPRIGHT:
                img = img.transpose(_UPRIGHT[orientation])
            return np.asarray(img, dtype=np.uint8)
    except ItemRejected:
        raise
    except UnidentifiedImageError:
        empty = fh.seek(0, 2) == 0
        reason = "empty file" if empty else "not an image in a format Pillow can read"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        reason = f"too many pixels (the limit is {max_pixels:,}): {exc}"
    except MemoryError:
        reason = "not enough memory to decode it"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = f"corrupt image: {exc}"
    except Exception as exc:  # a hostile file can make any decoder raise anything
        reason = f"corrupt image ({type(exc).__name__}: {exc})"
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    raise ItemRejected(f"cannot decode image {name!r}: {reason}")


def extract(
    source: bytes | IO[bytes],
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
) -> Descriptors:
    """AKAZE descriptors of an encoded image, shape (n, 61), n <= MAX_KEYPOINTS.

    Call it in a worker process (see the module docstring), not in the sync."""
    grey = decode(source, name, max_pixels, min_side)
    detector = _akaze()
    keypoints = detector.detect(grey, None)
    if len(keypoints) > MAX_KEYPOINTS:
        keypoints = sorted(keypoints, key=lambda k: -k.response)[:MAX_KEYPOINTS]
    keypoints, descriptors = detector.compute(grey, keypoints)
    if descriptors is None:
        return np.zeros((0, DESCRIPTOR_BYTES), dtype=np.uint8)
    return np.ascontiguousarray(descriptors, dtype=np.uint8)
