"""``on_kill`` while deferred (issue 13 item 10) on every supported Airflow version:
Airflow calls ``BaseTrigger.on_kill`` when a user acts on a deferred task only from 3.3.0
(apache/airflow#65590); before, a killed deferred task's trigger was only cancelled and
its pod ran on until its launch timeout. So the package requires Airflow 3.3 or newer,
and these tests drive Airflow's own triggerer code (``TriggerRunner.run_trigger``) to
prove a user action deletes the launch and a shutdown does not."""

from __future__ import annotations

import asyncio
import contextlib
import re
import tomllib
from pathlib import Path

import httpx
import pytest
from airflow.jobs import triggerer_job_runner
from airflow.jobs.triggerer_job_runner import TriggerRunner
from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance
from airflow.triggers.base import BaseTrigger
from packaging.requirements import Requirement
from packaging.version import Version

from airflow_plugin.client import AsyncBrokerClient
from airflow_plugin.hook import BrokerHook
from airflow_plugin.settings import BrokerConnectionSettings
from airflow_plugin.trigger import BrokerLaunchTrigger
from tests.unit.test_airflow_operator import ScriptedBroker, conn_settings

__all__ = ["conn_settings"]

ON_KILL_SINCE = Version("3.3.0")
PYPROJECT = Path(__file__).parents[2] / "pyproject.toml"


def airflow_minimum() -> Version:
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    for requirement in (Requirement(d) for group in deps.values() for d in group):
        if requirement.name == "apache-airflow":
            lower = [s.version for s in requirement.specifier if s.operator in (">=", "==")]
            assert lower, f"{requirement} names no minimum"
            return Version(lower[0])
    raise AssertionError("no apache-airflow requirement in pyproject.toml")


def test_the_minimum_airflow_calls_the_triggers_on_kill() -> None:
    assert airflow_minimum() >= ON_KILL_SINCE
    # The hook exists and the trigger implements it.
    assert "on_kill" in vars(BaseTrigger)
    assert "on_kill" in vars(BrokerLaunchTrigger)


def _run_then_cancel(trigger: BrokerLaunchTrigger, message: str | None) -> None:
    """Run ``trigger`` through Airflow's TriggerRunner and cancel it while it polls, as
    the triggerer does: with its user-action message for a mark-failed / clear, without
    one on shutdown."""

    async def scenario() -> None:
        runner = TriggerRunner()
        runner.triggers[1] = {"task": None, "name": "broker-launch", "events": 0}
        task = asyncio.create_task(runner.run_trigger(1, trigger))
        runner.triggers[1]["task"] = task
        await asyncio.sleep(0.2)  # polling a Running launch
        assert not task.done()
        task.cancel(message)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def _wired(monkeypatch, settings: BrokerConnectionSettings) -> ScriptedBroker:  # type: ignore[no-untyped-def]
    broker = ScriptedBroker(["Running"])

    async def aget_conn(self: BrokerHook) -> AsyncBrokerClient:
        return AsyncBrokerClient(settings, transport=httpx.MockTransport(broker))

    monkeypatch.setattr(BrokerHook, "aget_conn", aget_conn)
    monkeypatch.setenv("AIRFLOW_DISABLE_GREENBACK_PORTAL", "true")
    return broker


def test_a_user_action_on_the_deferred_task_deletes_the_launch(monkeypatch, conn_settings) -> None:  # type: ignore[no-untyped-def]
    broker = _wired(monkeypatch, conn_settings)
    user_action = triggerer_job_runner._USER_ACTION_CANCEL_MSG
    _run_then_cancel(BrokerLaunchTrigger("L1", poll_interval=0.01), user_action)
    deletes = [r for r in broker.requests if r.method == "DELETE"]
    assert len(deletes) == 1
    assert re.search(r"reason=on_kill", str(deletes[0].url))


def test_a_triggerer_shutdown_leaves_the_launch_running(monkeypatch, conn_settings) -> None:  # type: ignore[no-untyped-def]
    broker = _wired(monkeypatch, conn_settings)
    _run_then_cancel(BrokerLaunchTrigger("L1", poll_interval=0.01), None)
    assert [r.method for r in broker.requests if r.method != "GET"] == []


class FakeTI:
    dag_id = "analytics_etl_daily"
    task_id = "load"
    run_id = "manual__1"
    map_index = -1


@pytest.mark.parametrize(
    ("state", "deleted"), [("deferred", False), ("failed", True), (None, True)]
)
def test_on_kill_for_a_task_still_deferred_is_a_handover_not_a_kill(
    monkeypatch, conn_settings, state: str | None, deleted: bool
) -> None:  # type: ignore[no-untyped-def]
    """Airflow 3.3.x calls on_kill on a recovering triggerer for triggers it handed over
    (apache/airflow#73454): while Airflow still has the task deferred, the launch stays."""
    broker = _wired(monkeypatch, conn_settings)
    asked: list[dict[str, object]] = []

    def get_task_states(**query: object) -> dict[str, dict[str, str | None]]:
        asked.append(query)
        return {"manual__1": {"load": state}}

    monkeypatch.setattr(RuntimeTaskInstance, "get_task_states", staticmethod(get_task_states))
    trigger = BrokerLaunchTrigger("L1", poll_interval=0.01)
    trigger.task_instance = FakeTI()  # type: ignore[assignment]
    asyncio.run(trigger.on_kill())  # as run_trigger calls it on a user-action cancel
    assert asked == [
        {
            "dag_id": "analytics_etl_daily",
            "task_ids": ["load"],
            "run_ids": ["manual__1"],
            "map_index": None,
        }
    ]
    assert broker.deleted is deleted


def test_when_airflow_cannot_be_asked_on_kill_means_a_user_action(
    monkeypatch, conn_settings
) -> None:  # type: ignore[no-untyped-def]
    broker = _wired(monkeypatch, conn_settings)

    def unreachable(**query: object) -> dict[str, object]:
        raise RuntimeError("no supervisor channel")

    monkeypatch.setattr(RuntimeTaskInstance, "get_task_states", staticmethod(unreachable))
    trigger = BrokerLaunchTrigger("L1", poll_interval=0.01)
    trigger.task_instance = FakeTI()  # type: ignore[assignment]
    asyncio.run(trigger.on_kill())  # as run_trigger calls it on a user-action cancel
    assert broker.deleted
