"""`featsync backup export | list | prune`: the kept features, streamed out, listed,
and trimmed to the retention rules on demand."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import math
import os
import re
import sys
import time
from typing import IO, Any

from featsync import logs, progress, retention
from featsync.backups import BackupStore
from featsync.config import Settings
from featsync.errors import Fatal
from featsync.looks import EXIT_OK, when
from featsync.wholefile import written_whole

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """`restore` and `backup export | list | prune` on featsync's command line."""
    res = sub.add_parser(
        "restore",
        parents=[common],
        help="put a kept image file back into the folder (the sync then sends it)",
        description="Copy the kept image of a version (default: the one before the last "
        "change) back to where the file was, or to --to PATH. A different file there is "
        "never replaced without --force. Needs [backup] images = true when it was sent.",
    )
    res.add_argument("image_id", metavar="IMAGE_ID")
    res.add_argument("--version", type=natural, metavar="N", help="the version to restore")
    res.add_argument("--to", metavar="PATH", help="where to put the file")
    res.add_argument("--dry-run", action="store_true", help="say what would be done")
    res.add_argument("--force", action="store_true", help="replace a different file")
    bk = sub.add_parser("backup", parents=[common], help="the kept features backups")
    bk_sub = bk.add_subparsers(dest="action", required=True, metavar="ACTION")
    exp = bk_sub.add_parser(
        "export", parents=[common], help="stream the backups as JSON lines (Aspose's shape)"
    )
    exp.add_argument("--out", metavar="FILE", help="write to FILE (default: standard output)")
    exp.add_argument(
        "--since", metavar="TIME", help="only backups taken since: 2026-11-01, 12h, 7d, ..."
    )
    exp.add_argument("image_ids", nargs="*", metavar="IMAGE_ID")
    bl = bk_sub.add_parser("list", parents=[common], help="the kept versions, by image ID")
    bl.add_argument("image_ids", nargs="*", metavar="IMAGE_ID")
    bl.add_argument("--json", action="store_true", help="print JSON")
    bp = bk_sub.add_parser("prune", parents=[common], help="apply the retention rules now")
    bp.add_argument(
        "--unknown",
        action="store_true",
        help="also drop the backups of image IDs the ledger does not know at all, once "
        "their newest record is keep_deleted_days old (never done by itself: a lost "
        "ledger or another configuration's backups look the same)",
    )


def run(settings: Settings, args: argparse.Namespace) -> int:
    """`featsync backup ACTION`."""
    if args.action == "export":
        return export(settings, args.out, args.since, args.image_ids)
    if args.action == "list":
        return listing(settings, args.image_ids, args.json)
    return prune(settings, args.unknown)


def natural(text: str) -> int:
    """An argparse type: a version number (0, 1, 2, ...)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number (0, 1, 2, ...)")
    return n


def parse_since(text: str, now: float | None = None) -> float:
    """--since: an ISO 8601 date or time (UTC unless it says otherwise), an age such
    as 90m, 12h, 7d or 2w, or seconds since the epoch."""
    now = time.time() if now is None else now
    t = text.strip()
    m = _RELATIVE.match(t.lower())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        value = float(t)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
    try:
        parsed = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise _since_error(text) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def _since_error(text: str) -> Fatal:
    return Fatal(
        f"--since {text!r}: not a time; give an ISO 8601 date or time "
        "(2026-11-01, 2026-11-01T12:00:00Z), an age (90m, 12h, 7d, 2w) or epoch seconds"
    )


def export(settings: Settings, out: str | None, since: str | None, image_ids: list[str]) -> int:
    """JSON lines, one kept record each, streamed: memory stays flat. To a regular file:
    written under a temporary name beside it and renamed when complete; to anything
    else (a FIFO, /dev/stdout, a symbolic link to one): written to as it is."""
    start = parse_since(since) if since is not None else None
    store = BackupStore(settings.backup.path, read_only=True)
    try:
        # on a terminal: records written, rate; not when the records go to it too
        with progress.shown(out is not None or not sys.stdout.isatty()) as sink:
            n = _export(store, out, start, image_ids, sink)
    except BrokenPipeError:
        raise  # the reader went away: featsync.cli ends quietly
    except OSError as exc:
        raise Fatal(f"--out {out!r}: {exc.strerror or exc}") from None
    finally:
        store.close()
    print(f"exported {n} backup(s)" + (f" to {out}" if out else ""), file=sys.stderr)
    return EXIT_OK


def _export(
    store: BackupStore,
    out: str | None,
    start: float | None,
    image_ids: list[str],
    sink: progress.Sink,
) -> int:
    if out is None:
        return _write(store, sys.stdout, start, image_ids, sink)
    if os.path.lexists(out) and not (os.path.isfile(out) and not os.path.islink(out)):
        with open(out, "w", encoding="utf-8") as fh:
            return _write(store, fh, start, image_ids, sink)
    return _write_whole(store, out, start, image_ids, sink)


def _write_whole(
    store: BackupStore, out: str, since: float | None, image_ids: list[str], sink: progress.Sink
) -> int:
    with written_whole(out, prefix=f".{os.path.basename(out)}.", suffix=".partial") as fh:
        return _write(store, fh, since, image_ids, sink)


def _write(
    store: BackupStore,
    fh: IO[str],
    since: float | None,
    image_ids: list[str],
    sink: progress.Sink = progress.nothing,
) -> int:
    n = 0
    for b, feats in store.stream(since, image_ids):
        doc = {
            "imageId": b.image_id,
            "version": b.version,
            "hash": b.digest,
            "takenAt": dt.datetime.fromtimestamp(b.taken_at, dt.UTC).isoformat(),
            "reason": b.reason,
            "featuresCount": feats.features_count,
            "featureLengthInBits": feats.feature_length_in_bits,
            "features": base64.b64encode(feats.features).decode("ascii"),
        }
        fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
        n += 1
        sink("export", n, None, 0)
    return n


def listing(settings: Settings, image_ids: list[str], as_json: bool) -> int:
    """Per image ID, streamed (a store of a million IDs prints in flat memory); the
    totals: of the IDs named, or of the whole store. The records' totals are summed
    from the rows listed, so they agree with them even when a sync writes meanwhile."""
    store = BackupStore(settings.backup.path, read_only=True)
    try:
        n = size = ids = 0
        if as_json:
            sys.stdout.write('{"images": [')
        for p in store.per_image(image_ids):
            n, size, ids = n + p["records"], size + p["size"], ids + 1
            if as_json:
                sys.stdout.write(("," if ids > 1 else "") + "\n  " + json.dumps(p))
            else:
                versions = ", ".join(f"v{v}" for v in p["versions"])
                print(
                    f"{p['image_id']}  {versions}  newest {when(p['newest_at'])}  "
                    f"{_size(p['size'])}"
                )
        whole = store.totals()
    finally:
        store.close()
    totals: dict[str, Any] = {"backups": n, "backup_bytes": size, "image_ids": ids}
    if not image_ids:
        totals |= {k: whole[k] for k in ("image_copies", "image_bytes")}
    if as_json:
        sys.stdout.write("\n], " + json.dumps({"totals": totals})[1:] + "\n")
        return EXIT_OK
    if image_ids:
        named = len(set(image_ids))
        print(f"{n} backup(s) of {ids} of the {named} image ID(s) named, {_size(size)}")
    else:
        print(
            f"{n} backup(s) of {ids} image IDs, {_size(size)}; "
            f"{whole['image_copies']} image copies, "
            f"{_size(whole['image_bytes'])}; in {settings.backup.path}"
        )
    return EXIT_OK


def prune(settings: Settings, unknown: bool = False) -> int:
    """Apply every retention rule now (featsync.retention; a cycle applies them by
    itself). Refused without a ledger that knows images: "gone" is judged by it, and
    a wrong --config or ledger URL must not look like every image gone."""
    from featsync.ledger import SqlLedger

    b = settings.backup
    if not os.path.isdir(b.path):
        print(f"no backups in {b.path} (the folder does not exist); nothing to prune")
        return EXIT_OK
    ledger = SqlLedger(settings.ledger.url, read_only=True)
    try:
        if ledger.row_count() == 0:
            raise Fatal(
                f"the ledger {ledger.where()} holds no images (missing, or another "
                "ledger): pruning would take every image for gone; not pruned"
            )
        store = BackupStore(b.path)
        try:
            pruned = retention.prune(
                store,
                b.keep_versions,
                b.keep_deleted_days,
                b.max_size,
                lambda ids, cutoff: ledger.gone_before(ids, cutoff, unknown),
                ledger.current_digests,
                time.time(),
            )
        finally:
            store.close()
    finally:
        ledger.close()
    retention.log_pruned(logs.get(), pruned, b.max_size)
    print(
        f"pruned {pruned.versions} beyond keep_versions, {pruned.gone} of images gone over "
        f"keep_deleted_days, {pruned.size} over max_size, {pruned.images} image copies, "
        f"{pruned.temp_files} temporary files; {_size(pruned.freed)} freed"
    )
    return EXIT_OK


def _size(n: Any) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
