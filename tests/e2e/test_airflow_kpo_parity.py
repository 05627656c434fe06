"""KubernetesPodOperator features of BrokerPodOperator end to end (issue 13): real
`airflow dags test` runs of tests/dags/kpo_parity_dags.py against the real broker,
OpenBao and control plane. The return value itself (a termination message) is covered by
unit tests only: kwok runs no container, so nothing writes /dev/termination-log here, and
this test checks the other half: nothing is pushed that the task did not write."""

from __future__ import annotations

import pytest

from podbroker_devstack.broker_env import DEMO_POD_LOG, BrokerHandle
from tests.e2e.test_airflow_broker import (
    assert_no_planted_values,
    dags_test,
    env,
    latest_ti,
    operator_lines,
    xcom_of,
)

pytestmark = [pytest.mark.stack, pytest.mark.airflow]

__all__ = ["env"]  # the module fixture: Airflow's environment and the podbroker connection


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
