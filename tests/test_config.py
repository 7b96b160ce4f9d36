"""Config: every key checked, errors name the key and the value, paths relative to the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from featsync import config
from featsync.errors import ConfigError


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "featsync.toml"
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_the_shipped_sample_config_loads_as_it_is() -> None:
    sample = Path(__file__).parent.parent / "featsync.toml"
    s = config.load(str(sample))
    assert s.sync.folder == str(sample.parent / "images")
    assert s.context.kind == "local" and s.safety.max_delete_fraction == 0.5


def test_defaults_and_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    s = config.load(write(tmp_path, ""))
    assert s.sync.folder == str(tmp_path / "images")
    assert s.ledger.url == f"sqlite:///{tmp_path}/featsync-ledger.db"
    assert s.context.path == str(tmp_path / "featsync-context.db")
    assert s.sync.extensions == ("jpg", "jpeg", "png", "gif", "bmp", "tif", "tiff", "webp")
    assert s.sync.concurrency == 4 and s.log.format == "auto"


def test_absolute_paths_and_server_urls_are_kept(tmp_path: Path) -> None:
    s = config.load(
        write(
            tmp_path,
            '[sync]\nfolder = "/srv/images"\n[ledger]\nurl = "postgresql://u:p@db/featsync"\n',
        )
    )
    assert s.sync.folder == "/srv/images"
    assert s.ledger.url == "postgresql://u:p@db/featsync"


def test_extensions_are_normalised(tmp_path: Path) -> None:
    s = config.load(write(tmp_path, '[sync]\nextensions = [".JPG", "Png"]\n'))
    assert s.sync.extensions == ("jpg", "png")


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("[sync]\nconcurrency = 0\n", "sync.concurrency", 0),
        ('[sync]\nconcurrency = "four"\n', "sync.concurrency", "four"),
        ("[sync]\nconcurency = 4\n", "sync.concurency", 4),
        ("[safety]\nmax_delete_fraction = 1.5\n", "safety.max_delete_fraction", 1.5),
        ("[safety]\nmax_delete_count = -1\n", "safety.max_delete_count", -1),
        ('[safety]\nmarker = "/etc/passwd"\n', "safety.marker", "/etc/passwd"),
        ('[context]\nkind = "s3"\n', "context.kind", "s3"),
        ('[log]\nformat = "xml"\n', "log.format", "xml"),
        ("[sync]\nextensions = []\n", "sync.extensions", []),
        ("[sync]\nignore = [1]\n", "sync.ignore", [1]),
        ("[sync]\nfollow_symlinks = 1\n", "sync.follow_symlinks", 1),
        ('[sync]\nfolder = ""\n', "sync.folder", ""),
        ("[daemon]\nx = 1\n", "daemon.x", 1),
        ('[daemon]\nwatcher = "fanotify"\n', "daemon.watcher", "fanotify"),
        ("[daemon]\nquiet_period = -1\n", "daemon.quiet_period", -1),
        ("[daemon]\nrescan_interval = 0\n", "daemon.rescan_interval", 0),
        ("[watch]\nx = 1\n", "watch", {"x": 1}),
        ('sync = "images"\n', "sync", "images"),
        ('[ledger]\nurl = "not a url"\n', "ledger.url", "not a url"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_key_and_the_value(
    tmp_path: Path, text: str, key: str, value: Any
) -> None:
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text))
    assert err.value.key == key and err.value.value == value
    assert repr(key) in str(err.value) and repr(value) in str(err.value)


def test_a_missing_or_malformed_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        config.load(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[sync\n"))


def test_config_path_prefers_the_option_then_the_environment_then_the_default() -> None:
    assert config.config_path("a.toml", {"FEATSYNC_CONFIG": "b.toml"}) == "a.toml"
    assert config.config_path(None, {"FEATSYNC_CONFIG": "b.toml"}) == "b.toml"
    assert config.config_path(None, {}) == "featsync.toml"


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = config.load(write(tmp_path, ""))
    with pytest.raises(AttributeError):
        s.sync.concurrency = 8  # type: ignore[misc]
    assert os.path.isabs(s.config_path)
