"""The HTML report in a real browser (issue 16 item 12): Debian's headless Chromium lays
out the page with few and with many data points, and nothing is wider than the window
(the denials table used to overflow). A test-only script, added to a copy of the page
(the report itself carries none), measures the layout and writes it into the DOM that
``--dump-dom`` prints. Skipped, with Chromium's own error, where it cannot start."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from broker.audit.render import render
from broker.core import audit_events as ev
from broker.core.models import TaskIdentity
from broker.core.report import GrantRef, UsageReport, compute_report

WIDTH, HEIGHT = 1280, 900
T0 = datetime(2026, 3, 2, tzinfo=UTC)

MEASURE = """<script>
addEventListener("load", () => {
  const view = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll("table, svg, p, h1, h2")]
    .filter(e => !e.closest(".scroll"))
    .filter(e => e.getBoundingClientRect().right > view + 1)
    .map(e => e.tagName + ":" + (e.textContent || "").slice(0, 40));
  const tables = [...document.querySelectorAll("table")]
    .filter(t => t.getBoundingClientRect().width > t.parentElement.clientWidth + 1)
    .map(t => t.querySelector("th").textContent);
  const out = document.createElement("pre");
  out.id = "layout";
  out.textContent = JSON.stringify({
    page: document.documentElement.scrollWidth, view, wide, tables,
    h1: document.querySelector("h1").getBoundingClientRect().height,
  });
  document.body.appendChild(out);
});
</script>"""


def chromium_args(profile: Path) -> list[str]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={WIDTH},{HEIGHT}",
    ]


def run_chromium(args: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        pytest.skip(f"chromium cannot start: {result.stderr.strip()[-500:]}")
    return result


def events_for(
    dags: int, secrets: int, days: int, denials: int, long_text: bool
) -> list[ev.AuditEvent]:
    events: list[ev.AuditEvent] = []
    names = [f"secret-{j:02d}" for j in range(secrets)]
    for i in range(dags):
        dag = f"analytics_etl_{i:02d}" + ("_with_a_rather_long_dag_name" if long_text else "")
        for day in range(days):
            task = TaskIdentity(dag_id=dag, task_id="load", run_id=f"scheduled__{i}_{day}")
            launch = f"L{i}-{day}"
            used = [names[(i + day + k) % secrets] for k in range(1 + (i + day) % 3)]
            when = T0 + timedelta(days=day, hours=i % 24)
            events.append(
                ev.secrets_resolved(
                    launch_id=launch,
                    caller="system:serviceaccount:airflow:worker",
                    task=task,
                    secrets=[{"name": n} for n in dict.fromkeys(used)],
                    time=when,
                )
            )
    for k in range(denials):
        run_id = f"manual__2026-03-02T10:{k % 60:02d}:00.123456+00:00" + (
            "_retry_after_a_very_long_suffix_that_does_not_break" * long_text
        )
        task = TaskIdentity(dag_id=f"payments_peek_{k}", task_id="peek", run_id=run_id)
        reason = f"no grant covers DAG payments_peek_{k} task peek for secret payments-api" + (
            "; grant payments/provider-sync requires image ghcr.io/example/payments-sync@sha256:*"
            * long_text
        )
        events.append(
            ev.decision(
                launch_id=f"D{k}",
                caller="system:serviceaccount:airflow-workers-with-a-long-namespace:worker",
                task=task,
                secret_names=["payments-api", "warehouse-readonly"],
                allowed=False,
                denied=["payments-api"],
                reasons=[reason],
                time=T0 + timedelta(hours=k),
            )
        )
    return events


def few_points() -> UsageReport:
    grants = [GrantRef("analytics/warehouse-etl", "analytics", "analytics_etl_*", None, ("s",))]
    return compute_report(
        events_for(dags=1, secrets=1, days=1, denials=1, long_text=False),
        grants,
        window_start=T0,
        window_end=T0 + timedelta(days=1),
    )


def many_points() -> UsageReport:
    grants = [
        GrantRef(f"team-{k}/grant-{k}", f"team-{k}", f"dag_{k}_*", "task_*", ("unused-a", "b"))
        for k in range(15)
    ]
    return compute_report(
        events_for(dags=30, secrets=10, days=14, denials=40, long_text=True),
        grants,
        window_start=T0,
        window_end=T0 + timedelta(days=14),
    )


def layout_of(html: str, tmp_path: Path, name: str) -> dict[str, object]:
    page = tmp_path / f"{name}.html"
    page.write_text(html.replace("</body>", MEASURE + "</body>"))
    base = chromium_args(tmp_path / f"profile-{name}")
    dom = run_chromium([*base, "--dump-dom", page.as_uri()]).stdout
    match = re.search(r'<pre id="layout">(.*?)</pre>', dom, re.S)
    assert match, dom[-2000:]
    # Kept beside the test's files, to look at when a layout changes.
    run_chromium([*base, f"--screenshot={tmp_path / f'{name}.png'}", page.as_uri()])
    return dict(json.loads(match.group(1).replace("&quot;", '"')))


@pytest.mark.parametrize("name", ["few", "many"])
def test_the_report_fits_the_window(name: str, tmp_path: Path) -> None:
    report = few_points() if name == "few" else many_points()
    html = render(report, "html", policy_url_template="https://git.example/p/{team}.yaml")
    layout = layout_of(html, tmp_path, name)
    assert layout["wide"] == [] and layout["tables"] == [], layout
    assert layout["page"] == layout["view"], layout
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_few_points_say_so_instead_of_drawing_a_line() -> None:
    html = render(few_points(), "html")
    assert "Too few points for a line: 1 in the hour from 2026-03-02 00:00 UTC." in html
    assert "<polyline" not in html
    assert 'aria-label="uses per secret"' in html
    assert "Window: <strong>2026-03-02 00:00 to 2026-03-03 00:00 UTC</strong>" in html


def test_unused_grants_link_their_policy_file() -> None:
    plain = render(many_points(), "html")
    assert "<code>policies/teams/team-3.yaml</code>" in plain and "href=" not in plain
    linked = render(many_points(), "html", policy_url_template="https://git.example/{team}.yaml")
    assert '<a href="https://git.example/team-3.yaml"><code>policies/teams/team-3.yaml' in linked
