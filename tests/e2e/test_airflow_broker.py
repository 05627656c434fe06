"""BrokerPodOperator end to end: real `airflow dags test` runs (tests/dags/
airflow_e2e_dags.py) against the real broker, OpenBao and control plane (the `broker`
fixture), with the example policies applied and PLANTED- values in Vault."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from podbroker_devstack.broker_env import DEMO_POD_LOG, BrokerHandle

pytestmark = [pytest.mark.stack, pytest.mark.airflow]

AIRFLOW = Path(sys.executable).parent / "airflow"


def with_connection(airflow_env: dict[str, str], broker: BrokerHandle) -> dict[str, str]:
    """Airflow's environment plus the podbroker connection to ``broker`` (its static
    dev token)."""
    conn = {
        "conn_type": "podbroker",
        "host": broker.url,
        "password": broker.token,
        "extra": {"namespace": broker.namespace, "timeout": 30},
    }
    return {**airflow_env, "AIRFLOW_CONN_PODBROKER_DEFAULT": json.dumps(conn)}


@pytest.fixture(scope="module")
def env(airflow_env: dict[str, str], broker: BrokerHandle) -> dict[str, str]:
    return with_connection(airflow_env, broker)


@pytest.fixture
def core(broker: BrokerHandle) -> Iterator[client.CoreV1Api]:
    with broker.kube.api_client() as api:
        yield client.CoreV1Api(api)


def dags_test(env: dict[str, str], dag_id: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(AIRFLOW), "dags", "test", dag_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def airflow_db(env: dict[str, str]) -> sqlite3.Connection:
    return sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db")


def latest_ti(env: dict[str, str], dag_id: str) -> dict[str, Any]:
    with airflow_db(env) as db:
        db.row_factory = sqlite3.Row
        row = db.execute(
            "SELECT ti.* FROM task_instance ti JOIN dag_run dr"
            " ON dr.dag_id = ti.dag_id AND dr.run_id = ti.run_id"
            " WHERE ti.dag_id = ? ORDER BY dr.id DESC LIMIT 1",
            (dag_id,),
        ).fetchone()
    assert row is not None, f"no task instance of {dag_id}"
    return dict(row)


def xcom_of(env: dict[str, str], ti: dict[str, Any]) -> dict[str, Any]:
    with airflow_db(env) as db:
        rows = db.execute(
            "SELECT key, value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = ?",
            (ti["dag_id"], ti["run_id"], ti["task_id"]),
        ).fetchall()
    return {key: json.loads(value) if isinstance(value, str) else value for key, value in rows}


def objects_of(core: client.CoreV1Api, namespace: str, dag_id: str) -> tuple[list[str], list[str]]:
    selector = f"dag_id={dag_id}"
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    secrets = core.list_namespaced_secret(namespace, label_selector=selector).items
    return [p.metadata.name for p in pods], [s.metadata.name for s in secrets]


def everything_airflow_kept(env: dict[str, str]) -> str:
    """Every byte Airflow stored: the metadata database dump and its log files."""
    with airflow_db(env) as db:
        parts = list(db.iterdump())
    logs = Path(env["AIRFLOW_HOME"]) / "logs"
    if logs.exists():
        parts += [p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file()]
    return "\n".join(parts)


def assert_no_planted_values(broker: BrokerHandle, *texts: str) -> None:
    planted = broker.planted_values()
    assert planted, "the broker fixture planted no values to look for"
    for text in texts:
        leaked = [v for v in planted if v in text]
        assert not leaked, f"{len(leaked)} planted secret value(s) reached the Airflow side"


def operator_lines(output: str) -> str:
    """The operator's own lines of a `dags test` output (for assertion messages)."""
    keep = ("[pod]", "launch", "log", "podbroker", "pod ")
    return "\n".join(line for line in output.splitlines() if any(k in line for k in keep))[-4000:]


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_allowed_task_succeeds_and_pod_log_reaches_the_task_log(
    env: dict[str, str], broker: BrokerHandle, core: client.CoreV1Api
) -> None:
    result = dags_test(env, "analytics_etl_e2e_allowed")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    ti = latest_ti(env, "analytics_etl_e2e_allowed")
    assert ti["state"] == "success", output[-5000:]
    for line in DEMO_POD_LOG:
        assert line in output, operator_lines(output)
    xcom = xcom_of(env, ti)
    assert xcom["launch_id"]
    assert xcom["pod_name"]
    # on_finish_action=delete_pod: neither the pod nor its Secret is left behind
    wait_for(
        lambda: objects_of(core, broker.namespace, "analytics_etl_e2e_allowed") == ([], []),
        "the finished pod and its Secret to be deleted",
    )
    assert_no_planted_values(broker, output, everything_airflow_kept(env))


def test_denied_task_fails_once_without_retry_and_creates_nothing(
    env: dict[str, str], broker: BrokerHandle, core: client.CoreV1Api
) -> None:
    result = dags_test(env, "analytics_etl_e2e_denied")
    output = result.stdout + result.stderr
    ti = latest_ti(env, "analytics_etl_e2e_denied")
    assert ti["state"] == "failed", output[-5000:]
    assert ti["try_number"] == 1  # retries=3 in the DAG, yet no second try
    assert "secrets not granted: payments-api" in output
    assert "warehouse-readonly" not in output.split("secrets not granted:")[1].splitlines()[0]
    assert objects_of(core, broker.namespace, "analytics_etl_e2e_denied") == ([], [])
    assert_no_planted_values(broker, output)


def test_deferrable_task_succeeds_through_the_trigger(
    env: dict[str, str], broker: BrokerHandle
) -> None:
    result = dags_test(env, "ml_score_e2e_deferred")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    ti = latest_ti(env, "ml_score_e2e_deferred")
    assert ti["state"] == "success", output[-5000:]
    assert "running trigger in line" in output  # it really deferred
    for line in DEMO_POD_LOG:
        assert line in output, operator_lines(output)  # fetched on resume
    assert xcom_of(env, ti)["launch_id"]
    assert_no_planted_values(broker, output, everything_airflow_kept(env))


def test_killing_a_running_task_removes_its_pod_and_secret(
    env: dict[str, str], broker: BrokerHandle, core: client.CoreV1Api, tmp_path: Path
) -> None:
    dag_id = "analytics_etl_e2e_slow"
    before = objects_of(core, broker.namespace, dag_id)[0]
    out_file = tmp_path / "dags-test.log"
    with out_file.open("w") as sink:
        process = subprocess.Popen(
            [str(AIRFLOW), "dags", "test", dag_id],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:

        def running_pod() -> bool:
            pods = core.list_namespaced_pod(broker.namespace, label_selector=f"dag_id={dag_id}")
            return any(
                p.metadata.name not in before and p.status.phase == "Running" for p in pods.items
            )

        wait_for(running_pod, "the slow task's pod to run", timeout=120)
        pods, secrets = objects_of(core, broker.namespace, dag_id)
        new_pods = [p for p in pods if p not in before]
        assert len(new_pods) == 1
        assert secrets, "the running pod should have its per-pod Secret"
        # The task process (in-process under `dags test`) holds no secret value.
        environ = Path(f"/proc/{process.pid}/environ").read_bytes().decode(errors="replace")
        assert_no_planted_values(broker, environ)

        process.send_signal(signal.SIGTERM)  # what Airflow does to a task it kills
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = out_file.read_text()
    assert "task killed: deleting launch" in output, output[-5000:]
    wait_for(
        lambda: not set(objects_of(core, broker.namespace, dag_id)[0]) & set(new_pods),
        "the killed task's pod to be deleted",
    )
    remaining_secrets = objects_of(core, broker.namespace, dag_id)[1]
    assert not set(remaining_secrets) & set(secrets)
    assert_no_planted_values(broker, output, everything_airflow_kept(env))


def test_projected_service_account_token_file_authenticates(
    env: dict[str, str], broker: BrokerHandle, tmp_path: Path
) -> None:
    """The in-cluster default: no password, a ServiceAccount token file (audience
    podbroker) that the broker checks with TokenReview."""
    from podbroker_devstack.broker_env import (
        AIRFLOW_NAMESPACE,
        TOKEN_AUDIENCE,
        WORKER_SERVICE_ACCOUNT,
    )

    token_file = tmp_path / "token"
    token_file.write_text(
        broker.kube.mint_token(
            AIRFLOW_NAMESPACE, WORKER_SERVICE_ACCOUNT, audiences=[TOKEN_AUDIENCE]
        )
    )
    conn = {
        "conn_type": "podbroker",
        "host": broker.url,
        "extra": {"token_file": str(token_file), "namespace": broker.namespace},
    }
    sa_env = {**env, "AIRFLOW_CONN_PODBROKER_DEFAULT": json.dumps(conn)}
    result = dags_test(sa_env, "analytics_etl_e2e_allowed")
    output = result.stdout + result.stderr
    assert result.returncode == 0, operator_lines(output)
    assert latest_ti(sa_env, "analytics_etl_e2e_allowed")["state"] == "success", output[-3000:]

    token_file.write_text("not-a-valid-token")  # read again on every call
    result = dags_test(sa_env, "analytics_etl_e2e_allowed")
    output = result.stdout + result.stderr
    assert latest_ti(sa_env, "analytics_etl_e2e_allowed")["state"] != "success"
    assert "401" in output, operator_lines(output)
