"""Injection into the real broker's outputs (issue 12, item 7): report CSV cells cannot
start a spreadsheet formula, ids with control characters cannot forge lines of the
table report, and ``serve --log-format json`` writes one JSON object per line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import httpx
import pytest

from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.procs import ManagedProcess
from podbroker_devstack.sources import SourceTree
from tests.helpers import eventually

pytestmark = pytest.mark.stack


def forge(broker: BrokerHandle, marker: str) -> None:
    """A request whose path, once decoded, holds a newline, a fake record and ESC
    (uvicorn's access log quotes it again; any line in the log must still be JSON)."""
    path = f"/v1/launches/x%0a2026-01-01%2000:00:00,000%20INFO%20{marker}%1b[2J"
    response = httpx.get(f"{broker.url}{path}", headers=broker.headers(), timeout=30)
    assert response.status_code in {404, 422}


def launch(broker: BrokerHandle, dag_id: str) -> httpx.Response:
    return httpx.post(
        f"{broker.url}/v1/launches",
        headers=broker.headers(),
        timeout=30,
        json={
            "task": {"dag_id": dag_id, "task_id": "load", "run_id": "r1"},
            "container": {"image": "python:3.12-slim"},
            "secrets": ["warehouse-readonly"],  # granted to analytics_etl_* only
            "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "1s"}},
        },
    )


def report(broker: BrokerHandle, fmt: str) -> str:
    response = httpx.get(
        f"{broker.url}/v1/audit/report",
        params={"format": fmt},
        headers=broker.headers(),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.text


def test_report_csv_cells_cannot_start_a_formula(broker: BrokerHandle, unique: str) -> None:
    # Airflow's own id rules allow a leading "-": a spreadsheet reads "-2-x" as a formula.
    dag_id = f"-2-{unique}"
    assert launch(broker, dag_id).status_code == 403
    rows = list(csv.reader(io.StringIO(report(broker, "csv"))))
    cells = [cell for row in rows for cell in row if unique in cell]
    assert cells, "the denied launch is in the report"
    assert f"'{dag_id}" in cells
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in cells), cells


def test_report_table_cannot_be_forged_by_control_characters(
    broker: BrokerHandle, unique: str
) -> None:
    dag_id = f"x{unique}\n2026-01-01T00:00:00Z  forged-{unique}  load\x1b[2J"
    answer = launch(broker, dag_id)
    if answer.status_code == 422:
        pytest.skip("control characters are refused at the door (issue 12, item 1)")
    assert answer.status_code == 403, answer.text
    table = report(broker, "table")
    assert "\x1b" not in table
    assert not any(line.startswith("2026-01-01T00:00:00Z") for line in table.splitlines())
    assert f"x{unique}\\x0a2026-01-01T00:00:00Z  forged-{unique}" in table


def test_log_format_json_writes_one_object_per_line(
    tmp_path: Path,
    kube: ControlPlane,
    own_vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
    unique: str,
) -> None:
    broker = start_broker(
        tmp_path / "broker", kube, own_vault, postgres, sources, task_namespace=f"log-{unique}"
    )
    try:
        # Same settings (logging.format defaults to text); the flag switches to JSON.
        broker.process.stop()
        json_log = tmp_path / "broker-json.log"
        broker.process = ManagedProcess(
            "podbroker",
            [*broker.process.argv, "--log-format", "json"],
            json_log,
            env=broker.process.env,
        ).start()
        broker.wait_ready()
        marker = f"forged-{unique}"
        forge(broker, marker)
        launched = httpx.post(
            f"{broker.url}/v1/launches",
            headers=broker.headers(),
            timeout=30,
            json={
                "task": {"dag_id": "analytics_etl_logs", "task_id": "load", "run_id": "r1"},
                "container": {"image": "python:3.12-slim"},
                "secrets": ["warehouse-readonly"],
                "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "1s"}},
            },
        )
        assert launched.status_code == 201, launched.text
        assert eventually(lambda: marker in json_log.read_text(), timeout=10)
        text = json_log.read_text()
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert entries
        for entry in entries:
            assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        # the access log line of that request, in the same JSON stream
        assert any(e["logger"] == "uvicorn.access" and marker in e["message"] for e in entries)
        for value in broker.planted_values():
            assert value not in text
    finally:
        broker.stop()
