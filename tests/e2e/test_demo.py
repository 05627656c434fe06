"""`make demo`'s main job (`podbroker-dev demo` from the repository root), end to end: its
own stack, the broker, every example DAG, the report. Planted values are marked PLANTED-,
so the whole output can be scanned."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.stack, pytest.mark.airflow]

PODBROKER_DEV = Path(sys.executable).parent / "podbroker-dev"
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_every_example_dag_and_reports(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    result = subprocess.run(
        [str(PODBROKER_DEV), "demo", "--demo-dir", str(demo_dir)],
        cwd=REPO_ROOT,  # as `make demo`: repository paths default to the current directory
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for line in (
        "ok analytics_etl_daily",
        "ok analytics_reports_daily",
        "ok ml_score_nightly",
        "ok analytics_etl_payments_peek",
        "denied: secrets not granted: payments-api",
        "extract_orders=success, load_warehouse=success",
        "Unused grants (proposed removals)",
        "task verification: enforce",
    ):
        assert line in output, line
    report = (demo_dir / "podbroker-usage-report.html").read_text()
    assert "orders-db" in report
    assert "<script" not in report
    airflow_logs = [p.read_text() for p in demo_dir.glob("airflow-*.log")]
    assert len(airflow_logs) == 4
    assert all("PLANTED-" not in text for text in [output, report, *airflow_logs])
