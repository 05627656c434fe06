"""DAGs run by tests/e2e/test_airflow_*.py with `airflow dags test` against the real
broker. DAG ids match the example policies in policies/ (analytics_etl_* may have the
warehouse secrets with env delivery; ml_score_* may have feature-store as files;
nothing grants payments-api to analytics; payments_provider_sync may have it, in the
pinned image only)."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG, task

from airflow_plugin.operator import BrokerPodOperator
from airflow_plugin.secrets import env_secret, file_secret

START = pendulum.datetime(2026, 1, 1, tz="UTC")
RUN_DURATION = "kwok.podbroker.dev/run-duration"

with DAG("analytics_etl_e2e_allowed", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="load_warehouse",
        image="python:3.12-slim",
        cmds=["python", "-m", "etl.load"],
        arguments=["--day", "{{ ds }}"],
        env_vars={"RUN_DAY": "{{ ds }}", "MODE": "full"},
        secrets=[env_secret("warehouse-loader", prefix="WH_"), "warehouse-readonly"],
        labels={"team": "analytics"},
        poll_interval=0.5,
    )

with DAG("analytics_etl_e2e_denied", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="peek_payments",
        image="python:3.12-slim",
        secrets=["warehouse-readonly", "payments-api"],
        retries=3,
        retry_delay=timedelta(seconds=1),
        poll_interval=0.5,
    )

with DAG("ml_score_e2e_deferred", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="score",
        image="python:3.12-slim",
        secrets=[file_secret("feature-store", mount_path="/var/run/secrets/features")],
        deferrable=True,
        poll_interval=0.5,
    )

with DAG("analytics_etl_e2e_slow", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="load_slowly",
        image="python:3.12-slim",
        secrets=[env_secret("warehouse-loader", prefix="WH_")],
        annotations={RUN_DURATION: "300s"},
        on_finish_action="keep_pod",
        poll_interval=0.5,
    )

with DAG("analytics_etl_verify_e2e_quick", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="load_verified",
        image="python:3.12-slim",
        secrets=["warehouse-readonly"],
        poll_interval=0.5,
    )

with DAG("analytics_etl_verify_e2e_long", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="extract_orders",
        image="python:3.12-slim",
        secrets=["orders-db"],
        annotations={RUN_DURATION: "300s"},
        poll_interval=0.5,
    )

with DAG("analytics_etl_verify_e2e_paged", schedule=None, start_date=START, catchup=False):
    # Four task instances of one task (map indexes 0-3), the last one long: the broker's
    # reconciler, asking Airflow 2 per page, finds that running launch on a later page.
    BrokerPodOperator.partial(
        task_id="load_part",
        image="python:3.12-slim",
        secrets=["warehouse-readonly"],
        poll_interval=0.5,
    ).expand(annotations=[{}, {}, {}, {RUN_DURATION: "300s"}])

RELEASE_FILE = "PODBROKER_E2E_RELEASE_FILE"


with DAG("payments_provider_sync", schedule=None, start_date=START, catchup=False):

    @task(task_id="sync_provider")
    def wait_for_release() -> None:
        """Runs (Airflow: running) without launching anything until the file named by
        $PODBROKER_E2E_RELEASE_FILE exists: a genuine running task instance the tests
        launch for by hand."""
        release = os.environ.get(RELEASE_FILE)
        deadline = time.monotonic() + 600
        while release and not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.2)

    wait_for_release()
