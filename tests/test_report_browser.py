"""`featsync report --html` in a real browser: headless Chromium renders the page of a
synced folder (weak, failing, updated and deleted images, a probe); the screenshot is
not blank and the page logs nothing to the console (the page has no script, so any
console line is an error). Skips, saying why, only where Chromium cannot be had
(.ci/run installs it from the distribution's packages)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from featsync.samples import encode, textured_image
from tests.conftest import Workspace, set_mtime_past
from tests.test_cli import featsync

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
)


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run does)")
    return found


def render(page: Path, shot: Path, size: str = "1200,2000") -> list[str]:
    """Screenshot `page` into `shot`; the console lines Chromium logged for it."""
    with tempfile.TemporaryDirectory(prefix="featsync-chromium-") as profile:
        r = subprocess.run(
            [
                _chromium(),
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={shot}",
                f"--window-size={size}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert r.returncode == 0 and shot.exists(), r.stderr[-3000:]
    return [line for line in r.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def _put(ws: Workspace, rel: str, data: bytes) -> None:
    path = ws.images / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    set_mtime_past(path)


def test_the_console_check_sees_a_script_error(tmp_path: Path) -> None:
    """The check below can fail: a page with a script error is caught."""
    page = tmp_path / "bad.html"
    page.write_text("<p>x</p><script>console.error('boom'); notDefined();</script>")
    lines = render(page, tmp_path / "bad.png", "400,300")
    assert any("Uncaught ReferenceError" in x for x in lines), lines


def test_the_report_page_renders_in_chromium(ws: Workspace, tmp_path: Path) -> None:
    _chromium()
    ws.write_config(sync={"folder": "images", "concurrency": 2}, log={"format": "json"})
    for n in range(10):
        _put(ws, f"set{n % 2}/i{n}.jpg", encode(textured_image(40 + n)))
    _put(ws, "flat.png", encode(Image.new("RGB", (160, 120), (200, 60, 60)), "PNG"))
    _put(ws, "broken.jpg", b"\xff\xd8\xff not a jpeg" * 3)
    assert featsync("reconcile", cwd=ws.base).returncode == 1  # broken.jpg fails
    _put(ws, "set0/i0.jpg", encode(textured_image(99, (100, 80))))
    (ws.images / "set1" / "i1.jpg").unlink()
    assert featsync("reconcile", cwd=ws.base).returncode == 1
    page = tmp_path / "report.html"
    r = featsync("report", "--probe", "4", "--html", str(page), cwd=ws.base)
    assert r.returncode == 1 and page.exists(), r.stderr

    shot = tmp_path / "report.png"
    console = render(page, shot)
    assert console == []
    with Image.open(shot) as img:
        rgb = img.convert("RGB")
        assert rgb.size == (1200, 2000)
        grey = rgb.convert("L")
        hist = grey.histogram()
        used = [level for level, n in enumerate(hist) if n]
        assert used[-1] - used[0] > 100  # not one colour
        non_white = sum(hist[:240]) / (rgb.width * rgb.height)
        assert non_white > 0.03, non_white  # text, tiles, charts and thumbnails drawn
