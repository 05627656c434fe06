"""Example of a denial: an analytics ETL task asks for the payment provider's API key,
which no grant gives to analytics DAGs. The broker refuses (403) before anything is
created in Kubernetes; the task fails once, without retries, naming ``payments-api``.
``podbroker policies check-dags`` reports the same before deployment."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_plugin.operator import BrokerPodOperator

with DAG(
    "analytics_etl_payments_peek",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["podbroker", "example", "expect-denied"],
):
    BrokerPodOperator(
        task_id="peek_payments",
        image="ghcr.io/example/etl:1.4",
        secrets=["warehouse-readonly", "payments-api"],
        retries=3,
        retry_delay=timedelta(seconds=30),
    )
