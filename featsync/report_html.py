"""`featsync report --html FILE`: the report as one self-contained page. Charts are
drawn by matplotlib (Agg, no display) and embedded as PNG data: URIs, as are thumbnails
of the weak, unfindable and failing images, made with Pillow from the files in the
folder (featsync.report_files: by the ledger's relpath, inside the folder only) at a
bounded size and count; a file that cannot be read or decoded gets a placeholder.
No external CSS, script, font or image: the page needs no network to be viewed."""

from __future__ import annotations

import base64
import html
import io
import textwrap
from typing import Any

from featsync.config import Settings
from featsync.report import as_json, cost_note, drift_note, folder_of, or_unknown
from featsync.report_files import Folder, NotRead, TooLarge, thumbnail

THUMB_PX = 128  # a thumbnail fits in THUMB_PX x THUMB_PX
THUMBS = 24  # thumbnails per section at most
# Bigger images get a placeholder, judged from the header before decoding: a decoded
# 40 MP image takes up to 160 MB (RGBA), a thumbnail never needs more.
THUMB_MAX_PIXELS = 40_000_000
ROWS = 200  # table rows per section at most (--json has them all)
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.tiles{display:flex;flex-wrap:wrap;gap:10px}.tile{border:1px solid #ccc;border-radius:6px;
padding:8px 14px;min-width:110px}.tile b{display:block;font-size:22px}.bad b{color:#b00}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.n{text-align:right}
.thumbs{display:flex;flex-wrap:wrap;gap:8px}.thumbs figure{margin:0;width:140px;
font-size:11px;word-break:break-all}.thumbs img{display:block;max-width:128px;max-height:128px;
border:1px solid #ccc}.note{color:#555}img.chart{max-width:100%}
"""


def page(settings: Settings, data: dict[str, Any]) -> str:
    """The whole page."""
    doc = as_json(data)  # ISO 8601 times
    folder = folder_of(settings)
    max_pixels = min(settings.context.max_pixels, THUMB_MAX_PIXELS)
    t = data["totals"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width'>",
        f"<title>featsync report: {_e(data['folder'])}</title><style>{_CSS}</style></head>",
        "<body><h1>featsync report</h1>",
        f"<p class='note'>{_e(data['folder'])} &middot; context: "
        f"{_e(data['context_identity'] or 'not recorded yet')} &middot; generated "
        f"{_e(doc['generated_at'])}</p>",
        "<div class='tiles'>",
        _tile("synced", t["synced"]),
        _tile("weak", t["weak"], bad=bool(t["weak"])),
        _tile("failed", t["failed"], bad=bool(t["failed"])),
        _tile("withheld deletes", t["withheld"], bad=bool(t["withheld"])),
        _tile("deleted", t["deleted"]),
        _tile("drift not mended", t["drift_marks"], bad=bool(t["drift_marks"])),
        _tile("exact duplicate IDs", data["exact_duplicates"]["extra_copies"]),
        "</div>",
        _cycle(doc),
        "<h2>Features per image</h2>",
        _distribution(data),
        _chart(_features_chart(data)) if data["features"]["images"] else "",
        "<h2>Weak images (below min_features), worst first</h2>",
        _thumbs(
            folder,
            max_pixels,
            data["weak"],
            lambda w: f"{or_unknown(w['features_count'])} features",
        ),
        _table(
            ["image ID", "features"], [[w["image_id"], w["features_count"]] for w in data["weak"]]
        ),
        "<h2>Withheld deletes</h2>",
        _table(
            ["image ID (`featsync reconcile --confirm-deletes` releases them)"],
            [[i] for i in data["withheld_deletes"]],
        ),
        "<h2>Biggest drops in features between versions</h2>",
        _table(
            ["image ID", "versions", "features", "drop", "when"],
            [
                [
                    x["image_id"],
                    f"v{x['from_version']} → v{x['to_version']}",
                    f"{x['from_count']} → {x['to_count']}",
                    x["drop"],
                    x["at"],
                ]
                for x in doc["drops"]["worst"]
            ],
        ),
        "<h2>Changed most on their last update (from the backups)</h2>",
        _table(
            ["image ID", "version", "before", "after", "change", "when"],
            [
                [x["image_id"], x["version"], x["before"], x["after"], f"{x['change']:+d}", x["at"]]
                for x in doc["last_update_changes"]["worst"]
            ],
        ),
        "<h2>Failing images</h2>",
        _thumbs(folder, max_pixels, data["failures"], lambda f: str(f["error"])),
        _table(
            ["image ID", "error", "kind", "tries", "next try"],
            [
                [f["image_id"], f["error"], f["error_kind"], f["attempts"], f["next_attempt_at"]]
                for f in doc["failures"]
            ],
        ),
        "<h2>Exact duplicates (one content under several image IDs)</h2>",
        _table(
            ["content hash", "image IDs"],
            [[g["hash"][:16], ", ".join(g["image_ids"])] for g in data["exact_duplicates"]["list"]],
        ),
        _probe(data, folder, max_pixels),
        _duplicates(data),
        "<h2>Sync activity per day (UTC)</h2>",
        _chart(_activity_chart(data)) if data["activity"] else "<p>none</p>",
        _table(
            ["day", "added", "updated", "deleted", "failed"],
            [
                [d["day"], d["added"], d["updated"], d["deleted"], d["failed"]]
                for d in reversed(data["activity"])
            ],
        ),
        "<p class='note'>failed: failed actions in full cycles (an image failing in three "
        "cycles counts three times). Every figure is in <code>featsync report --json</code>."
        "</p></body></html>",
    ]
    return "\n".join(parts)


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def _tile(label: str, n: int, bad: bool = False) -> str:
    return f"<div class='tile{' bad' if bad else ''}'><b>{_e(n)}</b>{_e(label)}</div>"


def _cycle(doc: dict[str, Any]) -> str:
    c, v = doc["last_cycle"], doc["verify"]
    cycle = (
        "never"
        if c is None
        else f"{_e(c['finished_at'])}: {_e(c['added'])} added, {_e(c['updated'])} updated, "
        f"{_e(c['deleted'])} deleted, {_e(c['failed'])} failed"
        + ("" if c["complete"] else " (scan incomplete)")
    )
    return f"<p>Last full cycle: {cycle}<br>{_e(drift_note(v, str))}</p>"


def _distribution(data: dict[str, Any]) -> str:
    f = data["features"]
    if not f["images"]:
        return "<p>no synced image with a known features count</p>"
    cells = [[f["images"], f["min"], f["p5"], f["median"], f["p95"], f["max"]]]
    return _table(["images", "min", "p5", "median", "p95", "max"], cells)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows[:ROWS]:
        cells = (
            f"<td class='n'>{v}</td>" if isinstance(v, int | float) else f"<td>{_e(v)}</td>"
            for v in r
        )
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    if len(rows) > ROWS:
        out.append(f"<p class='note'>and {len(rows) - ROWS} more (--json lists them)</p>")
    return "".join(out)


def _thumbs(folder: Folder, max_pixels: int, rows: list[dict[str, Any]], caption: Any) -> str:
    if not rows:
        return ""
    out = ["<div class='thumbs'>"]
    for r in rows[:THUMBS]:
        src = _thumb_uri(folder, r.get("relpath"), max_pixels)
        out.append(
            f"<figure><img src='{src}' alt='{_e(r['image_id'])}'><figcaption>"
            f"{_e(r['image_id'])}<br>{_e(caption(r))}</figcaption></figure>"
        )
    out.append("</div>")
    if len(rows) > THUMBS:
        out.append(f"<p class='note'>thumbnails of the first {THUMBS} of {len(rows)}</p>")
    return "".join(out)


def _thumb_uri(folder: Folder, relpath: str | None, max_pixels: int) -> str:
    if not relpath:
        return _placeholder("no path")
    try:
        png = thumbnail(folder.read(relpath), THUMB_PX, max_pixels)
    except NotRead as exc:
        return _placeholder(str(exc))
    except TooLarge as exc:
        return _placeholder(str(exc))
    except ValueError:
        return _placeholder("cannot decode")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _placeholder(why: str) -> str:
    """A crossed box with the reason in whole words (up to five lines of them)."""
    wrapped = textwrap.wrap(why, 26) or ["-"]
    if len(wrapped) > 5:
        wrapped = [*wrapped[:4], textwrap.shorten(" ".join(wrapped[4:]), 26, placeholder=" …")]
    text = "".join(
        f"<tspan x='64' dy='{0 if n == 0 else 11}'>{html.escape(line, quote=True)}</tspan>"
        for n, line in enumerate(wrapped)
    )
    svg = (
        "<svg xmlns='http://www.w3.org/2000/svg' width='128' height='128'>"
        "<rect width='128' height='128' fill='#eee' stroke='#b00'/>"
        "<line x1='0' y1='0' x2='128' y2='128' stroke='#b00'/>"
        f"<text x='64' y='{64 - 5 * len(wrapped)}' font-size='9' text-anchor='middle' "
        f"fill='#600'>{text}</text></svg>"
    )
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode("ascii")


def _probe(data: dict[str, Any], folder: Folder, max_pixels: int) -> str:
    p = data["probe"]
    if p is None:
        return (
            "<h2>Findability</h2><p class='note'>not probed: <code>--probe N</code> searches "
            "the context for N random images with their own files (N find calls)</p>"
        )
    o = p["outcomes"]
    lost = p["not_finding_themselves"]
    others = [x for x in p["images"] if x["outcome"] in ("changed", "unreadable", "error")]
    return "".join(
        [
            f"<h2>Findability: a probe of {_e(p['asked'])} images</h2>",
            f"<p>{_e(o.get('found_first', 0))} find themselves first, "
            f"{_e(o.get('found_lower', 0))} rank lower, {_e(o.get('not_found', 0))} are not "
            f"found, {_e(o.get('changed', 0))} changed since their sync. "
            f"Cost: {_e(cost_note(data))}.</p>",
            f"<p class='bad'>The context refused the probe: {_e(p['error'])}</p>"
            if p["error"] is not None
            else "",
            "<p class='note'>stopped (a signal) before every picked image was searched</p>"
            if p["stopped"]
            else "",
            _chart(_probe_chart(p)) if p["find_calls"] else "",
            "<h3>Do not find themselves (might need feature updates)</h3>",
            _thumbs(
                folder,
                max_pixels,
                lost,
                lambda x: "not found" if x["rank"] is None else f"rank {x['rank']}",
            ),
            _table(
                ["image ID", "features", "rank", "similarity", "first result"],
                [
                    [
                        x["image_id"],
                        x["features_count"],
                        x["rank"] or "-",
                        x["similarity"],
                        x["top"]["image_id"] if x["top"] else "-",
                    ]
                    for x in lost
                ],
            ),
            "<h3>Not searched</h3>" if others else "",
            _table(["image ID", "why"], [[x["image_id"], x["reason"]] for x in others])
            if others
            else "",
        ]
    )


def _duplicates(data: dict[str, Any]) -> str:
    d = data["duplicates"]
    if d is None:
        return (
            "<h2>Near duplicates</h2><p class='note'>not asked: <code>--duplicates</code> asks "
            "the context (one call; the embedded context compares every pair of images)</p>"
        )
    title = f"<h2>Near duplicates at {_e(format(d['threshold'], 'g'))}% similarity</h2>"
    if d["error"] is not None:
        return f"{title}<p>not known: {_e(d['error'])}</p>"
    rows = [[", ".join(f"{m['image_id']} ({m['similarity']})" for m in g)] for g in d["groups"]]
    return (
        f"{title}<p class='note'>one find-duplicates call, {_e(format(d['seconds'], '.1f'))} s"
        "</p>" + _table(["group (similarity to the first)"], rows)
    )


# -- charts -------------------------------------------------------------------------------


def _figure(height: float = 3.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _chart(fig: Any) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img class='chart' src='{uri}' alt='chart'>"


def _features_chart(data: dict[str, Any]) -> Any:
    fig = _figure()
    ax = fig.add_subplot()
    bins = data["features"]["histogram"]
    ax.bar(
        [b["low"] for b in bins],
        [b["count"] for b in bins],
        width=[b["high"] - b["low"] for b in bins],
        align="edge",
        color="#4a7fb5",
        edgecolor="white",
    )
    ax.axvline(data["min_features"], color="#b00", linestyle="--", label="min_features")
    ax.set_xlabel("features per image")
    ax.set_ylabel("images")
    ax.legend()
    return fig


def _activity_chart(data: dict[str, Any]) -> Any:
    """Bars side by side per day, on a log scale: a first sync's thousands of adds and a
    handful of failures both show."""
    fig = _figure()
    ax = fig.add_subplot()
    days = data["activity"]
    keys = (("added", "#4a9a4a"), ("updated", "#4a7fb5"), ("deleted", "#888"), ("failed", "#b00"))
    width = 0.8 / len(keys)
    for n, (key, color) in enumerate(keys):
        x = [i - 0.4 + (n + 0.5) * width for i in range(len(days))]
        ax.bar(x, [d[key] for d in days], width=width, color=color, label=key)
    step = max(1, len(days) // 12)
    ticks = list(range(len(days)))[::step]
    ax.set_xticks(ticks, [days[i]["day"] for i in ticks])
    ax.set_xlim(-0.6, len(days) - 0.4)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylabel("per day (log scale)")
    ax.legend(ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    return fig


def _probe_chart(p: dict[str, Any]) -> Any:
    fig = _figure(2.5)
    ax = fig.add_subplot()
    sims = [x["similarity"] for x in p["images"] if x.get("similarity") is not None]
    ax.hist(sims, bins=20, range=(0, 100), color="#4a7fb5")
    ax.set_xlabel("similarity of each probed image to itself (0-100)")
    ax.set_ylabel("images")
    return fig
