"""The featsync command: argument parsing, logging set-up, exit codes.

Exit codes: 0 everything in step; 1 some images failed, deletes were withheld or the
folder could not be fully seen; 2 a bad config or a fatal error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from featsync import __version__, logs
from featsync.config import Settings, config_path, load
from featsync.errors import ConfigError, FeatsyncError

EXIT_OK, EXIT_NOT_IN_STEP, EXIT_FATAL = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default: $FEATSYNC_CONFIG, else ./featsync.toml)",
    )
    parser = argparse.ArgumentParser(
        prog="featsync",
        parents=[common],
        description="Keep a reverse-image-search context in step with a folder of images.",
    )
    parser.add_argument("--version", action="version", version=f"featsync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rec = sub.add_parser("reconcile", parents=[common], help="run one sync cycle and exit")
    rec.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    rec.add_argument(
        "--confirm-deletes",
        action="store_true",
        help="send deletes even past safety.max_delete_count / max_delete_fraction, "
        "and adopt the folder's current device as the expected one",
    )
    st = sub.add_parser("status", parents=[common], help="show the ledger's view of the sync")
    st.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = config_path(getattr(args, "config", None))
    try:
        settings = load(path)
    except ConfigError as exc:
        print(f"featsync: config error in {path}: {exc}", file=sys.stderr)
        return EXIT_FATAL
    logs.configure(settings.log.format, settings.log.level)
    try:
        if args.command == "reconcile":
            return _reconcile(settings, args.dry_run, args.confirm_deletes)
        return _status(settings, args.json)
    except FeatsyncError as exc:
        logs.get().error("fatal_error", error=str(exc))
        print(f"featsync: {exc}", file=sys.stderr)
        return EXIT_FATAL


def _reconcile(settings: Settings, dry_run: bool, confirm_deletes: bool) -> int:
    from featsync.engine import Engine, describe, open_context
    from featsync.ledger import SqlLedger

    ledger = SqlLedger(settings.ledger.url)
    try:
        context = open_context(settings)
        try:
            report = Engine(settings, ledger, context, logs.get()).cycle(
                dry_run=dry_run, confirm_deletes=confirm_deletes
            )
        finally:
            context.close()
    finally:
        ledger.close()
    if dry_run:
        print("\n".join(describe(report.plan)))
    return EXIT_OK if report.in_step else EXIT_NOT_IN_STEP


def _status(settings: Settings, as_json: bool) -> int:
    from featsync.ledger import SqlLedger

    ledger = SqlLedger(settings.ledger.url)
    try:
        data: dict[str, Any] = {
            "folder": settings.sync.folder,
            "counts": ledger.counts(),
            "failures": ledger.failures(),
            "last_cycle": ledger.last_cycle(),
        }
    finally:
        ledger.close()
    if as_json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print("\n".join(_status_lines(data)))
    return EXIT_NOT_IN_STEP if data["failures"] else EXIT_OK


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _status_lines(data: dict[str, Any]) -> list[str]:
    counts = data["counts"]
    lines = [
        f"folder: {data['folder']}",
        "images: " + ", ".join(f"{n} {state}" for state, n in counts.items()),
    ]
    c = data["last_cycle"]
    if c is None:
        lines.append("last cycle: never")
    else:
        lines.append(
            f"last cycle: {_when(c['finished_at'])} ({c['duration_ms']:.0f} ms): "
            f"{c['added']} added, {c['updated']} updated, {c['deleted']} deleted, "
            f"{c['unchanged']} unchanged, {c['failed']} failed, "
            f"{c['withheld_deletes']} withheld deletes"
            + ("" if c["complete"] else ", scan incomplete")
        )
    for f in data["failures"]:
        lines.append(
            f"failed: {f['image_id']}: {f['error']} "
            f"(tries {f['attempts']}, next try {_when(f['next_attempt_at'])})"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
