"""The body of an image upload: one multipart part, streamed and rewindable.

Aspose takes image data as the first multipart part (``imageData``, as the official
SDKs send it). requests would build such a body in memory; this one is read piece by
piece, from an open file with ``os.pread`` (memory stays flat whatever the file's
size), and can be rewound, so urllib3 can send it again on a retry. A file that ends
early fails the call with ``SourceChanged``, never with an ``OSError`` that urllib3
would take for the network.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

from featsync.errors import SourceChanged
from featsync.model import ImageData, OpenImage


class Upload:
    """A multipart body with the image as its one part (``imageData``, as the official
    SDKs send it), read piece by piece: from an open file with ``os.pread``, so memory
    stays flat whatever the file's size, and rewindable (``seek``/``tell``), so urllib3
    can send it again on a retry."""

    def __init__(self, image: ImageData) -> None:
        self.boundary = secrets.token_hex(16)
        self._head = (
            f"--{self.boundary}\r\n"
            'Content-Disposition: form-data; name="imageData"; filename="imageData"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode("ascii")
        self._tail = f"\r\n--{self.boundary}--\r\n".encode("ascii")
        self._image = image
        self._size = len(image) if isinstance(image, bytes) else image.size
        self._pos = 0

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return len(self._head) + self._size + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:  # requests takes a body with __iter__ as a stream
        while chunk := self.read(1 << 16):
            yield chunk

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: len(self)}[whence]
        self._pos = max(0, min(len(self), base + pos))
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = len(self) if n is None or n < 0 else min(len(self), self._pos + n)
        out = bytearray()
        head, body_end = len(self._head), len(self._head) + self._size
        while self._pos < end:
            pos = self._pos
            if pos < head:
                piece = self._head[pos : min(end, head)]
            elif pos < body_end:
                piece = self._body(pos - head, min(end, body_end) - pos)
            else:
                piece = self._tail[pos - body_end : end - body_end]
            if not piece:  # the file shrank under us: send no garbage, fail the call
                # (not an OSError: urllib3 would take that for the network and retry)
                raise SourceChanged(f"image file {self._name()!r} shrank while it was sent")
            out += piece
            self._pos += len(piece)
        return bytes(out)

    def _body(self, offset: int, n: int) -> bytes:
        image = self._image
        if isinstance(image, bytes):
            return image[offset : offset + n]
        return os.pread(image.fd, n, offset)

    def _name(self) -> str:
        return self._image.name if isinstance(self._image, OpenImage) else "<bytes>"
