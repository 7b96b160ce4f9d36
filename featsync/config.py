"""featsync.toml (+ environment) -> one frozen Settings, checked key by key.

Relative paths resolve against the config file's folder, so a unit file or a cron
line can point at a config from anywhere. Unknown keys are errors: a typo must not
silently fall back to a default. Every error names the key and the bad value.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import make_url

from featsync.errors import ConfigError, Fatal
from featsync.model import Secret

DEFAULT_CONFIG = "featsync.toml"
ENV_CONFIG = "FEATSYNC_CONFIG"
ENV_CLIENT_ID = "FEATSYNC_CLIENT_ID"
ENV_CLIENT_SECRET = "FEATSYNC_CLIENT_SECRET"  # noqa: S105 (the variable's name, not a secret)


@dataclass(frozen=True, slots=True)
class SyncSettings:
    folder: str
    extensions: tuple[str, ...]
    ignore: tuple[str, ...]
    id_prefix: str
    concurrency: int
    follow_symlinks: bool
    max_file_size: int  # bytes; bigger files are rejected with the reason, never read
    min_features: int  # an image synced with fewer is logged and counted as weak


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    url: str


@dataclass(frozen=True, slots=True)
class ContextSettings:
    kind: str
    path: str  # the embedded context's store (kind = "local")
    max_pixels: int  # the embedded context's decoder refuses bigger images
    extract_timeout: float  # seconds one image's feature extraction may take
    # Aspose Imaging Cloud (kind = "aspose"); credentials are never in this file.
    base_url: str
    auth_url: str
    context_id: str
    storage: str
    folder: str
    client_id: str
    client_id_file: str
    client_secret_file: str
    connect_timeout: float
    read_timeout: float
    verify_tls: bool
    trust_env: bool
    max_retries: int
    backoff_max: float
    idle_timeout: float


@dataclass(frozen=True, slots=True)
class SafetySettings:
    max_delete_fraction: float
    max_delete_count: int
    marker: str
    delete_window: float  # seconds: deletes sent within it count together


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: str
    level: str


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """`featsync run` only."""

    watcher: str  # "auto" | "native" | "polling" | "off"
    quiet_period: float  # a path is checked once it has had no events for this long
    max_delay: float  # ... or once its first pending event is this old, events or not
    rescan_interval: float  # full rescans, the correctness mechanism
    heartbeat_interval: float
    polling_interval: float  # watcher = "polling": seconds between looks
    stop_timeout: float  # on SIGTERM, how long calls in flight may take to finish
    outage_wait: float  # the first pause after the service failed; doubles to 10 min
    max_pending: int  # changed paths held at most; beyond, one full rescan instead
    verify_interval: float  # seconds between reviews of a rolling sample; 0 = none
    verify_sample: float  # share of the ledger's images each review GETs ...
    verify_min: int  # ... but at least this many
    repair: bool  # a review that finds drift repairs it (else it only logs it)


@dataclass(frozen=True, slots=True)
class BackupSettings:
    """Features (and, optionally, image files) kept before each update and delete."""

    enabled: bool
    path: str  # a folder: features.db, and images/ when `images` is on
    required: bool  # a backup that cannot be taken holds the update/delete back
    images: bool  # keep each sent image file too (content-addressed), for `restore`
    keep_versions: int  # backups kept per image ID, newest first
    keep_deleted_days: float  # an image gone this long loses its backups
    max_size: int  # bytes, all backups together; the oldest go first beyond it


@dataclass(frozen=True, slots=True)
class Settings:
    config_path: str
    sync: SyncSettings
    ledger: LedgerSettings
    context: ContextSettings
    safety: SafetySettings
    log: LogSettings
    daemon: DaemonSettings
    backup: BackupSettings


# -- value checks: each returns the clean value or raises ValueError(reason) -------------

Check = Callable[[Any], Any]


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _int_range(lo: int, hi: int) -> Check:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"must be a whole number from {lo} to {hi}")
        return v

    return check


def _fraction(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
        raise ValueError("must be a number from 0 to 1")
    if math.isnan(v):
        raise ValueError("must be a number from 0 to 1")
    return float(v)


def _seconds(lo: float, hi: float) -> Check:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
            raise ValueError(f"must be a number of seconds from {lo} to {hi}")
        if not lo <= v <= hi:
            raise ValueError(f"must be a number of seconds from {lo} to {hi}")
        return float(v)

    return check


def _days(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        raise ValueError("must be a number of days from 0 to 36500")
    if not 0 <= v <= 36_500:
        raise ValueError("must be a number of days from 0 to 36500")
    return float(v)


def _http_url(v: Any) -> str:
    s = _non_empty(v)
    scheme, sep, rest = s.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.split("/")[0]:
        raise ValueError("must be an http:// or https:// URL")
    return s.rstrip("/")


def _choice(*options: str) -> Check:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError("must be one of " + ", ".join(repr(o) for o in options))
        return str(v)

    return check


def _str_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError("must be a list of non-empty strings")
    return tuple(v)


def _extensions(v: Any) -> tuple[str, ...]:
    items = _str_list(v)
    if not items:
        raise ValueError("must name at least one extension")
    return tuple(x.lower().lstrip(".") for x in items)


def _non_empty(v: Any) -> str:
    s = _str(v)
    if not s.strip():
        raise ValueError("must not be empty")
    return s


def _marker(v: Any) -> str:
    s = _str(v)
    if s and (os.path.isabs(s) or ".." in s.split("/")):
        raise ValueError("must be a file name relative to the folder root")
    return s


SCHEMA: dict[str, dict[str, tuple[Check, Any]]] = {
    "sync": {
        "folder": (_non_empty, "images"),
        "extensions": (_extensions, ["jpg", "jpeg", "png", "gif", "bmp", "tif", "tiff", "webp"]),
        "ignore": (_str_list, [".*", "*.tmp", "*~"]),
        "id_prefix": (_str, ""),
        "concurrency": (_int_range(1, 64), 4),
        "follow_symlinks": (_bool, False),
        "max_file_size": (_int_range(1, 1 << 40), 256 * 1024 * 1024),
        "min_features": (_int_range(0, 100_000), 10),
    },
    "ledger": {"url": (_non_empty, "sqlite:///featsync-ledger.db")},
    "context": {
        "kind": (_choice("local", "aspose"), "local"),
        "path": (_non_empty, "featsync-context.db"),
        "max_pixels": (_int_range(1, 10**10), 250_000_000),
        "extract_timeout": (_seconds(1, 3600), 60.0),
        "base_url": (_http_url, "https://api.aspose.cloud/v3.0"),
        "auth_url": (_http_url, "https://api.aspose.cloud/connect/token"),
        "context_id": (_str, ""),
        "storage": (_str, ""),
        "folder": (_str, ""),
        "client_id": (_str, ""),
        "client_id_file": (_str, ""),
        "client_secret_file": (_str, ""),
        "connect_timeout": (_seconds(0.1, 600), 10.0),
        "read_timeout": (_seconds(0.1, 3600), 120.0),
        "verify_tls": (_bool, True),
        "trust_env": (_bool, True),
        "max_retries": (_int_range(0, 20), 5),
        "backoff_max": (_seconds(0, 3600), 60.0),
        "idle_timeout": (_seconds(0, 86400), 300.0),
    },
    "safety": {
        "max_delete_fraction": (_fraction, 0.5),
        "max_delete_count": (_int_range(0, 10**9), 10_000),
        "marker": (_marker, ""),
        "delete_window": (_seconds(0, 30 * 86400), 3600.0),
    },
    "log": {
        "format": (_choice("auto", "json", "console"), "auto"),
        "level": (_choice("debug", "info", "warning", "error"), "info"),
    },
    "daemon": {
        "watcher": (_choice("auto", "native", "polling", "off"), "auto"),
        "quiet_period": (_seconds(0, 3600), 2.0),
        "max_delay": (_seconds(0, 86400), 30.0),
        "rescan_interval": (_seconds(1, 30 * 86400), 3600.0),
        "heartbeat_interval": (_seconds(1, 86400), 60.0),
        "polling_interval": (_seconds(0.1, 3600), 5.0),
        "stop_timeout": (_seconds(0, 3600), 30.0),
        "outage_wait": (_seconds(0.1, 3600), 15.0),
        "max_pending": (_int_range(1, 10**7), 100_000),
        "verify_interval": (_seconds(0, 30 * 86400), 3600.0),
        "verify_sample": (_fraction, 0.01),
        "verify_min": (_int_range(0, 10**7), 20),
        "repair": (_bool, False),
    },
    "backup": {
        "enabled": (_bool, True),
        "path": (_non_empty, "featsync-backups"),
        "required": (_bool, True),
        "images": (_bool, False),
        "keep_versions": (_int_range(1, 10_000), 3),
        "keep_deleted_days": (_days, 90.0),
        "max_size": (_int_range(1024, 1 << 50), 1 << 30),
    },
}


def resolve_url(url: str, base_dir: str) -> str:
    """Make a relative SQLite file path absolute against `base_dir` (the config's folder)."""
    u = make_url(url)
    db = u.database
    if u.get_backend_name() == "sqlite" and db and db != ":memory:" and not os.path.isabs(db):
        u = u.set(database=os.path.join(base_dir, db))
    return u.render_as_string(hide_password=False)


def config_path(cli_value: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """--config, else $FEATSYNC_CONFIG, else ./featsync.toml."""
    return cli_value or environ.get(ENV_CONFIG) or DEFAULT_CONFIG


def load(path: str) -> Settings:
    """Read and check a config file; raise ConfigError naming the key and value."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("config", path, "file not found") from None
    except OSError as exc:
        raise ConfigError("config", path, f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", path, f"not valid TOML: {exc}") from None
    return parse(raw, os.path.dirname(os.path.abspath(path)), os.path.abspath(path))


def parse(raw: Mapping[str, Any], base_dir: str, source: str = "<memory>") -> Settings:
    """Check a parsed TOML document against SCHEMA."""
    context = raw.get("context")
    if isinstance(context, dict) and "client_secret" in context:
        raise ConfigError(
            "context.client_secret",
            "<hidden>",
            "a secret does not belong in the config file (it ends up in backups, "
            "diffs and bug reports); set FEATSYNC_CLIENT_SECRET, or name a file with "
            "context.client_secret_file (with systemd, LoadCredential=)",
        )
    for section in raw:
        if section not in SCHEMA:
            raise ConfigError(section, raw[section], "unknown section; known: " + ", ".join(SCHEMA))
    values: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(section, given, "must be a table")
        for key in given:
            if key not in keys:
                raise ConfigError(
                    f"{section}.{key}", given[key], "unknown key; known: " + ", ".join(keys)
                )
        out: dict[str, Any] = {}
        for key, (check, default) in keys.items():
            value = given.get(key, default)
            try:
                out[key] = check(value)
            except ValueError as exc:
                raise ConfigError(f"{section}.{key}", value, str(exc)) from None
        values[section] = out

    def here(p: str) -> str:
        return os.path.normpath(os.path.join(base_dir, os.path.expanduser(p)))

    sync = values["sync"]
    sync["folder"] = here(sync["folder"])
    try:
        ledger_url = resolve_url(values["ledger"]["url"], base_dir)
    except Exception as exc:  # SQLAlchemy raises ArgumentError and friends for a bad URL
        # SQLAlchemy's message quotes the URL, and a URL that cannot be parsed cannot
        # have its password hidden: the value is shown only if it can hold none.
        url = str(values["ledger"]["url"])
        safe = "@" not in url and "?" not in url
        raise ConfigError(
            "ledger.url",
            url if safe else "(not shown: it may hold a password)",
            f"not a database URL ({type(exc).__name__}); the form is "
            "dialect+driver://user:password@host/database, or sqlite:///path",
        ) from None
    values["context"]["path"] = here(values["context"]["path"])
    values["backup"]["path"] = here(values["backup"]["path"])
    return Settings(
        config_path=source,
        sync=SyncSettings(**sync),
        ledger=LedgerSettings(url=ledger_url),
        context=ContextSettings(**values["context"]),
        safety=SafetySettings(**values["safety"]),
        log=LogSettings(**values["log"]),
        daemon=DaemonSettings(**values["daemon"]),
        backup=BackupSettings(**values["backup"]),
    )


# -- credentials -----------------------------------------------------------------------


def credentials(settings: Settings, environ: Mapping[str, str] = os.environ) -> tuple[str, Secret]:
    """The Aspose client ID and secret: from the environment, else from the files the
    config names. A relative file name is looked up in $CREDENTIALS_DIRECTORY first
    (systemd's LoadCredential=), then next to the config file."""
    c = settings.context
    base_dir = os.path.dirname(settings.config_path)
    client_id = environ.get(ENV_CLIENT_ID) or c.client_id
    if not client_id and c.client_id_file:
        client_id = _read_credential("context.client_id_file", c.client_id_file, base_dir, environ)
    if not client_id:
        raise Fatal(
            f"no Aspose client ID: set {ENV_CLIENT_ID}, or context.client_id or "
            "context.client_id_file in the config"
        )
    secret = environ.get(ENV_CLIENT_SECRET)
    if not secret and c.client_secret_file:
        secret = _read_credential(
            "context.client_secret_file", c.client_secret_file, base_dir, environ
        )
    if not secret:
        raise Fatal(
            f"no Aspose client secret: set {ENV_CLIENT_SECRET}, or name a file with "
            "context.client_secret_file"
        )
    return client_id, Secret(secret)


def _read_credential(key: str, name: str, base_dir: str, environ: Mapping[str, str]) -> str:
    name = os.path.expanduser(name)
    places = [name] if os.path.isabs(name) else []
    if not places:
        if environ.get("CREDENTIALS_DIRECTORY"):
            places.append(os.path.join(environ["CREDENTIALS_DIRECTORY"], name))
        places.append(os.path.join(base_dir, name))
    for path in places:
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.read().strip()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as exc:
            raise Fatal(f"{key}: cannot read {path!r}: {exc}") from None
        if not value:
            raise Fatal(f"{key}: {path!r} is empty")
        return value
    raise Fatal(f"{key}: {name!r} not found (looked in: {', '.join(places)})")
