"""Injection into the real broker's outputs (issue 12, item 7): report CSV cells cannot
start a spreadsheet formula, text that passes input validation cannot forge lines of
the table report or of the plain-text log, and ``serve --log-format json`` writes one
JSON object per line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import httpx
import pytest
from kubernetes import client

from podbroker_devstack.broker_env import (
    AIRFLOW_NAMESPACE,
    TOKEN_AUDIENCE,
    BrokerHandle,
    start_broker,
)
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


# Characters input validation lets through (they are not control characters) that still
# break or reorder a line where they are shown: line and paragraph separators (Python's
# splitlines, editors, JavaScript), a bidi override (the row reads backwards), a BOM.
LINE_BREAKERS = "\u2028\u2029\u202e\ufeff"


def assert_neutralised(text: str, forged: str) -> None:
    """No raw line breaker in ``text``, no line of it starting with the forged record,
    and the forged text there in escaped form."""
    assert not any(ch in text for ch in LINE_BREAKERS), [c for c in LINE_BREAKERS if c in text]
    assert not any(line.lstrip().startswith(forged) for line in text.splitlines())
    assert f"\\u2028{forged}" in text


def test_what_validation_lets_through_cannot_forge_the_table_report_or_the_text_log(
    broker: BrokerHandle, kube: ControlPlane, kube_api: client.ApiClient, unique: str
) -> None:
    """Control characters (C0, DEL, C1: newline, CR, ESC, NEL) are refused with 422 at
    the door (test_broker_input_limits, on SQLite and PostgreSQL). Line separators, a
    bidi override and a BOM are not control characters: they pass in an image name, a
    resource name and a report filter, and reach the table report and the broker's
    plain-text log (the text of a 422 quotes the resource name). There they are written
    out visibly, so they cannot start a forged line."""
    forged = f"2026-01-01T00:00:00Z  forged-{unique}"
    dag_id = f"analytics_etl_forge{unique}"
    answer = httpx.post(
        f"{broker.url}/v1/launches",
        headers=broker.headers(),
        timeout=30,
        json={
            "task": {"dag_id": dag_id, "task_id": "load", "run_id": "r1"},
            "container": {"image": f"python:3.12-slim\u2028{forged}\u2029\u202e{unique}\ufeff"},
            "secrets": ["warehouse-readonly"],
            "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "1s"}},
        },
    )
    assert answer.status_code == 201, answer.text
    table = report(broker, "table")
    assert f"\\u202e{unique}" in table  # the image, in the usage per secret
    assert_neutralised(table, forged)

    # A filter is echoed in the table's first line.
    answer = httpx.get(
        f"{broker.url}/v1/audit/report",
        params={"format": "table", "dag": f"{dag_id}\u2028{forged}\u202e"},
        headers=broker.headers(),
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert_neutralised(answer.text, forged)

    # A resource name that is no quantity: the 422's reason quotes it, and the refusal
    # is logged in plain text (at once: the first refusal of a caller that is new).
    account = f"forger-{unique}"
    client.CoreV1Api(kube_api).create_namespaced_service_account(
        AIRFLOW_NAMESPACE, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=account))
    )
    token = kube.mint_token(AIRFLOW_NAMESPACE, account, audiences=[TOKEN_AUDIENCE])
    refused = httpx.post(
        f"{broker.url}/v1/launches",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
        json={
            "task": {"dag_id": dag_id, "task_id": "load", "run_id": "r2"},
            "container": {
                "image": "python:3.12-slim",
                "resources": {"limits": {f"cpu\u2028{forged}\u202e\u2029": "x"}},
            },
        },
    )
    assert refused.status_code == 422, refused.text
    assert forged in refused.json()["reason"]
    log = Path(broker.log_path)
    assert eventually(lambda: f"\\u2028{forged}" in log.read_text(), timeout=20)
    assert_neutralised(log.read_text(), forged)


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
