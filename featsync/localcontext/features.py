"""Decode an image (Pillow) and extract AKAZE binary descriptors (OpenCV).

Images are downscaled before extraction, so a 24-megapixel photo costs about what a
1-megapixel one does; JPEGs are downscaled while decoding (``draft``), which also
keeps memory bounded. Keypoints are capped at the strongest ``MAX_KEYPOINTS``.
"""

from __future__ import annotations

import io
import threading
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featsync.errors import ItemRejected

MAX_SIDE = 1024  # pixels, longest side after downscaling
MAX_KEYPOINTS = 500  # the Aspose example shows ~500 per image
DESCRIPTOR_BYTES = 61  # full-size AKAZE M-LDB descriptor, 486 bits padded to bytes
FEATURE_LENGTH_BITS = DESCRIPTOR_BYTES * 8  # 488, as Aspose reports it

_local = threading.local()


def _akaze() -> Any:
    # cv2 is imported here, not at module load: a no-change rescan never needs it, and
    # importing it costs more than the rescan itself. One detector per thread because
    # OpenCV algorithm objects are not documented as thread-safe.
    detector = getattr(_local, "akaze", None)
    if detector is None:
        import cv2

        cv2.setNumThreads(1)  # the worker pool is the parallelism
        detector = cv2.AKAZE_create()  # type: ignore[attr-defined]
        _local.akaze = detector
    return detector


def decode(data: bytes, name: str) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Decode to an 8-bit grey array no larger than MAX_SIDE, EXIF orientation applied."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            img.draft("L", (MAX_SIDE, MAX_SIDE))  # JPEG: DCT-domain downscale, cheap
            img = ImageOps.exif_transpose(img) or img
            img = img.convert("L")
            img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
            return np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        reason = "empty file" if not data else "not an image in a format Pillow can read"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        reason = f"too many pixels: {exc}"
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = f"corrupt image: {exc}"
    raise ItemRejected(f"cannot decode image {name!r}: {reason}")


def extract(data: bytes, name: str) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """AKAZE descriptors of an encoded image, shape (n, 61), n <= MAX_KEYPOINTS."""
    grey = decode(data, name)
    detector = _akaze()
    keypoints = detector.detect(grey, None)
    if len(keypoints) > MAX_KEYPOINTS:
        keypoints = sorted(keypoints, key=lambda k: -k.response)[:MAX_KEYPOINTS]
    keypoints, descriptors = detector.compute(grey, keypoints)
    if descriptors is None:
        return np.zeros((0, DESCRIPTOR_BYTES), dtype=np.uint8)
    return np.ascontiguousarray(descriptors, dtype=np.uint8)
