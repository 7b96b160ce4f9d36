"""Image files a report reads (a probe's query, a thumbnail), found by the path the
ledger recorded (`relpath`), never by one rebuilt from an image ID, and only inside
the folder: the path must be relative, without "." or ".." parts, every part must pass
the scan's rules (not ignored, the file's name with a synced extension), and it is
opened one folder at a time below the root's descriptor with O_NOFOLLOW (unless
[sync] follow_symlinks, when the resolved path must still lie inside the folder). Then
fstat: a regular file no bigger than [sync] max_file_size (and the report's own cap).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from dataclasses import dataclass

from featsync.scan import ScanRules, ignore_regex, wanted_regex

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


class NotRead(Exception):
    """The file was not read; the message says why (for the report)."""


@dataclass(frozen=True, slots=True)
class Folder:
    """The synced folder and the scan's rules, to read files from it by relpath."""

    rules: ScanRules
    max_bytes: int  # bigger files are not read

    def check(self, relpath: str) -> list[str]:
        """The path's parts, or NotRead when it is not one the scan would sync."""
        if not relpath or relpath.startswith("/") or "\\" in relpath or "\0" in relpath:
            raise NotRead(f"{relpath!r} is not a path relative to the folder")
        parts = relpath.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise NotRead(f"{relpath!r} is not a plain path below the folder")
        ignored = ignore_regex(self.rules.ignore).match
        if any(ignored(p) is not None for p in parts[:-1]):
            raise NotRead(f"{relpath!r} is inside an ignored folder")
        if wanted_regex(self.rules.extensions, self.rules.ignore).match(parts[-1]) is None:
            raise NotRead(f"{relpath!r} is not a file the scan syncs")
        return parts

    def read(self, relpath: str) -> bytes:
        """The file's bytes; NotRead (with the reason) when it cannot or must not be."""
        parts = self.check(relpath)
        try:
            fd = self._open(parts)
        except FileNotFoundError:
            raise NotRead("the file is gone") from None
        except OSError as exc:
            raise NotRead(f"cannot open it: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotRead("not a regular file")
            limit = min(self.max_bytes, self.rules.max_file_size or self.max_bytes)
            if st.st_size > limit:
                raise NotRead(f"{st.st_size} bytes: more than the {limit} a report reads")
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read(limit + 1)
            if len(data) > limit:
                raise NotRead(f"grew past the {limit} bytes a report reads")
            return data
        except OSError as exc:
            raise NotRead(f"cannot read it: {exc.strerror or exc}") from None
        finally:
            os.close(fd)

    def _open(self, parts: list[str]) -> int:
        if self.rules.follow_symlinks:
            root = os.path.realpath(self.rules.root)
            path = os.path.realpath(os.path.join(self.rules.root, *parts))
            if os.path.commonpath([root, path]) != root:
                raise NotRead("it leads outside the folder (a symbolic link)")
            return os.open(path, _FLAGS)
        fd = os.open(self.rules.root, _FLAGS | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                try:
                    inner = os.open(part, _FLAGS | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink, or not a folder
                        raise NotRead(f"{part!r} is not a folder of the scan's") from None
                    raise
                os.close(fd)
                fd = inner
            try:
                return os.open(parts[-1], _FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise NotRead("it is a symbolic link (not followed)") from None
                raise
        finally:
            os.close(fd)


class TooLarge(ValueError):
    """An image with more pixels than a thumbnail is made of (the message says so)."""


def thumbnail(data: bytes, size: int, max_pixels: int) -> bytes:
    """A PNG of at most size x size pixels. TooLarge when the header says the image has
    more than `max_pixels` (nothing decoded); ValueError when it cannot be decoded.
    JPEG decodes at a reduced scale (draft); others are picked down to a small image
    before any conversion, so only the decoded image and small ones are ever held."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) of images above its own limit:
            # a warning here is an image too large, said in the placeholder instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise TooLarge(f"{w}x{h} pixels: too large for a thumbnail")
                img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
                near: Image.Image = img
                if max(img.size) > 4 * size:
                    # Nearest-neighbour first, to four times the thumbnail: no copy of
                    # the whole image (a smooth resize of RGBA premultiplies one, as a
                    # conversion makes one), then a smooth shrink of the small one.
                    f = 4 * size / max(img.size)
                    box = (max(1, round(img.width * f)), max(1, round(img.height * f)))
                    near = img.resize(box, Image.Resampling.NEAREST)
                small = near.convert("RGB")
                small.thumbnail((size, size))
                out = io.BytesIO()
                small.save(out, format="PNG", optimize=True)
                return out.getvalue()
    except TooLarge:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        limit = Image.MAX_IMAGE_PIXELS
        raise TooLarge(f"too large for a thumbnail (over Pillow's {limit} pixels)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None
