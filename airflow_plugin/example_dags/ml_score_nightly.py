"""Example: a deferrable scoring job. While the pod runs, the worker slot is free: the
triggerer polls the broker; the log is copied into the task log on resume. The feature
store credentials arrive as files (grant ml-platform/batch-scoring, file only)."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_plugin.operator import BrokerPodOperator
from airflow_plugin.secrets import file_secret

with DAG(
    "ml_score_nightly",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["podbroker", "example"],
):
    BrokerPodOperator(
        task_id="score",
        image="ghcr.io/example/scoring:0.9",
        cmds=["python", "-m", "scoring.batch"],
        arguments=["--model", "churn", "--day", "{{ ds }}"],
        secrets=[file_secret("feature-store", mount_path="/var/run/secrets/features")],
        deferrable=True,
        poll_interval=2,
    )
