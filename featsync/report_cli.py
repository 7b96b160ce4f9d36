"""`featsync report` on the command line: its parser and its run."""

from __future__ import annotations

import argparse
import os
from typing import Any

from featsync import jsonout, logs
from featsync.argtypes import percent, whole_number
from featsync.config import Settings
from featsync.errors import Fatal
from featsync.escapes import printable
from featsync.report import DUPLICATES_THRESHOLD, as_json, build, exit_code, lines
from featsync.wholefile import written_whole

PROBE_MAX = 100_000  # --probe N at most


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    rep = sub.add_parser(
        "report",
        parents=[common],
        help="a report on the sync: totals, features, weak, failing, duplicates, activity",
        description="Report what the ledger and the backups say: totals by state, the "
        "context, the last full cycle and the drift verify found; the features per image "
        "and the weak images; the biggest drops in features between versions and the "
        "biggest changes on last updates; failing images; exact duplicates; activity per "
        "day. --probe N searches the context for N random images with their own files "
        "(N find calls: against Aspose, N API calls); --duplicates asks the context for "
        "near-duplicate groups (one call; the embedded context compares every pair of "
        "images: its time grows with the square of their number). Read-only: it never "
        "takes the sync lock. "
        "Exit 0 nothing needs attention; 1 images are failing, deletes are withheld, "
        "probed images do not find themselves or the probe searched none it picked; 2 a "
        "bad config, a fatal error, or the context answered none of the probe's searches "
        "or failed --duplicates (the report is printed all the same); 130 Ctrl-C.",
    )
    rep.add_argument("--json", action="store_true", help="print every figure as JSON")
    rep.add_argument(
        "--html", type=_html_path, metavar="FILE", help="write a self-contained HTML page to FILE"
    )
    rep.add_argument(
        "--probe",
        type=whole_number(1, PROBE_MAX),
        metavar="N",
        help="search for N random images (N calls)",
    )
    rep.add_argument(
        "--duplicates",
        nargs="?",
        const=DUPLICATES_THRESHOLD,
        type=percent,
        metavar="PERCENT",
        help=f"near-duplicate groups at this similarity (default {DUPLICATES_THRESHOLD:g})",
    )


def _html_path(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("an empty path names no file")
    return text


def run(settings: Settings, args: argparse.Namespace) -> int:
    if args.html is not None:
        writable(args.html)  # before a probe spends calls on a page that cannot be written
    from featsync.stopping import stop_on_signals

    # Ctrl-C: search no more, report what was probed, exit 130 (SIGTERM: 143).
    with stop_on_signals("report") as stop:
        data = build(settings, args.probe, args.duplicates, logs.get(), stop)
    # A signal after the probe's end but before the handlers went is a stop too: the
    # output says so, as the exit does.
    data["stopped"] = data["stopped"] or stop.signum is not None
    if args.html is not None:
        from featsync.report_html import page

        write_page(args.html, page(settings, data))
    if args.json:
        jsonout.emit(as_json(data))
    else:
        print("\n".join(printable(x) for x in lines(data)))
        if args.html is not None:
            print(f"report written to {printable(args.html)}")
    return stop.exit_code if data["stopped"] else exit_code(data)


def writable(path: str) -> None:
    """Fatal unless the page can go to `path`: not a folder, in a folder that exists and
    can be written (a missing path or a regular file: a new file is renamed over it;
    anything else, a FIFO, a device, a symbolic link, is written through, as `backup
    export --out` does)."""
    where = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise Fatal(f"--html {printable(path)!r}: is a folder, not a file")
    if not os.path.lexists(path) or _plain(path):
        if not os.path.isdir(where):
            raise Fatal(
                f"--html {printable(path)!r}: the folder {printable(where)!r} does not exist"
            )
        if not os.access(where, os.W_OK | os.X_OK):
            raise Fatal(f"--html {printable(path)!r}: cannot write in {printable(where)!r}")
    elif os.path.exists(path) and not os.access(path, os.W_OK):
        raise Fatal(f"--html {printable(path)!r}: cannot write it")


def _plain(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def write_page(path: str, text: str) -> None:
    """Write the page: a missing path or a regular file whole or not at all (a temporary
    file beside it, renamed over it); anything else (a symbolic link, a FIFO, a device)
    written through, never replaced, as `backup export --out` does."""
    if os.path.lexists(path) and not _plain(path):
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise Fatal(
                f"--html {printable(path)!r}: cannot write it: {exc.strerror or exc}"
            ) from None
        return
    try:
        with written_whole(path, prefix=".featsync-report-") as fh:
            fh.write(text)
    except OSError as exc:
        raise Fatal(f"--html {printable(path)!r}: cannot write it: {exc.strerror or exc}") from None
