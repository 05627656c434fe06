"""Render a :class:`~broker.core.report.UsageReport` as a terminal table, JSON, CSV or a
self-contained HTML page (inline CSS and SVG charts; no scripts, no network to view)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from typing import Any, Final

from broker.core.audit_events import format_time
from broker.core.escaping import csv_cell, visible
from broker.core.report import UsageReport

FORMATS: Final = ("table", "json", "csv", "html")


def _t(value: datetime | None) -> str:
    return "-" if value is None else format_time(value).replace(".000000Z", "Z")


def _short(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M")


def render(report: UsageReport, fmt: str) -> str:
    if fmt == "json":
        return render_json(report)
    if fmt == "csv":
        return render_csv(report)
    if fmt == "html":
        return render_html(report)
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

_CSS: Final = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.n{text-align:right} .muted{color:#777}
svg text{font-size:11px;fill:#333}
"""


def _html_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], numeric: Sequence[int] = ()
) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{escape(str(c))}</td>' if i in numeric else f"<td>{escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def svg_timeline(report: UsageReport) -> str:
    """A line per secret: uses per bucket over the window."""
    tl = report.timeline
    if not tl.starts or not tl.series:
        return '<p class="muted">no uses in the window</p>'
    width, height, left, bottom, top, legend_w = 760, 260, 40, 40, 10, 160
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
        f'<text x="{left - 5}" y="{top + 4}" text-anchor="end">{peak}</text>',
        f'<text x="{left - 5}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
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
        f"uses per {tl.bucket}</text></svg>"
    )
    return "".join(parts)


def svg_matrix(report: UsageReport) -> str:
    """A DAG x secret heat map of uses in the window."""
    dags = list(report.matrix)
    secrets = sorted({s for row in report.matrix.values() for s in row})
    if not dags or not secrets:
        return '<p class="muted">no uses in the window</p>'
    cell, left, top = 44, 10 + 7 * max(len(d) for d in dags), 10 + 7 * max(len(s) for s in secrets)
    width, height = left + cell * len(secrets) + 10, top + cell * len(dags) + 10
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


def render_html(report: UsageReport) -> str:
    t = report.totals
    f = report.filters
    active = ", ".join(f"{k}={v}" for k, v in f.model_dump().items() if v is not None)
    sections = [
        f"<h1>Secret usage report</h1><p>Window {escape(_window(report))}"
        + (f"; filters: {escape(active)}" if active else "")
        + "</p>",
        f"<p>Launches requested {t.launches_requested}, allowed {t.launches_allowed}, denied "
        f"{t.launches_denied}. Secret uses {t.secret_uses} ({t.distinct_secrets} secrets, "
        f"{t.distinct_dags} DAGs). Unused grant secrets {t.unused_grant_secrets}. First-time "
        f"uses {t.first_time_uses}.</p>",
        "<h2>Uses over time per secret</h2>",
        svg_timeline(report),
        "<h2>DAG &times; secret</h2>",
        svg_matrix(report),
        "<h2>Usage per secret</h2>",
        _html_table(
            ["secret", "uses", "DAGs", "tasks", "images", "first use", "last use"],
            [
                [
                    s.secret,
                    s.uses,
                    ", ".join(s.dags),
                    ", ".join(f"{x.dag_id}.{x.task_id}" for x in s.tasks),
                    ", ".join(s.images),
                    _t(s.first_use),
                    _t(s.last_use),
                ]
                for s in report.secrets
            ],
            [1],
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
                    ", ".join(f"{k}={v}" for k, v in d.secrets.items()),
                    ", ".join(d.tasks),
                ]
                for d in report.dags
            ],
            [1, 2, 3, 4],
        ),
        "<h2>Denials</h2>",
        _html_table(
            ["time", "DAG", "task", "run", "caller", "count", "denied", "reasons"],
            [
                [
                    _t(n.time),
                    n.dag_id or "",
                    n.task_id or "",
                    n.run_id or "",
                    n.caller or "",
                    n.count,
                    ", ".join(n.denied),
                    "; ".join(n.reasons),
                ]
                for n in report.denials
            ],
            [5],
        ),
        "<h2>Unused grants (proposed removals)</h2>",
        _html_table(
            ["team", "grant", "DAGs", "tasks", "unused", "used", "proposal"],
            [
                [
                    g.team,
                    g.grant_id,
                    g.dag_glob,
                    g.task_glob or "*",
                    ", ".join(g.unused_secrets),
                    ", ".join(g.used_secrets),
                    g.proposal,
                ]
                for g in report.unused_grants
            ],
        ),
        "<h2>First-time uses</h2>",
        _html_table(
            ["time", "DAG", "task", "secret", "launch"],
            [
                [_t(u.time), u.dag_id, u.task_id or "", u.secret, u.launch_id or ""]
                for u in report.first_time_uses
            ],
        ),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>podbroker secret usage</title>"
        f"<style>{_CSS}</style></head><body>" + "\n".join(sections) + "</body></html>\n"
    )
