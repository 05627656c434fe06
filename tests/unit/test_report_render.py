"""Rendering of the report: terminal table, JSON, CSV and self-contained HTML."""

from __future__ import annotations

import csv
import io
import json
import re

from broker.audit.render import CSV_COLUMNS, render
from broker.core import audit_events as ev
from broker.core.models import TaskIdentity
from broker.core.report import compute_report
from tests.unit.test_report import GRANTS, WINDOW, report, scenario


def test_html_is_self_contained_with_its_three_charts() -> None:
    html = render(report(), "html")
    assert html.startswith("<!DOCTYPE html>")
    assert html.count("<svg") == 3
    assert 'aria-label="uses per secret"' in html
    assert 'aria-label="uses over time per secret"' in html
    assert 'aria-label="DAG by secret matrix"' in html
    assert "<polyline" in html and "<rect" in html
    # Nothing to fetch: no scripts, stylesheets, images or any URL.
    for needle in ("<script", "<link", "<img", "src=", "href=", "http:", "https:", "url("):
        assert needle not in html.lower()


def test_html_escapes_names() -> None:
    # The API refuses such ids now; records written before it did still render safely.
    t = TaskIdentity.model_construct(dag_id="<b>dag</b>", task_id="t&x", run_id="r")
    events = [
        ev.secrets_resolved(
            launch_id="L", caller="c", task=t, secrets=[{"name": "db"}], time=WINDOW[0]
        )
    ]
    html = render(compute_report(events, window_start=WINDOW[0], window_end=WINDOW[1]), "html")
    assert "<b>dag</b>" not in html
    assert "&lt;b&gt;dag&lt;/b&gt;" in html


def test_csv_rows_per_section() -> None:
    rows = list(csv.DictReader(io.StringIO(render(report(), "csv"))))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    sections = [r["section"] for r in rows]
    assert sections.count("secret_usage") == 4
    assert sections.count("dag_usage") == 4
    assert sections.count("denial") == 2
    assert sections.count("unused_grant") == 2
    assert sections.count("first_use") == 4
    warehouse = next(
        r for r in rows if r["section"] == "secret_usage" and r["secret"] == "warehouse"
    )
    assert warehouse["count"] == "4"
    assert warehouse["first"] == "2026-03-01T10:00:00Z"


def test_table_lists_every_section() -> None:
    text = render(report(), "table")
    for title in (
        "Usage per secret",
        "Usage per DAG",
        "Denials",
        "Unused grants (proposed removals)",
        "First-time uses",
    ):
        assert title in text
    assert re.search(r"^warehouse\s+4\s+etl_orders, etl_users", text, re.M)
    assert "remove grant ml/legacy" in text


def test_json_format_round_trips() -> None:
    data = json.loads(render(report(), "json"))
    assert data["totals"]["launches_denied"] == 2
    assert {g["grant_id"] for g in data["unused_grants"]} == {"ml/train", "ml/legacy"}


def test_empty_report_renders() -> None:
    empty = compute_report([], GRANTS[:1])
    for fmt in ("table", "json", "csv", "html"):
        assert render(empty, fmt)
    assert "no uses in the window" in render(empty, "html")
    assert len(scenario()) > 0


def test_csv_cells_cannot_start_a_formula() -> None:
    hostile = compute_report(
        [
            ev.secrets_resolved(
                launch_id="L",
                caller="c",
                task=TaskIdentity.model_construct(  # ids stored before they were validated
                    dag_id='=HYPERLINK("http://x","y")', task_id="+t", run_id="r"
                ),
                secrets=[{"name": "@SUM(A1)"}],
                time=WINDOW[0],
            )
        ],
        window_start=WINDOW[0],
        window_end=WINDOW[1],
    )
    rows = list(csv.reader(io.StringIO(render(hostile, "csv"))))
    cells = [cell for row in rows[1:] for cell in row]
    assert cells, rows
    for cell in cells:
        assert not cell.startswith(("=", "+", "@", "\t", "\r")), cell
        assert not (cell.startswith("-") and cell != "-" and not cell[1:].isdigit()), cell
    assert '\'=HYPERLINK("http://x","y")' in cells
    assert "'@SUM(A1)" in cells


def test_control_characters_cannot_forge_table_lines() -> None:
    forged = "d\n2026-03-01T10:00:00Z  admin  ok\x1b[2J"
    t = TaskIdentity.model_construct(dag_id=forged, task_id="t", run_id="r")  # an old record
    events = [
        ev.secrets_resolved(
            launch_id="L", caller="c", task=t, secrets=[{"name": "db\r"}], time=WINDOW[0]
        )
    ]
    report_ = compute_report(events, window_start=WINDOW[0], window_end=WINDOW[1])
    text = render(report_, "table")
    assert "\x1b" not in text and "\r" not in text
    assert not any(line.startswith("2026-03-01T10:00:00Z  admin") for line in text.splitlines())
    assert "d\\x0a2026-03-01T10:00:00Z  admin  ok\\x1b[2J" in text
    assert "db\\x0d" in text
    for fmt in ("csv", "table"):
        assert "\x1b" not in render(report_, fmt)


def test_exposures_show_in_the_table_and_html_reports() -> None:
    task = TaskIdentity(dag_id="etl_daily", task_id="load", run_id="run-x")
    exposed = ev.launch_event(
        ev.EventKind.SECRET_EXPOSED,
        launch_id="x1",
        task=task,
        secret_names=["warehouse"],
        grant="analytics/etl",
        on_exposure="revoke",
        revoked=True,
        time=WINDOW[0].replace(day=3),
    )
    result = compute_report(
        [*scenario(), exposed], GRANTS, window_start=WINDOW[0], window_end=WINDOW[1]
    )
    assert [(x.secret, x.revoked) for x in result.exposures] == [("warehouse", True)]
    table = render(result, "table")
    section = table.split("Exposures", 1)[1].split("Unused grants", 1)[0]
    assert "warehouse" in section and "etl_daily" in section and "revoke" in section
    html = render(result, "html")
    exposures_html = html.split("<h2>Exposures</h2>", 1)[1].split("<h2>", 1)[0]
    assert "warehouse" in exposures_html and "etl_daily / load" in exposures_html
