"""KubernetesPodOperator features of BrokerPodOperator end to end (issue 13): real
`airflow dags test` runs of tests/dags/kpo_parity_dags.py against the real broker,
OpenBao and control plane. kwok runs no container: a pod annotation stands for what the
task would have written to /dev/termination-log (the kwok stage copies it into the
container's terminated state, as the kubelet copies the file)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from kubernetes import client

from podbroker_devstack.broker_env import DEMO_POD_LOG, BrokerHandle
from tests.e2e.test_airflow_broker import (
    airflow_db,
    assert_no_planted_values,
    core,
    dags_test,
    env,
    everything_airflow_kept,
    latest_ti,
    objects_of,
    operator_lines,
    xcom_of,
)

pytestmark = [pytest.mark.stack, pytest.mark.airflow]

__all__ = ["core", "env"]  # the module fixture: Airflow's environment and the podbroker connection


def test_exit_code_in_skip_on_exit_code_skips_the_task(
    env: dict[str, str], broker: BrokerHandle
) -> None:
    result = dags_test(env, "analytics_etl_e2e_skip")
    output = result.stdout + result.stderr
    ti = latest_ti(env, "analytics_etl_e2e_skip")
    assert ti["state"] == "skipped", operator_lines(output)
    assert "exited with code 3 (skip_on_exit_code)" in output
    assert_no_planted_values(broker, output)


def test_no_termination_message_pushes_no_return_value(
    env: dict[str, str], broker: BrokerHandle
) -> None:
    result = dags_test(env, "analytics_etl_e2e_no_result")
    output = result.stdout + result.stderr
    ti = latest_ti(env, "analytics_etl_e2e_no_result")
    assert ti["state"] == "success", operator_lines(output)
    xcom = xcom_of(env, ti)
    assert xcom["launch_id"]
    assert "return_value" not in xcom
    assert "no return_value pushed" in output
    # The deadline is explicit and logged: no execution_timeout, so the broker's maximum.
    assert "after 604800s (default: 7 days, the broker's maximum)" in output


def test_deferred_task_shows_the_log_while_running(
    env: dict[str, str], broker: BrokerHandle
) -> None:
    result = dags_test(env, "ml_score_e2e_logging_interval")
    output = result.stdout + result.stderr
    ti = latest_ti(env, "ml_score_e2e_logging_interval")
    assert ti["state"] == "success", operator_lines(output)
    # Deferred more than once: the trigger fired "running" and the task deferred again.
    assert output.count("running trigger in line") >= 2, operator_lines(output)
    pod_lines = [line for line in output.splitlines() if "[pod]" in line]
    for line in DEMO_POD_LOG:
        # Each line once: later rounds resume after the last timestamp shown.
        assert sum(line in shown for shown in pod_lines) == 1, operator_lines(output)
    assert_no_planted_values(broker, output)


def test_termination_message_is_pushed_as_return_value(
    env: dict[str, str], broker: BrokerHandle
) -> None:
    result = dags_test(env, "analytics_etl_e2e_result")
    output = result.stdout + result.stderr
    ti = latest_ti(env, "analytics_etl_e2e_result")
    assert ti["state"] == "success", operator_lines(output)
    xcom = xcom_of(env, ti)
    assert xcom["return_value"] == {"rows": 1200, "table": "orders"}
    assert "returning the task's termination message as return_value" in output
    assert_no_planted_values(broker, output)


def test_termination_message_with_an_issued_value_is_never_pushed(
    env: dict[str, str], broker: BrokerHandle
) -> None:
    password = broker.planted["analytics/warehouse-readonly"]["password"]
    leaky_env = {**env, "AIRFLOW_VAR_E2E_LEAK_SECRET": password}
    result = dags_test(leaky_env, "analytics_etl_e2e_result_leak")
    output = result.stdout + result.stderr
    ti = latest_ti(env, "analytics_etl_e2e_result_leak")
    assert ti["state"] == "failed", operator_lines(output)
    assert "was withheld by the broker" in output, operator_lines(output)
    xcom = xcom_of(env, ti)
    assert xcom["launch_id"]
    assert "return_value" not in xcom
    assert password not in json.dumps(xcom)
    # The broker audited the exposure (names only) where the report shows it.
    events = exposures(broker, xcom["launch_id"])
    assert [e["secret_names"] for e in events] == [["warehouse-readonly"]]
    assert events[0]["details"]["where"] == "termination_message"
    assert events[0]["details"]["on_exposure"] == "withhold"
    assert password not in json.dumps(events)


def exposures(broker: BrokerHandle, launch_id: str) -> list[dict[str, Any]]:
    """The launch's secret_exposed audit records, from the broker's own store."""
    with sqlite3.connect(broker.audit_url.removeprefix("sqlite:///")) as db:
        rows = db.execute(
            "SELECT event_json FROM audit_records WHERE launch_id = ? AND kind = ?",
            (launch_id, "secret_exposed"),
        ).fetchall()
    return [json.loads(row[0]) for row in rows]


def test_dry_run_shows_plan_and_decision_and_launches_nothing(
    env: dict[str, str], broker: BrokerHandle, core: client.CoreV1Api
) -> None:
    result = dags_test(env, "analytics_etl_e2e_dry_run")
    output = result.stdout + result.stderr
    ti = latest_ti(env, "analytics_etl_e2e_dry_run")
    assert ti["state"] == "success", operator_lines(output)
    plan = xcom_of(env, ti)["dry_run"]
    assert plan["dry_run"] is True
    assert plan["decision"]["allowed"] is True
    assert [read["name"] for read in plan["vault_reads"]] == ["warehouse-readonly"]
    assert "dry run: nothing launched" in output
    assert "policy decision: allowed" in output
    assert objects_of(core, broker.namespace, "analytics_etl_e2e_dry_run") == ([], [])
    assert_no_planted_values(broker, output, everything_airflow_kept(env))

    denied = dags_test(env, "analytics_etl_e2e_dry_run_denied")
    output = denied.stdout + denied.stderr
    ti = latest_ti(env, "analytics_etl_e2e_dry_run_denied")
    assert ti["state"] == "failed", operator_lines(output)
    assert "policy decision: DENIED" in output
    assert "would deny this launch: secrets not granted: payments-api" in output
    assert xcom_of(env, ti)["dry_run"]["decision"]["allowed"] is False


def test_task_broker_decorator_runs_the_returned_command_and_passes_the_result_on(
    env: dict[str, str], broker: BrokerHandle, core: client.CoreV1Api
) -> None:
    result = dags_test(env, "analytics_etl_e2e_decorated")
    output = result.stdout + result.stderr
    assert "e2e-decorated: reported 5 rows" in output, operator_lines(output)
    with airflow_db(env) as db:
        states = dict(
            db.execute(
                "SELECT task_id, state FROM task_instance WHERE dag_id = ?",
                ("analytics_etl_e2e_decorated",),
            ).fetchall()
        )
    assert states == {"pick_day": "success", "count_rows": "success", "report": "success"}
    pods = core.list_namespaced_pod(
        broker.namespace, label_selector="dag_id=analytics_etl_e2e_decorated"
    ).items
    assert len(pods) == 1  # on_finish_action="keep_pod"
    (container,) = [c for c in pods[0].spec.containers if c.name == "base"]
    assert container.command == ["python", "-m", "etl.count", "--day", "2026-01-01"]
    assert_no_planted_values(broker, output)


def test_termination_grace_period_reaches_the_pod(
    env: dict[str, str], broker: BrokerHandle, core: client.CoreV1Api
) -> None:
    result = dags_test(env, "analytics_etl_e2e_grace")
    output = result.stdout + result.stderr
    assert latest_ti(env, "analytics_etl_e2e_grace")["state"] == "success", operator_lines(output)
    pods = core.list_namespaced_pod(
        broker.namespace, label_selector="dag_id=analytics_etl_e2e_grace"
    ).items
    assert len(pods) == 1  # on_finish_action="keep_pod"
    assert pods[0].spec.termination_grace_period_seconds == 45


def test_a_pod_that_cannot_pull_its_image_fails_at_once_with_the_reason(
    env: dict[str, str], broker: BrokerHandle, core: client.CoreV1Api
) -> None:
    """ImagePullBackOff will not heal: the task fails without waiting for its 900 s
    startup timeout, saying why, and the pod is not left behind."""
    result = dags_test(env, "analytics_etl_e2e_image_pull")
    output = result.stdout + result.stderr
    assert latest_ti(env, "analytics_etl_e2e_image_pull")["state"] == "failed"
    assert "cannot start: ImagePullBackOff" in output, operator_lines(output)
    assert "registry.invalid/etl/load:missing" in output
    assert "not waiting for the startup timeout" in output
    pods = core.list_namespaced_pod(
        broker.namespace, label_selector="dag_id=analytics_etl_e2e_image_pull"
    ).items
    assert all(p.metadata.deletion_timestamp for p in pods)
    assert_no_planted_values(broker, output)


def test_an_unschedulable_pod_fails_after_the_schedule_timeout_showing_why(
    env: dict[str, str], broker: BrokerHandle
) -> None:
    """No node matches: the real scheduler's FailedScheduling reaches the task log and
    the task fails after its 5 s schedule timeout, not its 900 s startup timeout."""
    result = dags_test(env, "analytics_etl_e2e_unschedulable")
    output = result.stdout + result.stderr
    assert latest_ti(env, "analytics_etl_e2e_unschedulable")["state"] == "failed"
    assert "not scheduled after 5s (schedule_timeout_seconds)" in output, operator_lines(output)
    assert "FailedScheduling" in output or "unschedulable" in output.lower()
    assert_no_planted_values(broker, output)
