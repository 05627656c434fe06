"""DAGs of tests/e2e/test_airflow_leak_guard.py: tasks whose pods print the values issued
to them (the test makes every pod of its namespace print them). The test's own broker
grants ``leaky-app`` to ``leak_guard_e2e*``; the other brokers know no such secret."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_plugin.operator import BrokerPodOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")
RUN_DURATION = "kwok.podbroker.dev/run-duration"

# Blocking: the log is followed while the pod runs.
with DAG("leak_guard_e2e_follow", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="print_password",
        image="python:3.12-slim",
        secrets=["leaky-app"],
        annotations={RUN_DURATION: "4s"},
        poll_interval=0.5,
    )

# Deferrable: the log is read once, on resume, after the pod ended and its Secret went.
with DAG("leak_guard_e2e_deferred", schedule=None, start_date=START, catchup=False):
    BrokerPodOperator(
        task_id="print_password",
        image="python:3.12-slim",
        secrets=["leaky-app"],
        annotations={RUN_DURATION: "2s"},
        deferrable=True,
        poll_interval=0.5,
    )
