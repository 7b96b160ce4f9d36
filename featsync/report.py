"""`featsync report`: what the ledger, the backups and (with --probe / --duplicates)
the search context say about the sync, as a readable summary, as JSON (every figure)
or as one self-contained HTML page (featsync.report_html).

Read-only: the ledger and the backups are opened read-only, the context only searched;
the sync lock is never taken, so a report runs beside a daemon or a reconcile.

Exit codes (exit_code): 0 nothing needs attention; 1 images are failing, deletes are
withheld, a probe found images that do not find themselves or searched none it picked
(featsync.looks: "not in step"); 2 a bad config or a fatal error, or the context
answered none of the probe's searches or failed --duplicates (the report is printed
all the same); 130 / 143 stopped by SIGINT / SIGTERM (report_cli).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from featsync import jsonout
from featsync.config import Settings
from featsync.errors import Fatal
from featsync.escapes import printable
from featsync.ledger_open import shown_url
from featsync.looks import EXIT_FATAL, EXIT_NOT_IN_STEP, EXIT_OK, when
from featsync.report_data import gather
from featsync.report_files import Folder

PROBE_MAX_BYTES = 64 * 1024 * 1024  # a probe or a thumbnail reads no bigger file
DUPLICATES_THRESHOLD = 80.0  # percent similarity, the default of --duplicates


def folder_of(settings: Settings) -> Folder:
    from featsync.wiring import scan_rules

    return Folder(scan_rules(settings), PROBE_MAX_BYTES)


def build(
    settings: Settings,
    probe_n: int | None,
    duplicates: float | None,
    log: Any = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Every figure of the report (times as Unix seconds). `stop`: set (by Ctrl-C) to
    search no more; what was probed is reported."""
    from featsync.ledger import SqlLedger
    from featsync.lock import SyncLock

    try:
        ledger = SqlLedger(settings.ledger.url, read_only=True)
        try:
            data = gather(ledger, settings.backup.path, settings.sync.min_features)
            picked = None
            if probe_n:
                from featsync.report_probe import sample

                picked = sample(ledger, probe_n)
        finally:
            ledger.close()
    except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
        # A ledger edited by hand or damaged: text where a number belongs, a time out
        # of range. Named, not a traceback.
        raise Fatal(
            f"the ledger {shown_url(settings.ledger.url)}: holds a value the report cannot read "
            f"({printable(str(exc))[:200]})"
        ) from None
    data.update(
        generated_at=time.time(),
        folder=settings.sync.folder,
        context_kind=settings.context.kind,
        **_syncing(SyncLock(settings.ledger.url).who()),
        probe=None,
        duplicates=None,
        stopped=False,
    )
    if picked is not None or duplicates is not None:
        from featsync import report_probe
        from featsync.wiring import open_context

        context = open_context(settings, log, read_only=True)
        try:
            _same_context(context.identity(), data["context_identity"])
            if picked is not None:
                data["probe"] = report_probe.probe(context, folder_of(settings), picked, stop)
            if duplicates is not None and not (stop is not None and stop.is_set()):
                data["duplicates"] = report_probe.duplicates(context, duplicates)
        finally:
            context.close()
    data["stopped"] = stop is not None and stop.is_set()
    return data


def _same_context(configured: str, mirrored: str | None) -> None:
    """Search only the context the ledger mirrors (as reconcile binds it): another one
    would not hold these images, and the report would blame them."""
    if mirrored is not None and configured != mirrored:
        raise Fatal(
            f"[context] names {printable(configured)}, but the ledger mirrors "
            f"{printable(mirrored)}: a probe there would not find these images; set "
            "[context] back, or run `featsync reconcile --resync` to sync this one"
        )


def _syncing(who: Any) -> dict[str, Any]:
    """Who holds the sync lock (looked at, never taken), as `status --json` says it: the
    pid as a number (None: nobody, or a holder whose pid cannot be read)."""
    pid = None if who is None else who.pid
    return {
        "syncing": who is not None,
        "syncing_pid": int(pid) if pid and pid.isdigit() else None,
        "syncing_role": None if who is None else who.role,
    }


def exit_code(data: dict[str, Any]) -> int:
    """0 nothing needs attention; 1 failing images, withheld deletes, probed images that
    do not find themselves, or a probe that searched none of the images it picked (their
    files changed or unreadable); 2 the context gave no answer to any search of the
    probe, or to --duplicates (the report is printed all the same, with the error)."""
    probe, dup = data["probe"], data["duplicates"]
    if probe is not None and probe["failed_calls"] and not probe["find_calls"]:
        return EXIT_FATAL
    if dup is not None and dup["error"] is not None:
        return EXIT_FATAL
    lost = probe is not None and bool(probe["not_finding_themselves"])
    empty = probe is not None and bool(probe["asked"]) and not probe["find_calls"]
    needs = data["totals"]["failed"] or data["totals"]["withheld"] or lost or empty
    return EXIT_NOT_IN_STEP if needs else EXIT_OK


_TIMES = frozenset(
    {"at", "failed_at", "next_attempt_at", "generated_at", "last_marked_at"}
    | {"started_at", "finished_at"}
)


def as_json(value: Any, key: str = "") -> Any:
    """The report with its times in ISO 8601 (featsync.jsonout.iso)."""
    if isinstance(value, dict):
        return {k: as_json(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    if key in _TIMES and isinstance(value, int | float) and not isinstance(value, bool):
        return jsonout.iso(float(value))
    return value


def cost_note(data: dict[str, Any]) -> str:
    """What a probe cost, in words: the searches the context answered, and those that
    failed (each made, maybe retried, and no answer)."""
    p = data["probe"]
    failed = f", {p['failed_calls']} failed" if p["failed_calls"] else ""
    if data["context_kind"] == "aspose":
        return (
            f"{p['find_calls']} find call(s) answered{failed} by the Aspose context (each "
            f"one API call, billed as such), {p['seconds']:.1f} s"
        )
    each = p["seconds"] / p["find_calls"] if p["find_calls"] else 0.0
    return (
        f"{p['find_calls']} find call(s) answered{failed} by the embedded context, "
        f"{p['seconds']:.1f} s ({each:.2f} s a call, the query's extraction included)"
    )


def or_unknown(value: Any) -> str:
    """A number from the ledger, "?" when it holds none (or not a number)."""
    return "?" if value is None else str(value)


def lines(data: dict[str, Any], shown: int = 10) -> list[str]:
    t = data["totals"]
    pid, role = data["syncing_pid"], data["syncing_role"]
    role = role if role and role != "?" else "a daemon or a reconcile"
    syncing = f"pid {pid or '?'} ({role})"
    out = [
        f"folder: {data['folder']}",
        f"context: {data['context_identity'] or 'not recorded yet'} ({data['context_kind']})",
        f"syncing: {syncing if data['syncing'] else 'no process now'}",
        f"images: {t['synced']} synced ({t['weak']} weak), {t['failed']} failed, "
        f"{t['withheld']} withheld deletes, {t['deleted']} deleted",
    ]
    c = data["last_cycle"]
    out.append(
        "last full cycle: never"
        if c is None
        else f"last full cycle: {when(c['finished_at'])}: {or_unknown(c['added'])} added, "
        f"{or_unknown(c['updated'])} updated, {or_unknown(c['deleted'])} deleted, "
        f"{or_unknown(c['failed'])} failed" + ("" if c["complete"] else " (scan incomplete)")
    )
    out.append(drift_note(data["verify"], when))
    b = data["backups"]
    out.append(
        f"backups: {b['backups']} features records of {b['image_ids']} image IDs "
        f"({b['backup_bytes']} bytes), {b['image_copies']} image copies"
    )
    f = data["features"]
    if f["images"]:
        out.append(
            f"features per image ({f['images']} synced images): min {f['min']}, "
            f"p5 {f['p5']}, median {f['median']}, p95 {f['p95']}, max {f['max']}"
        )
    out += _listed(
        f"weak (below min_features {data['min_features']}), worst first",
        [f"{w['image_id']}: {or_unknown(w['features_count'])} features" for w in data["weak"]],
        shown,
    )
    d = data["drops"]
    out += _listed(
        f"biggest drops in features between versions ({d['images_with_a_drop']} images)",
        [
            f"{x['image_id']}: {x['from_count']} -> {x['to_count']} "
            f"(v{x['from_version']} -> v{x['to_version']}, {when(x['at'])})"
            for x in d["worst"]
        ],
        shown,
    )
    u = data["last_update_changes"]
    out += _listed(
        f"changed most on their last update, by share ({u['compared']} of "
        f"{u['updated_images']} updated images have the backup to compare)",
        [
            f"{x['image_id']}: {x['before']} -> {x['after']} features ({x['change']:+d}"
            + ("" if x["relative"] is None else f", {x['relative']:+.0%}")
            + ")"
            for x in u["worst"]
        ],
        shown,
    )
    out += _listed(
        "failing",
        [
            f"{x['image_id']}: {x['error']} (tries {or_unknown(x['attempts'])}, next try "
            f"{when(x['next_attempt_at'])})"
            for x in data["failures"]
        ],
        shown,
    )
    out += _listed(
        "withheld deletes (`featsync reconcile --confirm-deletes` releases them)",
        data["withheld_deletes"],
        shown,
    )
    e = data["exact_duplicates"]
    out += _listed(
        f"exact duplicates ({e['groups']} contents under {e['images']} image IDs)",
        [", ".join(g["image_ids"]) for g in e["list"]],
        shown,
    )
    out += _probe_lines(data, shown)
    out += _activity_lines(data, shown)
    return out


def drift_note(v: dict[str, Any], at: Any) -> str:
    """What the ledger says of drift, and what it cannot: only `verify --repair` and the
    daemon's review mark what they find; a plain `featsync verify` records nothing."""
    marked = ", ".join(f"{n} {k}" for k, n in sorted(v["drift_by_kind"].items()))
    newest = f" (newest marked {at(v['last_marked_at'])})" if v["last_marked_at"] else ""
    return (
        f"drift: {marked} marked by verify --repair or the daemon's review and not yet "
        f"mended{newest}"
        if marked
        else "drift: none marked by verify --repair or the daemon's review"
    ) + ("; a plain `featsync verify` records nothing: run it for the drift there is now")


def _listed(title: str, items: list[str], shown: int) -> list[str]:
    if not items:
        return [f"{title}: none"]
    more = f"  ... and {len(items) - shown} more (--json lists them)" if len(items) > shown else ""
    return [f"{title}:"] + [f"  {i}" for i in items[:shown]] + ([more] if more else [])


def _probe_lines(data: dict[str, Any], shown: int) -> list[str]:
    out: list[str] = []
    p = data["probe"]
    if p is not None:
        o = p["outcomes"]
        searched = len(p["images"])
        out.append(
            f"probe of {p['asked']} images"
            + (f" (stopped after {searched})" if p["stopped"] else "")
            + f": {o.get('found_first', 0)} find themselves first, "
            f"{o.get('found_lower', 0)} ranked lower, {o.get('not_found', 0)} not found, "
            f"{o.get('changed', 0)} changed since their sync, "
            f"{o.get('unreadable', 0) + o.get('error', 0)} not searched; cost: {cost_note(data)}"
        )
        if p["error"] is not None:
            out.append(f"  the context refused the probe: {p['error']}")
        elif p["asked"] and not p["find_calls"]:
            out.append("  the probe searched none of the images it picked (see below)")
        out += _listed(
            "do not find themselves (might need feature updates)",
            [
                f"{x['image_id']} ({or_unknown(x['features_count'])} features): "
                + (
                    "not among the results"
                    if x["rank"] is None
                    else f"rank {x['rank']}, similarity {x['similarity']}"
                )
                + _first(x)
                for x in p["not_finding_themselves"]
            ],
            shown,
        )
        changed = [x for x in p["images"] if x["outcome"] in ("changed", "unreadable", "error")]
        out += [f"  not searched: {x['image_id']}: {x['reason']}" for x in changed[:shown]]
        if len(changed) > shown:
            out.append(f"  ... and {len(changed) - shown} more not searched (--json lists them)")
    dup = data["duplicates"]
    if dup is not None and dup["error"] is not None:
        out.append(f"near-duplicate groups at {dup['threshold']:g}%: not known: {dup['error']}")
    elif dup is not None:
        out += _listed(
            f"near-duplicate groups at {dup['threshold']:g}% ({len(dup['groups'])}, "
            f"one find-duplicates call, {dup['seconds']:.1f} s)",
            [", ".join(f"{m['image_id']} ({m['similarity']})" for m in g) for g in dup["groups"]],
            shown,
        )
    if data["stopped"]:
        out.append("stopped (a signal): the probe or the near duplicates are not complete")
    return out


def _first(x: dict[str, Any]) -> str:
    top = x["top"]
    return "" if top is None else f"; first: {top['image_id']} ({top['similarity']})"


def _activity_lines(data: dict[str, Any], shown: int) -> list[str]:
    days = data["activity"]
    return _listed(
        "activity per day, newest first (UTC; failed: failed actions in full cycles)",
        [
            f"{d['day']}: {d['added']} added, {d['updated']} updated, {d['deleted']} deleted, "
            f"{d['failed']} failed"
            for d in reversed(days)
        ],
        shown,
    )
