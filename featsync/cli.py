"""The featsync command: argument parsing, logging set-up, exit codes.

Exit codes: 0 everything in step; 1 some images failed, deletes were withheld or the
folder could not be fully seen; 2 a bad config or a fatal error.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import unicodedata
from collections.abc import Sequence
from typing import Any

from featsync import __version__, backup_cli, jsonout, lifecycle, logs, serving
from featsync.argtypes import whole_number
from featsync.config import Settings, config_path, load
from featsync.errors import (
    AlreadyExists,
    ConfigError,
    Fatal,
    FeatsyncError,
    ItemRejected,
    NotFound,
    Transient,
)
from featsync.looks import EXIT_FATAL, EXIT_NOT_IN_STEP, EXIT_OK, status
from featsync.stopping import stop_on_signals


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
    rec.add_argument(
        "--resync",
        action="store_true",
        help="the configured search context is not the one the ledger mirrors (a new "
        "store, another Aspose context): send every image of the folder to it",
    )
    rec.add_argument(
        "--json", action="store_true", help="print the result (with --dry-run: the plan) as JSON"
    )
    sub.add_parser(
        "run",
        parents=[common],
        help="keep the context in step until stopped (the daemon)",
        description="Watch the folder and keep the search context in step: changes are "
        "sent within seconds, a full rescan runs at start and every "
        "[daemon] rescan_interval. SIGTERM/SIGINT stop it, SIGHUP reloads the config.",
    )
    rt = sub.add_parser(
        "retry", parents=[common], help="clear the wait of failed images, to try them now"
    )
    rt.add_argument("image_ids", nargs="*", metavar="IMAGE_ID")
    rt.add_argument("--all", action="store_true", help="every failed image")
    rt.add_argument("--json", action="store_true", help="print JSON")
    st = sub.add_parser("status", parents=[common], help="show the ledger's view of the sync")
    st.add_argument("--json", action="store_true", help="print JSON")
    ver = sub.add_parser(
        "verify",
        parents=[common],
        help="compare what the ledger believes with what the context holds",
        description="GET the features of the ledger's images from the search context and "
        "report drift: synced but missing, a different features count, held while the "
        "ledger says deleted, and (embedded context, featsync serve) IDs the ledger does "
        "not know. Exit 0 clean, 1 drift found. --repair mends it through the sync.",
    )
    how_many = ver.add_mutually_exclusive_group()
    how_many.add_argument(
        "--sample", type=_sample_size, metavar="N", help="check N images at random"
    )
    how_many.add_argument("--all", action="store_true", help="check every image (the default)")
    ver.add_argument(
        "--repair",
        action="store_true",
        help="re-send missing or changed images from the folder, delete orphans "
        "(through the delete guard), and record what was done",
    )
    ver.add_argument("--json", action="store_true", help="print JSON")
    hist = sub.add_parser(
        "history",
        parents=[common],
        help="every version of one image ID, and which backups of it are kept",
    )
    hist.add_argument("image_id", metavar="IMAGE_ID")
    hist.add_argument("--json", action="store_true", help="print JSON")
    backup_cli.add_parsers(sub, common)
    from featsync import report_cli, search_cli

    report_cli.add_parser(sub, common)
    search_cli.add_parser(sub, common)

    serving.add_parser(sub)

    ctx = sub.add_parser(
        "context", parents=[common], help="create, inspect or delete a search context"
    )
    ctx_sub = ctx.add_subparsers(dest="action", required=True, metavar="ACTION")
    ctx_sub.add_parser("create", parents=[common], help="create one and print its id")
    ctx_status = ctx_sub.add_parser(
        "status", parents=[common], help="print the configured context's status"
    )
    ctx_status.add_argument("--json", action="store_true", help="print JSON")
    delete = ctx_sub.add_parser("delete", parents=[common], help="delete the configured context")
    delete.add_argument("--yes", action="store_true", help="really delete it")

    feat = sub.add_parser("features", parents=[common], help="features of one image ID")
    feat_sub = feat.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in [
        ("get", "print the features record (JSON); --version N: a kept backup"),
        ("diff", "compare two versions (default: the newest backup with what is held)"),
        ("add", "extract features of --file and add them"),
        ("update", "replace the features with those of --file (backed up first)"),
        ("delete", "delete the features (backed up first)"),
    ]:
        one = feat_sub.add_parser(action, parents=[common], help=text)
        one.add_argument("image_id", metavar="IMAGE_ID")
        if action in ("add", "update"):
            one.add_argument("--file", required=True, metavar="PATH")
        if action == "get":
            one.add_argument(
                "--version", type=backup_cli.natural, metavar="N", help="a kept version"
            )
        if action == "diff":
            one.add_argument("--from", dest="from_v", type=backup_cli.natural, metavar="N")
            one.add_argument("--to", dest="to_v", type=backup_cli.natural, metavar="M")
            one.add_argument("--json", action="store_true", help="print JSON")
    return parser


SAMPLE_MAX = 1_000_000_000  # verify --sample N at most (--all checks every image)


def _sample_size(text: str) -> int:
    n = whole_number(1)(text)
    if n > SAMPLE_MAX:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more than {SAMPLE_MAX:,} images (--all checks every image)"
        )
    return n


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`featsync backup export | head -1`): no traceback. Point
        # stdout at /dev/null, so that Python's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        # Ctrl-C before a command put its own handler in place (while the config is
        # read, the ledger opened), or after it took it away: nothing half done.
        return 128 + signal.SIGINT


def _main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Image IDs are NFC (README): one typed in NFD (as macOS keyboards give) is the same.
    if getattr(args, "image_id", None) is not None:
        args.image_id = unicodedata.normalize("NFC", args.image_id)
    if getattr(args, "image_ids", None):
        args.image_ids = [unicodedata.normalize("NFC", i) for i in args.image_ids]
    if args.command == "serve":
        logs.configure(args.log_format, "info")
        try:
            return serving.run(args)
        except FeatsyncError as exc:
            return _fatal(exc)
    path = config_path(getattr(args, "config", None))
    try:
        settings = load(path)
    except ConfigError as exc:
        print(f"featsync: config error in {path}: {exc}", file=sys.stderr)
        return EXIT_FATAL
    logs.configure(settings.log.format, settings.log.level)
    try:
        if args.command == "reconcile":
            from featsync import reconcile_cli

            return reconcile_cli.run(
                settings, args.dry_run, args.confirm_deletes, args.resync, args.json
            )
        if args.command == "run":
            from featsync import daemon

            return daemon.run(path, settings)
        if args.command == "retry":
            return _retry(settings, args.image_ids, args.all, args.json)
        if args.command == "context":
            return _context(
                settings, args.action, getattr(args, "yes", False), getattr(args, "json", False)
            )
        if args.command == "features":
            return _features(settings, args)
        if args.command == "history":
            return lifecycle.history(settings, args.image_id, args.json)
        if args.command == "restore":
            from featsync import restore

            return restore.restore(
                settings, args.image_id, args.version, args.to, args.dry_run, args.force
            )

        if args.command == "report":
            from featsync import report_cli

            return report_cli.run(settings, args)
        if args.command in ("search", "duplicates"):
            from featsync import search_cli

            return search_cli.run(settings, args)
        if args.command == "backup":
            return backup_cli.run(settings, args)
        if args.command == "verify":
            from featsync import verify

            # SIGINT/SIGTERM: the check (and a repair's cycle) stops, says so, exits 1
            with stop_on_signals("verify") as stop:
                return verify.run(settings, args.sample, args.all, args.repair, args.json, stop)
        return status(settings, args.json)
    except (NotFound, AlreadyExists, ItemRejected, Transient) as exc:
        # one image's trouble (`features add` of an ID already there): exit 1, as a
        # cycle's per-image failures
        print(f"featsync: {exc}", file=sys.stderr)
        return EXIT_NOT_IN_STEP
    except FeatsyncError as exc:
        return _fatal(exc)


def _fatal(exc: FeatsyncError) -> int:
    """A fatal error: said once. Off a terminal both as a `fatal_error` log event (for
    journald and log shippers) and as a plain line (for cron's mail); on a terminal,
    where both would land on the same screen, the plain line alone."""
    if not sys.stderr.isatty():
        logs.get().error("fatal_error", error=str(exc))
    print(f"featsync: {exc}", file=sys.stderr)
    return EXIT_FATAL


def _retry(settings: Settings, image_ids: list[str], every: bool, as_json: bool) -> int:
    from featsync.ledger import SqlLedger

    if bool(image_ids) == every:
        print("featsync: name the image IDs to retry, or --all", file=sys.stderr)
        return EXIT_FATAL
    ledger = SqlLedger(settings.ledger.url)
    try:
        cleared = ledger.retry(None if every else image_ids, time.time())
    finally:
        ledger.close()
    missing = sorted(set(image_ids).difference(cleared))
    if as_json:
        jsonout.emit({"retry": cleared, "count": len(cleared), "not_failed": missing})
        return EXIT_NOT_IN_STEP if missing else EXIT_OK
    for image_id in cleared:
        print(f"retry {image_id}")
    for image_id in missing:
        print(f"featsync: {image_id}: not a failed image", file=sys.stderr)
    print(
        f"{len(cleared)} image(s) will be tried by the next cycle "
        "(a running daemon: within a second; else the next `featsync reconcile`)"
    )
    return EXIT_NOT_IN_STEP if missing else EXIT_OK


def _aspose(settings: Settings) -> Any:
    from featsync.wiring import open_context

    if settings.context.kind != "aspose":
        raise Fatal(
            'context create/status/delete need [context] kind = "aspose"; the embedded '
            "context needs no creating"
        )
    return open_context(settings, logs.get())


def _context(settings: Settings, action: str, yes: bool, as_json: bool = False) -> int:
    if action == "create":
        client = _aspose(settings)  # no context ID is needed to create one
        try:
            print(client.create_context())
        finally:
            client.close()
        return EXIT_OK
    client = _aspose(settings)
    try:
        if action == "status":
            answer = client.status()
            if as_json:
                context_id = settings.context.context_id
                jsonout.emit({"context_id": context_id, "status": answer})
            else:
                print(answer)
        elif not yes:
            print(
                f"featsync: this deletes search context {settings.context.context_id!r} "
                "with every features record in it; add --yes to go ahead",
                file=sys.stderr,
            )
            return EXIT_NOT_IN_STEP
        else:
            client.delete_context()
            print(f"deleted search context {settings.context.context_id}")
    finally:
        client.close()
    return EXIT_OK


def _features(settings: Settings, args: argparse.Namespace) -> int:
    from featsync.wiring import open_context

    action, image_id = args.action, args.image_id
    if action == "get":
        return lifecycle.features_get(settings, image_id, args.version)
    if action == "diff":
        return lifecycle.features_diff(settings, image_id, args.from_v, args.to_v, args.json)
    data = b""
    if getattr(args, "file", None) is not None:
        data = _read_image_file(args.file)
    context = open_context(settings, logs.get())
    try:
        if action in ("update", "delete"):
            note = lifecycle.back_up_by_hand(settings, context, image_id, f"manual {action}")
            print(f"features of {image_id} before the {action}: {note}")
        if action == "add":
            context.add_features(image_id, data)
            print(f"added features of {image_id}")
        elif action == "update":
            context.update_features(image_id, data)
            print(f"updated features of {image_id}")
        else:
            context.delete_features(image_id)
            print(f"deleted features of {image_id}")
    finally:
        context.close()
    return EXIT_OK


def _read_image_file(path: str) -> bytes:
    """The bytes of a regular file (O_NONBLOCK: a FIFO named by mistake cannot hang us)."""
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise Fatal(f"--file {path!r}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Fatal(f"--file {path!r}: not a regular file")
        return fh.read()


if __name__ == "__main__":
    sys.exit(main())
