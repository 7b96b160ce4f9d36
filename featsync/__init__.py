"""featsync keeps a reverse-image-search context in step with a folder of images."""

from __future__ import annotations

__version__ = "0.1.0"
