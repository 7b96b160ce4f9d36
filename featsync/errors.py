"""Exceptions named by what the caller does next.

Adapters convert library and OS errors into these at their boundary, so no raw
``requests``, SQLAlchemy or OpenCV exception travels further.
"""

from __future__ import annotations


class FeatsyncError(Exception):
    """Base of every error featsync raises on purpose."""


class Transient(FeatsyncError):
    """Try again later: the network, a busy server, a rate limit."""


class ItemRejected(FeatsyncError):
    """This one image cannot be synced as it is; record why and go on with the rest."""


class SourceChanged(FeatsyncError):
    """The image file changed while it was being sent: nothing is the image's fault;
    the next scan judges it again."""


class NotFound(FeatsyncError):
    """The search context holds no features for this image ID."""


class AlreadyExists(FeatsyncError):
    """The search context already holds features for this image ID."""


class Fatal(FeatsyncError):
    """Stop the run: bad credentials, a ledger from a newer featsync, a broken store."""


class ConfigError(Fatal):
    """A configuration value is missing, unknown or malformed."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        self.key = key
        self.value = value
        self.reason = reason
        where = f"config file {value!r}" if key == "config" else f"config key {key!r}"
        tail = "" if key == "config" else f" (got {value!r})"
        super().__init__(f"{where}: {reason}{tail}")
