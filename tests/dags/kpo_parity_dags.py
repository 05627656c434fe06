"""DAGs of tests/e2e/test_airflow_kpo_parity.py (issue 13): KubernetesPodOperator
features on the real broker. kwok ends pods as the annotations say (exit code, run time,
and the termination message a real container would have written to /dev/termination-log,
see deploy/devstack/podbroker_devstack/kwok-stages.yaml)."""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import DAG, task

from airflow_plugin.operator import BrokerPodOperator
from airflow_plugin.secrets import file_secret

START = pendulum.datetime(2026, 1, 1, tz="UTC")
EXIT_CODE = "kwok.podbroker.dev/exit-code"
RUN_DURATION = "kwok.podbroker.dev/run-duration"
TERMINATION_MESSAGE = "kwok.podbroker.dev/termination-message"
WAITING_REASON = "kwok.podbroker.dev/waiting-reason"
WAITING_MESSAGE = "kwok.podbroker.dev/waiting-message"

with DAG("analytics_etl_e2e_skip", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="nothing_to_load",
        image="python:3.12-slim",
        secrets=["warehouse-readonly"],
        annotations={EXIT_CODE: "3"},
        skip_on_exit_code=[3, 4],
        poll_interval=0.5,
    )

with DAG("analytics_etl_e2e_no_result", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="count_rows",
        image="python:3.12-slim",
        secrets=["warehouse-readonly"],
        do_xcom_push=True,
        poll_interval=0.5,
    )

with DAG("ml_score_e2e_logging_interval", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="score_slowly",
        image="python:3.12-slim",
        secrets=[file_secret("feature-store", mount_path="/var/run/secrets/features")],
        annotations={RUN_DURATION: "6s"},
        deferrable=True,
        logging_interval=2,
        poll_interval=0.5,
    )

with DAG("analytics_etl_e2e_result", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="count_rows",
        image="python:3.12-slim",
        secrets=["warehouse-readonly"],
        annotations={TERMINATION_MESSAGE: '{"rows": 1200, "table": "orders"}'},
        do_xcom_push=True,
        poll_interval=0.5,
    )

# The task "writes" a value it was given into its result: the test passes a value the
# broker issued to this launch as an Airflow Variable (a *secret* name, so Airflow masks it
# in its own logs). A real task would read it from its env or files in the pod.
with DAG("analytics_etl_e2e_result_leak", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="count_rows_leaky",
        image="python:3.12-slim",
        secrets=["warehouse-readonly"],
        annotations={TERMINATION_MESSAGE: '{"rows": 1, "dsn": "{{ var.value.e2e_leak_secret }}"}'},
        do_xcom_push=True,
        poll_interval=0.5,
        retries=0,
    )

with DAG("analytics_etl_e2e_dry_run", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="plan_load",
        image="python:3.12-slim",
        secrets=["warehouse-readonly"],
        dry_run=True,
    )

with DAG("analytics_etl_e2e_dry_run_denied", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="plan_payout",
        image="python:3.12-slim",
        secrets=["payments-api"],
        dry_run=True,
        retries=0,
    )


with DAG("analytics_etl_e2e_decorated", schedule=None, start_date=START, catchup=False):

    @task
    def pick_day() -> str:
        return "2026-01-01"

    @task.broker(
        image="python:3.12-slim",
        secrets=["warehouse-readonly"],
        annotations={TERMINATION_MESSAGE: '{"rows": 5}'},
        on_finish_action="keep_pod",
        poll_interval=0.5,
    )
    def count_rows(day: str) -> list[str]:
        return ["python", "-m", "etl.count", "--day", day]

    @task
    def report(result: dict[str, Any]) -> None:
        if result != {"rows": 5}:
            raise ValueError(f"unexpected result {result!r}")
        print(f"e2e-decorated: reported {result['rows']} rows")

    report(count_rows(pick_day()))

with DAG("analytics_etl_e2e_grace", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="load_gracefully",
        image="python:3.12-slim",
        secrets=["warehouse-readonly"],
        termination_grace_period=45,
        on_finish_action="keep_pod",
        poll_interval=0.5,
    )

# Startup failures: long timeouts, so failing in seconds shows the task did not wait.
with DAG("analytics_etl_e2e_image_pull", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="load_missing_image",
        image="registry.invalid/etl/load:missing",
        secrets=["warehouse-readonly"],
        annotations={
            WAITING_REASON: "ImagePullBackOff",
            WAITING_MESSAGE: 'Back-off pulling image "registry.invalid/etl/load:missing"',
        },
        startup_timeout_seconds=900,
        poll_interval=0.5,
    )

with DAG("analytics_etl_e2e_unschedulable", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="load_nowhere",
        image="python:3.12-slim",
        secrets=["warehouse-readonly"],
        node_selector={"podbroker.dev/e2e-no-such-node": "true"},
        schedule_timeout_seconds=5,
        startup_timeout_seconds=900,
        poll_interval=0.5,
    )
