"""BrokerLaunchTrigger against the real broker, OpenBao and control plane: its on_kill
(what the triggerer calls when a user marks a deferred task failed or clears it)
deletes the pod and its Secret, and its polling rides out a broker restart. The
connection comes from AIRFLOW_CONN_PODBROKER_DEFAULT, as in a real triggerer."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from airflow_plugin.client import BrokerClient
from airflow_plugin.settings import BrokerConnectionSettings, settings_from_connection
from airflow_plugin.trigger import BrokerLaunchTrigger
from broker.audit.store import open_audit_store
from broker.core.api_models import ContainerSpec, LaunchRequest, LaunchView, Scheduling
from broker.core.audit_events import EventKind
from broker.core.models import SecretRequest, TaskIdentity
from broker.errors import NotFoundError
from podbroker_devstack.broker_env import BrokerHandle
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION
from tests.helpers import eventually

pytestmark = [pytest.mark.stack, pytest.mark.airflow]


@pytest.fixture
def settings(broker: BrokerHandle, monkeypatch: pytest.MonkeyPatch) -> BrokerConnectionSettings:
    extra = {"namespace": broker.namespace, "timeout": 30}
    conn = {"conn_type": "podbroker", "host": broker.url, "password": broker.token, "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_PODBROKER_DEFAULT", json.dumps(conn))
    return settings_from_connection(host=broker.url, port=None, password=broker.token, extra=extra)


@pytest.fixture
def core(broker: BrokerHandle) -> Iterator[client.CoreV1Api]:
    with broker.kube.api_client() as api:
        yield client.CoreV1Api(api)


def launch(settings: BrokerConnectionSettings, run_seconds: int) -> LaunchView:
    request = LaunchRequest(
        task=TaskIdentity(
            dag_id=f"analytics_etl_{uuid.uuid4().hex[:6]}",
            task_id="load",
            run_id=f"manual__{uuid.uuid4().hex}",
            try_number=1,
        ),
        container=ContainerSpec(image="python:3.12-slim", command=["python", "-c", "print(1)"]),
        secrets=[SecretRequest(name="warehouse-readonly")],
        scheduling=Scheduling(annotations={RUN_DURATION_ANNOTATION: f"{run_seconds}s"}),
    )
    with BrokerClient(settings) as broker_client:
        return broker_client.launch(request)


def exists(read: Any, name: str, namespace: str) -> bool:
    try:
        read(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


async def first_event(trigger: BrokerLaunchTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return dict(event.payload)
    raise AssertionError("the trigger ended without an event")


def test_trigger_on_kill_deletes_the_pod_and_its_secret(
    broker: BrokerHandle, settings: BrokerConnectionSettings, core: client.CoreV1Api
) -> None:
    view = launch(settings, run_seconds=300)
    secret = f"podbroker-{view.launch_id}"
    assert exists(core.read_namespaced_secret, secret, view.namespace)
    trigger = BrokerLaunchTrigger(view.launch_id, poll_interval=0.5)

    async def deferred_then_killed() -> bool:
        # As the triggerer does on mark-failed / clear: cancel run(), then on_kill().
        polling = asyncio.create_task(first_event(trigger))
        await asyncio.sleep(2)
        still_polling = not polling.done()
        polling.cancel()
        await asyncio.gather(polling, return_exceptions=True)
        await trigger.on_kill()
        return still_polling

    assert asyncio.run(deferred_then_killed()), "the pod ended before the kill"
    assert not exists(core.read_namespaced_secret, secret, view.namespace)
    assert eventually(lambda: not exists(core.read_namespaced_pod, view.pod_name, view.namespace))
    with BrokerClient(settings) as broker_client, pytest.raises(NotFoundError):
        broker_client.get_launch(view.launch_id)
    store = open_audit_store(broker.audit_url, create=False)
    with store:
        killed = [
            e
            for e in store.events()
            if e.launch_id == view.launch_id and e.kind == EventKind.LAUNCH_KILLED
        ]
    assert [e.details.get("reason") for e in killed] == ["on_kill"]


def test_trigger_polling_rides_out_a_broker_restart(
    broker: BrokerHandle, settings: BrokerConnectionSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    view = launch(settings, run_seconds=20)
    trigger = BrokerLaunchTrigger(
        view.launch_id, poll_interval=0.5, broker_unavailable_timeout_seconds=120
    )

    async def poll_across_a_restart() -> dict[str, Any]:
        polling = asyncio.create_task(first_event(trigger))
        await asyncio.sleep(2)
        assert not polling.done()
        # The broker goes away and comes back while the trigger polls.
        await asyncio.to_thread(broker.restart)
        return await asyncio.wait_for(polling, timeout=180)

    event = asyncio.run(poll_across_a_restart())
    assert event["status"] == "done", event
    assert event["phase"] == "Succeeded"
    out = capsys.readouterr().out
    assert f"polling launch {view.launch_id} failed (broker unreachable" in out  # it was down
