"""What a person at a terminal sees of long work (issue 12): a live progress line
(done / total, rate, ETA, failures so far), warnings above it, one summary line at the
end, and no per-image lines; off a terminal the JSON log exactly as before.

The commands run on a real pseudo-terminal (stdin, stdout and stderr on its follower
end); what they wrote is read from the leader until EOF, with a deadline. Nothing here
counts redraws: only the line's last state (tqdm leaves it on screen) is asserted.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

from featsync.samples import textured_bytes
from tests.conftest import Workspace, set_mtime_past
from tests.test_aspose import CREDS
from tests.test_cli import featsync, json_lines
from tests.test_reconcile_output import slow_serve
from tests.tty import ANSI
from tests.tty import run_on_tty as on_tty

SUMMARY = re.compile(r"^(\d+) added, (\d+) updated, (\d+) deleted, (\d+) failed.* in [\d.]+ s$")


def screen_lines(out: str) -> list[str]:
    """Each line as it stands on the screen: colours dropped, and of the redraws of a
    line (carriage returns) only the last."""
    text = ANSI.sub("", out).replace("\r\n", "\n")
    return [line.split("\r")[-1].rstrip() for line in text.split("\n")]


def _images(ws: Workspace, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        set_mtime_past(ws.image(f"i{i:03}.jpg", i))


def test_reconcile_on_a_terminal_shows_the_live_line_and_one_summary(ws: Workspace) -> None:
    _images(ws, 30)
    code, out = on_tty("reconcile", cwd=ws.base)
    assert code == 0, out
    lines = screen_lines(out)
    # the line's last state: all done, of how many, at what rate, the ETA, failures
    [sent] = [x for x in lines if x.startswith("sending:")]
    assert "100%" in sent and "30/30" in sent, sent
    assert "images/s" in sent and "ETA " in sent and "0 failed" in sent, sent
    # the scan: a count (its total is not known until it is done)
    assert any(re.match(r"scanning: \d+ entries", x) for x in lines), lines
    summaries = [x for x in lines if SUMMARY.match(x)]
    assert len(summaries) == 1, lines
    assert summaries[0].startswith("30 added, 0 updated, 0 deleted, 0 failed in "), summaries
    # no line per image: they would scroll the bar away
    assert "image_added" not in out, out
    assert "i000.jpg" not in out


def test_a_terminal_shows_the_per_image_lines_at_level_debug(ws: Workspace) -> None:
    ws.write_config(sync={"folder": "images"}, log={"level": "debug"})
    _images(ws, 3)
    code, out = on_tty("reconcile", cwd=ws.base)
    assert code == 0, out
    lines = screen_lines(out)
    added = [x for x in lines if "image_added" in x]
    assert len(added) == 3, lines
    assert all("debug" in x for x in added), added  # at debug level while the line shows


def test_warnings_go_above_the_line_whole_and_the_summary_counts_failures(
    ws: Workspace,
) -> None:
    _images(ws, 12)
    broken = ws.images / "broken.jpg"
    broken.write_bytes(b"\x00" * 64)
    set_mtime_past(broken)
    code, out = on_tty("reconcile", cwd=ws.base)
    assert code == 1, out
    lines = screen_lines(out)
    # a line of its own, from its start: not drawn into the progress line
    [failed] = [x for x in lines if "image_failed" in x]
    assert re.match(r"^\d{4}-\d\d-\d\dT", failed) and "broken.jpg" in failed, failed
    [sent] = [x for x in lines if x.startswith("sending:")]
    assert "13/13" in sent and "1 failed" in sent, sent
    [summary] = [x for x in lines if SUMMARY.match(x)]
    assert summary.startswith("12 added, 0 updated, 0 deleted, 1 failed in "), summary


def test_at_level_warning_a_good_run_still_ends_with_its_summary(ws: Workspace) -> None:
    ws.write_config(sync={"folder": "images"}, log={"level": "warning"})
    _images(ws, 4)
    code, out = on_tty("reconcile", cwd=ws.base)
    assert code == 0, out
    lines = [x for x in screen_lines(out) if x]
    assert not any("cycle_finished" in x for x in lines), lines
    assert SUMMARY.match(lines[-1]) and lines[-1].startswith("4 added"), lines
    again = on_tty("reconcile", cwd=ws.base)[1]  # nothing to do: it says so too
    last = [x for x in screen_lines(again) if x][-1]
    assert last.startswith("0 added, 0 updated, 0 deleted, 0 failed, 4 unchanged in "), last


def test_resync_shows_the_line_too(ws: Workspace) -> None:
    _images(ws, 5)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    code, out = on_tty("reconcile", "--resync", cwd=ws.base)
    assert code == 0, out
    [sent] = [x for x in screen_lines(out) if x.startswith("sending:")]
    assert "5/5" in sent, sent


def test_off_a_terminal_the_output_is_as_before(ws: Workspace) -> None:
    """Pipes: the JSON log lines alone on stderr (one per image as ever), nothing on
    stdout, no progress line and no summary line."""
    _images(ws, 6)
    r = featsync("reconcile", cwd=ws.base)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines and all(x.startswith("{") for x in lines), r.stderr
    events = [e["event"] for e in json_lines(r.stderr)]
    assert events.count("image_added") == 6 and events[-1] == "cycle_finished", events
    assert "sending" not in r.stderr and " added, " not in r.stderr


def test_verify_on_a_terminal_shows_checked_of_total(ws: Workspace) -> None:
    _images(ws, 7)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    code, out = on_tty("verify", cwd=ws.base)
    assert code == 0, out
    lines = screen_lines(out)
    [checked] = [x for x in lines if x.startswith("checking:")]
    assert "7/7" in checked and "ETA " in checked and "0 failed" in checked, checked
    plain = featsync("verify", cwd=ws.base)  # off a terminal: no line
    assert plain.returncode == 0 and "checking:" not in plain.stderr + plain.stdout


def test_backup_export_on_a_terminal_counts_what_it_wrote(ws: Workspace) -> None:
    ws.write_config(sync={"folder": "images"}, backup={"enabled": True})
    for i in range(3):
        (ws.images / f"b{i}.jpg").write_bytes(textured_bytes(i))
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    for i in range(3):  # each update keeps what it replaces
        set_mtime_past(ws.image(f"b{i}.jpg", 50 + i))
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    out_file = ws.base / "export.jsonl"
    code, out = on_tty("backup", "export", "--out", str(out_file), cwd=ws.base)
    assert code == 0, out
    assert len(out_file.read_text().splitlines()) == 3
    lines = screen_lines(out)
    assert any(re.match(r"exporting: 3 backups \[", x) for x in lines), lines
    assert "exported 3 backup(s)" in out
    # the records to the terminal itself: no line drawn into them
    code, out = on_tty("backup", "export", cwd=ws.base)
    assert code == 0, out
    assert "exporting:" not in out
    records = [x for x in screen_lines(out) if x.startswith("{")]
    assert len(records) == 3 and all(x.endswith("}") for x in records), records


def test_ctrl_c_on_a_terminal_ends_with_an_interrupted_summary(
    ws: Workspace, tmp_path: Path
) -> None:
    with slow_serve(ws, tmp_path, 40):
        # Ctrl-C once the line shows a few images sent (of 40: the rest is left)
        code, out = on_tty("reconcile", cwd=ws.base, env=CREDS, interrupt_at=r"\| [2-9]/40 \[")
    assert code == 128 + signal.SIGINT, out
    assert "Traceback" not in out
    lines = screen_lines(out)
    [stopping] = [x for x in lines if "reconcile_stopping" in x]
    assert re.match(r"^\d{4}-\d\d-\d\dT", stopping), stopping  # above the line, whole
    [summary] = [x for x in lines if x.startswith("interrupted: ")]
    assert "left for the next cycle" in summary, summary
    assert SUMMARY.match(summary.removeprefix("interrupted: ")), summary


def test_the_line_fits_the_terminal_it_is_drawn_on_when_stdout_is_a_pipe(
    ws: Workspace, tmp_path: Path
) -> None:
    """`reconcile --json | jq` on a 40-column terminal: the line is measured on stderr,
    where it is drawn (stdout's 80 columns would wrap it, each redraw a new line)."""
    _images(ws, 6)
    code, out = on_tty("reconcile", "--json", cwd=ws.base, columns=40, stdout=tmp_path / "o")
    assert code == 0, out
    assert json.loads((tmp_path / "o").read_text())["in_step"] is True
    drawn = ANSI.sub("", out).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    bars = [x for x in drawn if x.startswith(("scanning:", "sending:"))]
    assert any(x.startswith("sending:") for x in bars), drawn
    assert max(len(x) for x in bars) <= 40, bars


def test_a_missing_folder_summary_offers_no_option_that_cannot_help(ws: Workspace) -> None:
    _images(ws, 3)
    assert featsync("reconcile", cwd=ws.base).returncode == 0
    ws.images.rename(ws.base / "elsewhere")  # unmounted, say: no confirmation overrides it
    code, out = on_tty("reconcile", cwd=ws.base)
    assert code == 1, out
    [summary] = [x for x in screen_lines(out) if x.startswith("0 added, ")]
    assert "3 deletes withheld" in summary and "(the scan was incomplete)" in summary, summary
    assert "--confirm-deletes" not in summary, summary


def test_a_file_name_cannot_drive_the_terminal_through_a_warning(ws: Workspace) -> None:
    _images(ws, 2)
    # sets the terminal's title (structlog quotes a value with a space or a line break,
    # not this one)
    evil = ws.images / "bad\x1b]0;pwned\x07.jpg"
    evil.write_bytes(b"\x00" * 64)
    set_mtime_past(evil)
    code, out = on_tty("reconcile", cwd=ws.base)
    assert code == 1, out
    assert "\x1b]0;pwned" not in out and "\x07" not in out
    [failed] = [x for x in screen_lines(out) if "image_failed" in x]
    assert "bad\\x1b]0;pwned\\x07.jpg" in failed, failed
