"""``@task.broker`` (issue 13 item 10): the decorated function's list of strings becomes
the pod's command (or its arguments with ``args_only``); everything else is
BrokerPodOperator's. Registered with Airflow through the provider metadata."""

from __future__ import annotations

import json
from typing import Any

import pendulum
import pytest
from airflow.sdk import DAG, task

from airflow_plugin.decorators import _BrokerDecoratedOperator, broker_task
from airflow_plugin.operator import BrokerPodOperator
from tests.unit.test_airflow_kpo_parity import WithMessage, conn_settings, ctx, wire

__all__ = ["conn_settings", "wire"]

START = pendulum.datetime(2026, 1, 1, tz="UTC")


def make(**kwargs: Any) -> _BrokerDecoratedOperator:
    with DAG("analytics_etl_decorated", schedule=None, start_date=START) as dag:

        @task.broker(image="busybox", secrets=["warehouse-loader"], poll_interval=0.01, **kwargs)
        def load(day: str, table: str = "orders") -> list[str]:
            return ["python", "-m", "etl.load", "--day", day, "--table", table]

        load("2026-01-01")
    (op,) = dag.tasks
    assert isinstance(op, _BrokerDecoratedOperator)
    return op


def sent(broker: Any) -> dict[str, Any]:
    post = next(r for r in broker.requests if r.method == "POST")
    return json.loads(post.content)  # type: ignore[no-any-return]


def test_task_broker_is_the_providers_decorator() -> None:
    assert task.broker is broker_task


def test_the_function_gives_the_command_and_the_result_is_returned(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(WithMessage(["Succeeded"], message='{"rows": 7}'))
    op = make(get_logs=False)
    assert isinstance(op, BrokerPodOperator)  # check-dags sees its secrets
    assert op.secret_names == ["warehouse-loader"]
    assert op.do_xcom_push is True  # TaskFlow: the return value is the task's
    assert op.execute(ctx()) == {"rows": 7}  # type: ignore[arg-type]
    container = sent(broker)["container"]
    assert container["command"] == [
        "python",
        "-m",
        "etl.load",
        "--day",
        "2026-01-01",
        "--table",
        "orders",
    ]
    assert container["args"] == []


def test_args_only_gives_the_entrypoints_arguments(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(WithMessage(["Succeeded"], message=None))
    make(args_only=True, get_logs=False).execute(ctx())  # type: ignore[arg-type]
    container = sent(broker)["container"]
    assert container["command"] == []
    assert container["args"][:2] == ["python", "-m"]


def test_cmds_are_refused() -> None:
    with pytest.raises(ValueError, match="takes its command from the decorated function"):
        make(cmds=["sh"])


def test_a_function_returning_no_list_of_strings_fails_before_launching(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(WithMessage(["Succeeded"], message=None))
    with DAG("analytics_etl_decorated_bad", schedule=None, start_date=START) as dag:

        @task.broker(image="busybox")
        def bad() -> str:
            return "python -m etl"

        bad()
    (op,) = dag.tasks
    with pytest.raises(TypeError, match="must return a list of strings"):
        op.execute(ctx())  # type: ignore[arg-type]
    assert broker.requests == []
