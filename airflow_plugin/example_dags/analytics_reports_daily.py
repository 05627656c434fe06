"""Example: env and file secrets in one task. ``upload_report`` gets the reports bucket
keys as ``S3_*`` variables (grant analytics/reports-upload) and the Tableau token as a
read-only file (grant analytics/dashboards allows file delivery only)."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_plugin.operator import BrokerPodOperator
from airflow_plugin.secrets import env_secret, file_secret

with DAG(
    "analytics_reports_daily",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["podbroker", "example"],
):
    BrokerPodOperator(
        task_id="upload_report",
        image="ghcr.io/example/reports:2.0",
        cmds=["python", "-m", "reports.publish", "--day", "{{ ds }}"],
        secrets=[
            env_secret("s3-reports", prefix="S3_"),
            file_secret("tableau-token", mount_path="/var/run/secrets/tableau"),
        ],
    )
