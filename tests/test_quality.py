"""ruff and mypy are part of the test run: lint or type errors fail the suite."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_ruff_finds_nothing() -> None:
    lint = run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_strict_finds_nothing() -> None:
    r = run("mypy")
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_test_the_readme_names_exists() -> None:
    """The README's guarantees name the tests that check them: each must be there."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## What it guarantees") : text.index("## Logs")]
    named = re.findall(r"`(?:(test_\w+\.py)(?:::(\w+))?|::(\w+))`", section)
    assert named
    current = ""
    missing = []
    for file, name, bare in named:
        current = file or current
        path = ROOT / "tests" / current
        if not path.exists():
            missing.append(current)
            continue
        test = name or bare
        if test and not re.search(rf"^def {test}\(", path.read_text(encoding="utf-8"), re.M):
            missing.append(f"{current}::{test}")
    assert not missing, f"the README names tests that do not exist: {missing}"
