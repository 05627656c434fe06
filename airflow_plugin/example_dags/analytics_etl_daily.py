"""Example: a daily warehouse ETL.

- ``extract_orders`` gets a fresh, short-lived PostgreSQL login for the orders database
  (dynamic credentials: grant analytics/orders-readonly, ``orders-db``), as PG* variables.
- ``load_warehouse`` gets the warehouse loader login as ``WH_*`` variables and the
  read-only login mapped to explicit names (grant analytics/warehouse-etl, env only).

Airflow never sees a value: the operator sends names; the broker writes the values
into a per-pod Secret that disappears with the pod."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_plugin.operator import BrokerPodOperator
from airflow_plugin.secrets import env_secret

with DAG(
    "analytics_etl_daily",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["podbroker", "example"],
):
    extract = BrokerPodOperator(
        task_id="extract_orders",
        image="ghcr.io/example/etl:1.4",
        cmds=["python", "-m", "etl.extract", "--day", "{{ ds }}"],
        secrets=[env_secret("orders-db", mapping={"username": "PGUSER", "password": "PGPASSWORD"})],
        env_vars={"PGHOST": "orders-db.internal", "PGDATABASE": "orders"},
    )
    load = BrokerPodOperator(
        task_id="load_warehouse",
        image="ghcr.io/example/etl:1.4",
        cmds=["python", "-m", "etl.load", "--day", "{{ ds }}"],
        secrets=[
            env_secret("warehouse-loader", prefix="WH_"),
            env_secret("warehouse-readonly", mapping={"password": "WH_READONLY_PASSWORD"}),
        ],
        container_resources={"requests": {"cpu": "500m", "memory": "512Mi"}},
    )
    extract >> load
