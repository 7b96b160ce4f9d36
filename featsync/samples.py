"""Synthetic textured images, for the sample folder, the tests and the benchmarks.

Random overlapping shapes give AKAZE plenty of corners, so the same
seed always yields the same image and two seeds yield unrelated ones.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw


def textured_image(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A deterministic RGB image full of corners (about 100 AKAZE keypoints at 320x240)."""
    rnd = random.Random(seed)
    w, h = size
    grey = rnd.randrange(256)
    img = Image.new("RGB", size, (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    for _ in range(max(16, w * h // 600)):
        x0, y0 = rnd.randrange(-20, w), rnd.randrange(-20, h)
        x1, y1 = x0 + rnd.randrange(4, max(5, w // 5)), y0 + rnd.randrange(4, max(5, h // 5))
        color = (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256))
        shape = rnd.randrange(4)
        if shape == 0:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif shape == 1:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        elif shape == 2:
            draw.polygon([(rnd.randrange(w), rnd.randrange(h)) for _ in range(3)], fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=rnd.randrange(1, 4))
    return img


def encode(img: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def textured_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (320, 240)) -> bytes:
    """The encoded bytes of `textured_image(seed, size)`."""
    return encode(textured_image(seed, size), fmt)
