"""The shipped systemd units and example config: checked by systemd itself."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from featsync import config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = ["featsync.service", "featsync-reconcile.service", "featsync-reconcile.timer"]


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (.ci/run installs it where apt-get can)",
)
def test_the_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    featsync = shutil.which("featsync")
    assert featsync is not None, "featsync is not installed on PATH"
    for name in UNITS:
        # verify checks that ExecStart exists: point it at this install's featsync
        text = (DEPLOY / name).read_text(encoding="utf-8")
        (tmp_path / name).write_text(text.replace("/opt/featsync/bin/featsync", featsync))
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    done = subprocess.run(
        [analyze, "verify", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        check=False,
    )
    # an unknown or misspelt key is only a warning: any output counts as a failure
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_service_is_hardened_and_speaks_notify() -> None:
    unit = (DEPLOY / "featsync.service").read_text(encoding="utf-8")
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "DynamicUser=yes",
        "StateDirectory=featsync",
        "LoadCredential=client_secret:",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "NoNewPrivileges=yes",
    ]:
        assert f"\n{line}" in unit, line


def test_the_example_config_is_valid_and_keeps_state_in_the_state_directory() -> None:
    settings = config.load(str(DEPLOY / "featsync.toml"))
    assert settings.ledger.url == "sqlite:////var/lib/featsync/ledger.db"
    assert settings.context.path.startswith("/var/lib/featsync/")
    assert settings.log.format == "json"
