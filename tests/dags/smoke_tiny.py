"""The smallest DAG: proves Airflow itself runs in the test stack."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task


@dag(dag_id="smoke_tiny", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False)
def smoke_tiny() -> None:
    @task
    def add() -> int:
        value = 40 + 2
        print(f"smoke-tiny-ran-{value}")
        return value

    add()


smoke_tiny()
