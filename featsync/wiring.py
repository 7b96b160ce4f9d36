"""Wiring: settings turned into the pieces they configure (scan rules, the search
context, the Aspose client's settings), in one place. The engine and the daemon take
the pieces, not the settings' sections, so each can be run with others in tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from featsync.config import Settings, credentials
from featsync.errors import Fatal
from featsync.model import SearchContext
from featsync.scan import ScanRules

if TYPE_CHECKING:
    from featsync.aspose import ClientSettings  # imports requests: only when used


def scan_rules(settings: Settings) -> ScanRules:
    s = settings.sync
    return ScanRules(
        root=s.folder,
        extensions=frozenset(s.extensions),
        ignore=s.ignore,
        id_prefix=s.id_prefix,
        follow_symlinks=s.follow_symlinks,
        marker=settings.safety.marker,
        max_file_size=s.max_file_size,
    )


def open_context(settings: Settings, log: Any = None, read_only: bool = False) -> SearchContext:
    """The configured search context; `read_only`: only to look (a dry run)."""
    if settings.context.kind == "local":
        from featsync.localcontext import LocalContext
        from featsync.localcontext.extractor import Extractor, default_workers

        c = settings.context
        extractor = Extractor(
            default_workers(settings.sync.concurrency), c.extract_timeout, c.max_pixels
        )
        return LocalContext(c.path, extractor, owns_extractor=True, read_only=read_only)
    if settings.context.kind == "aspose":
        from featsync.aspose import AsposeContext

        client_id, secret = credentials(settings)
        return AsposeContext(client_settings(settings), client_id, secret, log)
    raise Fatal(f"context kind {settings.context.kind!r} is not supported")


def client_settings(settings: Settings) -> ClientSettings:
    from featsync.aspose import ClientSettings

    c = settings.context
    return ClientSettings(
        base_url=c.base_url,
        auth_url=c.auth_url,
        context_id=c.context_id,
        storage=c.storage,
        folder=c.folder,
        connect_timeout=c.connect_timeout,
        read_timeout=c.read_timeout,
        verify_tls=c.verify_tls,
        trust_env=c.trust_env,
        max_retries=c.max_retries,
        backoff_max=c.backoff_max,
        idle_timeout=c.idle_timeout,
        pool_size=max(4, settings.sync.concurrency),
    )
