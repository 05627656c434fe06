"""Render a :class:`~broker.core.report.UsageReport` as a terminal table, JSON, CSV or a
self-contained HTML page (inline CSS and SVG charts; no scripts, no network to view)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from typing import Any, Final
from urllib.parse import quote

from broker.core.audit_events import format_time
from broker.core.escaping import csv_cell, visible
from broker.core.report import UsageReport

FORMATS: Final = ("table", "json", "csv", "html")


def _t(value: datetime | None) -> str:
    return "-" if value is None else format_time(value).replace(".000000Z", "Z")


def _short(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M")


def render(report: UsageReport, fmt: str, *, policy_url_template: str | None = None) -> str:
    """``report`` in ``fmt``; ``policy_url_template`` links the HTML's unused grants to
    their policy files (see :func:`policy_file_link`)."""
    if fmt == "json":
        return render_json(report)
    if fmt == "csv":
        return render_csv(report)
    if fmt == "html":
        return render_html(report, policy_url_template=policy_url_template)
    if fmt == "table":
        return render_table(report)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def render_json(report: UsageReport) -> str:
    return report.model_dump_json(indent=2) + "\n"


# -- terminal table --------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    # Ids come from callers: a control character must not forge a line or drive the terminal.
    cells = [[visible(str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line.rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return out


def _window(report: UsageReport) -> str:
    return f"{_t(report.window_start)} .. {_t(report.window_end)}"


def render_table(report: UsageReport) -> str:
    f = report.filters
    active = visible(", ".join(f"{k}={v}" for k, v in f.model_dump().items() if v is not None))
    t = report.totals
    lines = [
        f"Secret usage report  window {_window(report)}"
        + (f"  filters: {active}" if active else ""),
        f"launches requested {t.launches_requested}, allowed {t.launches_allowed}, "
        f"denied {t.launches_denied}; secret uses {t.secret_uses} "
        f"({t.distinct_secrets} secrets, {t.distinct_dags} DAGs)",
        "",
        "Usage per secret",
    ]
    lines += (
        _table(
            ["secret", "uses", "dags", "tasks", "images", "first use", "last use"],
            [
                [
                    s.secret,
                    s.uses,
                    ", ".join(s.dags),
                    len(s.tasks),
                    ", ".join(s.images),
                    _t(s.first_use),
                    _t(s.last_use),
                ]
                for s in report.secrets
            ],
        )
        or []
    )
    lines += ["", "Usage per DAG"]
    lines += _table(
        ["dag", "requested", "allowed", "denied", "secret uses", "secrets"],
        [
            [
                d.dag_id,
                d.launches_requested,
                d.launches_allowed,
                d.launches_denied,
                d.secret_uses,
                ", ".join(f"{k}={v}" for k, v in d.secrets.items()),
            ]
            for d in report.dags
        ],
    )
    lines += ["", "Denials"]
    lines += _table(
        ["time", "dag", "task", "count", "denied", "reasons"],
        [
            [
                _t(d.time),
                d.dag_id or "-",
                d.task_id or "-",
                d.count,
                ", ".join(d.denied),
                "; ".join(d.reasons),
            ]
            for d in report.denials
        ],
    )
    lines += ["", "Exposures (issued values seen in a task's log, masked there)"]
    lines += _table(
        ["time", "secret", "dag", "task", "action", "revoked"],
        [
            [
                _t(x.time),
                x.secret,
                x.dag_id or "-",
                x.task_id or "-",
                x.on_exposure or "mask",
                "-" if x.revoked is None else ("yes" if x.revoked else "no"),
            ]
            for x in report.exposures
        ],
    )
    lines += ["", "Unused grants (proposed removals)"]
    lines += _table(
        ["team", "grant", "unused secrets", "proposal"],
        [
            [g.team, g.grant_id, ", ".join(g.unused_secrets), g.proposal]
            for g in report.unused_grants
        ],
    )
    lines += ["", "First-time uses"]
    lines += _table(
        ["time", "dag", "task", "secret"],
        [[_t(u.time), u.dag_id, u.task_id or "-", u.secret] for u in report.first_time_uses],
    )
    return "\n".join(lines) + "\n"


# -- CSV: one long table, a ``section`` column tells the rows apart ----------------------

CSV_COLUMNS: Final = (
    "section",
    "secret",
    "dag_id",
    "task_id",
    "team",
    "grant_id",
    "count",
    "first",
    "last",
    "detail",
)


class _SafeCsvWriter:
    """csv.writer whose text cells cannot start a spreadsheet formula (see csv_cell)."""

    def __init__(self, buf: io.StringIO) -> None:
        self._writer = csv.writer(buf, lineterminator="\n")

    def writerow(self, row: Iterable[Any]) -> None:
        self._writer.writerow([csv_cell(cell) for cell in row])


def render_csv(report: UsageReport) -> str:
    buf = io.StringIO()
    w = _SafeCsvWriter(buf)
    w.writerow(CSV_COLUMNS)
    for s in report.secrets:
        w.writerow(
            [
                "secret_usage",
                s.secret,
                ";".join(s.dags),
                ";".join(f"{x.dag_id}.{x.task_id}" for x in s.tasks),
                "",
                "",
                s.uses,
                _t(s.first_use),
                _t(s.last_use),
                "",
            ]
        )
    for d in report.dags:
        w.writerow(
            [
                "dag_usage",
                ";".join(d.secrets),
                d.dag_id,
                ";".join(d.tasks),
                "",
                "",
                d.secret_uses,
                _t(d.first_activity),
                _t(d.last_activity),
                f"requested={d.launches_requested};allowed={d.launches_allowed};"
                f"denied={d.launches_denied}",
            ]
        )
    for dag, row in report.matrix.items():
        for secret, count in row.items():
            w.writerow(["matrix", secret, dag, "", "", "", count, "", "", ""])
    for n in report.denials:
        w.writerow(
            [
                "denial",
                ";".join(n.denied),
                n.dag_id or "",
                n.task_id or "",
                "",
                "",
                n.count,
                _t(n.time),
                _t(n.time),
                "; ".join(n.reasons),
            ]
        )
    for g in report.unused_grants:
        w.writerow(
            [
                "unused_grant",
                ";".join(g.unused_secrets),
                g.dag_glob,
                g.task_glob or "",
                g.team,
                g.grant_id,
                len(g.unused_secrets),
                "",
                "",
                g.proposal,
            ]
        )
    for u in report.first_time_uses:
        w.writerow(
            [
                "first_use",
                u.secret,
                u.dag_id,
                u.task_id or "",
                "",
                "",
                1,
                _t(u.time),
                _t(u.time),
                u.launch_id or "",
            ]
        )
    return buf.getvalue()


# -- HTML ------------------------------------------------------------------------------

_PALETTE: Final = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
MIN_TIMELINE_BUCKETS: Final = 3
"""Fewer buckets with uses than this make no line worth drawing: a sentence says it."""

_CSS: Final = """
body{font-family:system-ui,sans-serif;margin:0 auto;padding:1.5em;max-width:80em;color:#222}
header{border-bottom:2px solid #1f77b4;margin-bottom:1em;padding-bottom:.5em}
header h1{margin:0 0 .2em} .window{font-size:1.15em;margin:.2em 0}
.filters{margin:.2em 0;color:#555}
.totals{display:flex;flex-wrap:wrap;gap:.6em;margin:1em 0}
.totals div{border:1px solid #ddd;border-radius:6px;padding:.4em .8em;min-width:7em}
.totals b{display:block;font-size:1.5em} .totals .warn b{color:#b42318}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.5em 0 1.5em;width:100%}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top;
overflow-wrap:break-word}
th{background:#f3f3f3;white-space:nowrap} td.n{text-align:right;white-space:nowrap}
td.t{white-space:nowrap} td.id{overflow-wrap:anywhere;min-width:8em}
.muted{color:#777} code{font-size:.95em}
svg text{font-size:11px;fill:#333}
"""


def _window_text(report: UsageReport) -> str:
    start, end = report.window_start, report.window_end
    if start is None and end is None:
        return "all recorded time"
    if end is None:
        return f"since {_short(start)} UTC" if start else "all recorded time"
    if start is None:
        return f"until {_short(end)} UTC"
    return f"{_short(start)} to {_short(end)} UTC"


def _cell(value: object, kind: str) -> str:
    """One cell: ``kind`` "n" (number), "t" (time, kept on one line), "id" (long
    identifiers, broken anywhere), "h" (HTML the caller escaped) or "" (text)."""
    if kind == "h":
        return f"<td>{value}</td>"
    css = f' class="{kind}"' if kind else ""
    return f"<td{css}>{escape(str(value))}</td>"


def _html_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    numeric: Sequence[int] = (),
    *,
    times: Sequence[int] = (),
    markup: Sequence[int] = (),
    ids: Sequence[int] = (),
) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    kinds = [
        "n"
        if i in numeric
        else "t"
        if i in times
        else "h"
        if i in markup
        else "id"
        if i in ids
        else ""
        for i in range(len(headers))
    ]
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(_cell(c, kinds[i]) for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


LIST_LIMIT: Final = 8
"""Names shown in one cell; the rest are counted (the JSON and CSV formats list all)."""


def _some(items: Sequence[str]) -> str:
    shown = ", ".join(items[:LIST_LIMIT])
    return shown if len(items) <= LIST_LIMIT else f"{shown} … and {len(items) - LIST_LIMIT} more"


def svg_uses_per_secret(report: UsageReport) -> str:
    """Horizontal bars: uses per secret in the window (reads well with one use)."""
    rows = sorted(report.secrets, key=lambda s: (-s.uses, s.secret))
    if not rows:
        return '<p class="muted">no uses in the window</p>'
    label_w = 12 + 7 * max(len(s.secret) for s in rows)
    bar_h, gap, plot_w = 18, 6, 420
    width, height = label_w + plot_w + 60, (bar_h + gap) * len(rows) + gap
    peak = max(s.uses for s in rows)
    parts = [
        f'<svg role="img" aria-label="uses per secret" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">'
    ]
    colors = {name: _PALETTE[k % len(_PALETTE)] for k, name in enumerate(report.timeline.series)}
    for i, s in enumerate(rows):
        y = gap + i * (bar_h + gap)
        w = max(2.0, plot_w * s.uses / peak)
        color = colors.get(s.secret, _PALETTE[0])
        parts.append(
            f'<text x="{label_w - 6}" y="{y + bar_h - 5}" text-anchor="end">'
            f"{escape(s.secret)}</text>"
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}">'
            f"<title>{escape(s.secret)}: {s.uses} use(s)</title></rect>"
            f'<text x="{label_w + w + 5:.1f}" y="{y + bar_h - 5}">{s.uses}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _ticks(peak: int) -> list[int]:
    """Whole-number y ticks: 0, the peak and at most three between."""
    step = max(1, -(-peak // 4))
    return [*range(0, peak, step), peak]


def svg_timeline(report: UsageReport) -> str:
    """A line per secret: uses per bucket over the window; with uses in fewer than
    MIN_TIMELINE_BUCKETS buckets, a sentence says when they happened instead."""
    tl = report.timeline
    if not tl.starts or not tl.series:
        return '<p class="muted">no uses in the window</p>'
    totals = [sum(row[i] for row in tl.series.values()) for i in range(len(tl.starts))]
    busy = [i for i, v in enumerate(totals) if v]
    if len(busy) < MIN_TIMELINE_BUCKETS:
        when = "; ".join(
            f"{totals[i]} in the {tl.bucket} from {_short(tl.starts[i])} UTC" for i in busy
        )
        return f'<p class="muted">Too few points for a line: {escape(when)}.</p>'
    width, height, left, bottom, top, legend_w = 820, 260, 40, 40, 10, 180
    plot_w, plot_h = width - left - legend_w - 10, height - bottom - top
    peak = max(max(v) for v in tl.series.values()) or 1
    n = len(tl.starts)

    def x(i: int) -> float:
        return left + (plot_w * (i + 0.5) / n)

    def y(v: int) -> float:
        return top + plot_h - plot_h * v / peak

    parts = [
        f'<svg role="img" aria-label="uses over time per secret" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="#999"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#999"/>',
    ]
    for tick in _ticks(peak):
        parts.append(
            f'<line x1="{left}" y1="{y(tick):.1f}" x2="{left + plot_w}" y2="{y(tick):.1f}" '
            f'stroke="#eee"/><text x="{left - 5}" y="{y(tick) + 4:.1f}" '
            f'text-anchor="end">{tick}</text>'
        )
    for i in sorted({0, n // 2, n - 1}):
        parts.append(
            f'<text x="{x(i):.1f}" y="{top + plot_h + 15}" text-anchor="middle">'
            f"{escape(_short(tl.starts[i]))}</text>"
        )
    for k, (secret, counts) in enumerate(tl.series.items()):
        color = _PALETTE[k % len(_PALETTE)]
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(counts))
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="2" '
            f'points="{points}"><title>{escape(secret)}</title></polyline>'
        )
        for i, v in enumerate(counts):
            if v:
                parts.append(
                    f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2.5" fill="{color}">'
                    f"<title>{escape(secret)}: {v} ({escape(_short(tl.starts[i]))})"
                    "</title></circle>"
                )
        ly = top + 14 * k + 8
        lx = left + plot_w + 15
        parts.append(
            f'<rect x="{lx}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
            f'<text x="{lx + 14}" y="{ly + 1}">{escape(secret)}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.0f}" y="{height - 5}" text-anchor="middle">'
        f"uses per {tl.bucket} (UTC)</text></svg>"
    )
    return "".join(parts)


def svg_matrix(report: UsageReport) -> str:
    """A DAG x secret heat map of uses in the window."""
    dags = list(report.matrix)
    secrets = sorted({s for row in report.matrix.values() for s in row})
    if not dags or not secrets:
        return '<p class="muted">no uses in the window</p>'
    longest = max(len(s) for s in secrets)
    cell, left, top = 44, 10 + 7 * max(len(d) for d in dags), 16 + 5 * longest
    # Column labels lean right by 45 degrees: room for the last one.
    width, height = left + cell * len(secrets) + 10 + 5 * longest, top + cell * len(dags) + 10
    peak = max(v for row in report.matrix.values() for v in row.values()) or 1
    parts = [
        f'<svg role="img" aria-label="DAG by secret matrix" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}">'
    ]
    for j, s in enumerate(secrets):
        cx = left + cell * j + cell / 2
        parts.append(
            f'<text x="{cx:.0f}" y="{top - 6}" transform="rotate(-45 {cx:.0f} '
            f'{top - 6})">{escape(s)}</text>'
        )
    for i, d in enumerate(dags):
        cy = top + cell * i
        parts.append(
            f'<text x="{left - 6}" y="{cy + cell / 2 + 4:.0f}" text-anchor="end">{escape(d)}</text>'
        )
        for j, s in enumerate(secrets):
            v = report.matrix[d].get(s, 0)
            shade = 0.08 + 0.92 * v / peak if v else 0.0
            fill = f"rgba(31,119,180,{shade:.2f})" if v else "#fafafa"
            parts.append(
                f'<rect x="{left + cell * j}" y="{cy}" width="{cell - 2}" '
                f'height="{cell - 2}" fill="{fill}" stroke="#ddd">'
                f"<title>{escape(d)} / {escape(s)}: {v}</title></rect>"
            )
            if v:
                parts.append(
                    f'<text x="{left + cell * j + cell / 2 - 1:.0f}" '
                    f'y="{cy + cell / 2 + 4:.0f}" text-anchor="middle">{v}</text>'
                )
    parts.append("</svg>")
    return "".join(parts)


def policy_file_link(team: str, grant_id: str, url_template: str | None) -> str:
    """HTML naming a grant's policy file: ``policies/teams/<team>.yaml`` as text, or a
    link from ``url_template`` (``{team}`` and ``{grant}`` filled in, URL-quoted)."""
    path = f"policies/teams/{team}.yaml"
    if not url_template:
        return f"<code>{escape(path)}</code>"
    grant = grant_id.partition("/")[2] or grant_id
    url = url_template.replace("{team}", quote(team, safe="")).replace(
        "{grant}", quote(grant, safe="")
    )
    return f'<a href="{escape(url, quote=True)}"><code>{escape(path)}</code></a>'


def _totals_html(report: UsageReport) -> str:
    t = report.totals
    items = [
        ("launches requested", t.launches_requested, False),
        ("allowed", t.launches_allowed, False),
        ("denied", t.launches_denied, t.launches_denied > 0),
        ("secret uses", t.secret_uses, False),
        ("secrets used", t.distinct_secrets, False),
        ("DAGs", t.distinct_dags, False),
        ("unused grant secrets", t.unused_grant_secrets, t.unused_grant_secrets > 0),
        ("first-time uses", t.first_time_uses, False),
        ("requests refused", t.requests_refused, t.requests_refused > 0),
    ]
    return (
        '<div class="totals">'
        + "".join(
            f"<div{' class=warn' if warn else ''}><b>{value}</b>{escape(label)}</div>"
            for label, value, warn in items
        )
        + "</div>"
    )


def render_html(report: UsageReport, *, policy_url_template: str | None = None) -> str:
    f = report.filters
    active = ", ".join(f"{k}={v}" for k, v in f.model_dump().items() if v is not None)
    window = _window_text(report)
    sections = [
        "<header><h1>Secret usage report</h1>"
        f'<p class="window">Window: <strong>{escape(window)}</strong></p>'
        + (f'<p class="filters">Filters: {escape(active)}</p>' if active else "")
        + f'<p class="muted">Exact bounds: {escape(_window(report))}</p></header>',
        _totals_html(report),
        "<h2>Uses per secret</h2>",
        svg_uses_per_secret(report),
        "<h2>Uses over time per secret</h2>",
        svg_timeline(report),
        "<h2>DAG &times; secret</h2>",
        f'<div class="scroll">{svg_matrix(report)}</div>',
        "<h2>Usage per secret</h2>",
        _html_table(
            ["secret", "uses", "DAGs", "tasks", "images", "first use", "last use"],
            [
                [
                    s.secret,
                    s.uses,
                    _some(s.dags),
                    _some([f"{x.dag_id}.{x.task_id}" for x in s.tasks]),
                    _some(s.images),
                    _t(s.first_use),
                    _t(s.last_use),
                ]
                for s in report.secrets
            ],
            [1],
            times=[5, 6],
            ids=[2, 3, 4],
        ),
        "<h2>Usage per DAG</h2>",
        _html_table(
            ["DAG", "requested", "allowed", "denied", "secret uses", "secrets", "tasks"],
            [
                [
                    d.dag_id,
                    d.launches_requested,
                    d.launches_allowed,
                    d.launches_denied,
                    d.secret_uses,
                    _some([f"{k}={v}" for k, v in d.secrets.items()]),
                    _some(d.tasks),
                ]
                for d in report.dags
            ],
            [1, 2, 3, 4],
            ids=[0],
        ),
        "<h2>Denials</h2>",
        _html_table(
            ["time", "DAG / task / run", "caller", "count", "denied", "reasons"],
            [
                [
                    _t(n.time),
                    " / ".join(x for x in (n.dag_id, n.task_id, n.run_id) if x) or "-",
                    n.caller or "",
                    n.count,
                    ", ".join(n.denied),
                    "; ".join(n.reasons),
                ]
                for n in report.denials
            ],
            [3],
            times=[0],
            ids=[1, 2],
        ),
        "<h2>Exposures</h2>",
        (
            '<p class="muted">Issued values that showed in a task\'s log stream; the broker '
            "masked them there.</p>"
            if report.exposures
            else ""
        ),
        _html_table(
            ["time", "secret", "DAG / task", "action", "revoked"],
            [
                [
                    _t(x.time),
                    x.secret,
                    " / ".join(v for v in (x.dag_id, x.task_id) if v) or "-",
                    x.on_exposure or "mask",
                    "-" if x.revoked is None else ("yes" if x.revoked else "no"),
                ]
                for x in report.exposures
            ],
            [],
            times=[0],
            ids=[1, 2],
        ),
        "<h2>Unused grants (proposed removals)</h2>",
        (
            '<p class="muted">Apply them as a reviewed change: <code>podbroker audit report '
            "--format json &gt; report.json</code>, then <code>podbroker policies propose "
            "--from-report report.json policies/</code>.</p>"
            if report.unused_grants
            else ""
        ),
        _html_table(
            ["team", "grant", "policy file", "DAGs", "tasks", "unused", "used", "proposal"],
            [
                [
                    g.team,
                    g.grant_id,
                    policy_file_link(g.team, g.grant_id, policy_url_template),
                    g.dag_glob,
                    g.task_glob or "*",
                    ", ".join(g.unused_secrets),
                    ", ".join(g.used_secrets),
                    g.proposal,
                ]
                for g in report.unused_grants
            ],
            markup=[2],
            ids=[1, 3],
        ),
        "<h2>First-time uses</h2>",
        _html_table(
            ["time", "DAG", "task", "secret", "launch"],
            [
                [_t(u.time), u.dag_id, u.task_id or "", u.secret, u.launch_id or ""]
                for u in report.first_time_uses
            ],
            times=[0],
            ids=[1, 2, 4],
        ),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Secret usage report: {escape(window)}</title>"
        f"<style>{_CSS}</style></head><body>" + "\n".join(sections) + "</body></html>\n"
    )
