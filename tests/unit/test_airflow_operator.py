"""BrokerPodOperator and its trigger against a scripted broker (httpx.MockTransport):
request building, failure semantics, reattach, log following with resume, on_kill,
on_finish_action, deferral. The real broker is exercised in tests/e2e."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

from airflow_plugin.client import AsyncBrokerClient, BrokerClient
from airflow_plugin.hook import BrokerHook
from airflow_plugin.launch_watch import split_timestamp
from airflow_plugin.operator import BrokerPodOperator, broker_errors
from airflow_plugin.settings import BrokerConnectionSettings, settings_from_connection
from airflow_plugin.trigger import BrokerLaunchTrigger
from broker.errors import DeniedError, InvalidRequestError, TemporaryError


class ScriptedBroker:
    """Answers like the broker API; ``phases`` is the sequence GET returns."""

    def __init__(self, phases: list[str], *, created: bool = True, exit_code: int = 0) -> None:
        self.phases = list(phases)
        self.created = created
        self.exit_code = exit_code
        self.requests: list[httpx.Request] = []
        self.logs: list[tuple[int, str]] = [(200, "")]
        self.launch_response: httpx.Response | None = None
        self.deleted = False

    def view(self, phase: str) -> dict[str, Any]:
        return {
            "launch_id": "L1",
            "task": {"dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 1},
            "namespace": "jobs",
            "pod_name": "d-t-1",
            "phase": phase,
            "created": self.created,
            "exit_code": self.exit_code if phase in ("Succeeded", "Failed") else None,
            "reason": "Error" if phase == "Failed" else None,
        }

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.requests.append(req)
        if req.method == "POST":
            return self.launch_response or httpx.Response(201, json=self.view("Pending"))
        if req.method == "DELETE":
            self.deleted = True
            return httpx.Response(200, json=self.view("Deleted"))
        if req.url.path.endswith("/logs"):
            # Like the API server: the last answer repeats (the whole log again).
            status, text = self.logs[0] if len(self.logs) == 1 else self.logs.pop(0)
            if status != 200:
                return httpx.Response(status, json={"error": "u", "reason": text})
            return httpx.Response(200, text=text)
        phase = self.phases.pop(0) if len(self.phases) > 1 else self.phases[0]
        return httpx.Response(200, json=self.view(phase))


@pytest.fixture
def conn_settings(tmp_path: Path) -> BrokerConnectionSettings:
    return settings_from_connection(
        host="http://broker.test", port=None, password="dev", extra={"namespace": "jobs"}
    )


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch, conn_settings: BrokerConnectionSettings):  # type: ignore[no-untyped-def]
    def install(broker: ScriptedBroker) -> ScriptedBroker:
        transport = httpx.MockTransport(broker)
        monkeypatch.setattr(BrokerHook, "settings", conn_settings)
        monkeypatch.setattr(
            BrokerHook, "get_conn", lambda self: BrokerClient(conn_settings, transport=transport)
        )
        return broker

    return install


class FakeTI:
    dag_id = "analytics_etl_daily"
    task_id = "load"
    run_id = "manual__1"
    try_number = 2
    map_index = -1
    id = "0199a3c2-7f1e-7b3a-9c55-3d2e1f0a4b6c"

    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def operator(**kwargs: Any) -> BrokerPodOperator:
    params: dict[str, Any] = {
        "task_id": "load",
        "image": "busybox",
        "secrets": ["warehouse-loader"],
        "poll_interval": 0.01,
        "deferrable": False,
    }
    params.update(kwargs)
    return BrokerPodOperator(**params)


def test_request_has_identity_names_and_kpo_style_fields(wire, conn_settings) -> None:  # type: ignore[no-untyped-def]
    wire(ScriptedBroker(["Succeeded"]))
    op = operator(
        cmds=["python", "-m", "etl"],
        arguments=["--day", "2026-01-01"],
        env_vars=[{"name": "MODE", "value": "full"}],
        container_resources={"limits": {"memory": "256Mi"}},
        tolerations=[
            {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}
        ],
        node_selector={"pool": "etl"},
        pod_template="etl-small",
        execution_timeout=timedelta(minutes=10),
    )
    req = op.build_request({"ti": FakeTI()})  # type: ignore[arg-type]
    assert req.task.model_dump() == {
        "dag_id": "analytics_etl_daily",
        "task_id": "load",
        "run_id": "manual__1",
        "try_number": 2,
        "map_index": -1,
        "ti_id": FakeTI.id,
    }
    assert req.container.command == ["python", "-m", "etl"]
    assert req.container.env == {"MODE": "full"}
    assert req.container.resources.limits == {"memory": "256Mi"}
    assert req.scheduling.tolerations[0].toleration_seconds == 5
    assert req.namespace == "jobs"  # from the connection
    assert req.pod_template == "etl-small"
    assert req.timeout_seconds == 600
    assert [s.name for s in req.secrets] == ["warehouse-loader"]
    assert "env_vars" in op.template_fields and "image" in op.template_fields


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="on_finish_action"):
        operator(on_finish_action="explode")
    with pytest.raises(ValueError, match="secrets\\[0\\]"):
        operator(secrets=["Not A Name"])


def test_invalid_env_name_fails_without_retry(wire) -> None:  # type: ignore[no-untyped-def]
    wire(ScriptedBroker(["Succeeded"]))
    with pytest.raises(AirflowFailException, match=r"env\.BAD-NAME"):
        operator(env_vars={"BAD-NAME": "x"}).build_request({"ti": FakeTI()})  # type: ignore[arg-type]


def test_success_streams_logs_pushes_xcom_and_deletes(wire, capsys) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Running", "Running", "Succeeded"]))
    broker.logs = [
        (
            200,
            "2026-11-24T10:00:00.000000001Z hello\n"
            "2026-11-24T10:00:00.000000002Z same-microsecond\n"
            "2026-11-24T10:00:01Z done\n",
        )
    ]
    ti = FakeTI()
    op = operator()
    op.execute({"ti": ti})  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert ti.xcom == {"launch_id": "L1", "pod_name": "d-t-1"}
    # The stream is re-read while the pod still shows Running: each line once.
    for line in ("hello", "same-microsecond", "done"):
        assert out.count(f"[pod] {line}") == 1
    assert broker.deleted  # on_finish_action=delete_pod
    assert broker.requests[-1].url.params["reason"] == "on_finish_action"
    launch = json.loads(broker.requests[0].content)
    assert launch["task"]["try_number"] == 2


def test_keep_pod_does_not_delete(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Succeeded"]))
    operator(on_finish_action="keep_pod", get_logs=False).execute({"ti": FakeTI()})  # type: ignore[arg-type]
    assert not broker.deleted


def test_failed_pod_is_a_retryable_failure_naming_the_exit_code(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Running", "Failed"], exit_code=3))
    op = operator(get_logs=False, on_finish_action="delete_succeeded_pod")
    with pytest.raises(AirflowException, match="exit code 3") as caught:
        op.execute({"ti": FakeTI()})  # type: ignore[arg-type]
    assert not isinstance(caught.value, AirflowFailException)
    assert not broker.deleted


def test_denial_fails_without_retry_naming_secrets(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Pending"]))
    broker.launch_response = httpx.Response(
        403,
        json={"error": "denied", "reason": "no grant", "denied_secrets": ["payments-api"]},
    )
    with pytest.raises(AirflowFailException, match="secrets not granted: payments-api"):
        operator(secrets=["payments-api"]).execute({"ti": FakeTI()})  # type: ignore[arg-type]


def test_reattach_reuses_the_existing_launch(wire, capsys) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Succeeded"], created=False))
    broker.launch_response = httpx.Response(200, json=broker.view("Running"))
    operator(get_logs=False).execute({"ti": FakeTI()})  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "reattached to existing launch L1" in out
    assert sum(r.method == "POST" for r in broker.requests) == 1


def test_launch_retries_unavailability_in_process(wire, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("airflow_plugin.operator.time.sleep", lambda s: None)
    broker = wire(ScriptedBroker(["Succeeded"]))
    answers = [
        httpx.Response(503, json={"error": "unavailable", "reason": "vault down"}),
        httpx.Response(201, json=broker.view("Running")),
    ]
    original = broker.__call__

    def flaky(req: httpx.Request) -> httpx.Response:
        if req.method == "POST":
            broker.requests.append(req)
            return answers.pop(0)
        return original(req)

    monkeypatch.setattr(
        BrokerHook,
        "get_conn",
        lambda self: BrokerClient(self.settings, transport=httpx.MockTransport(flaky)),
    )
    operator(get_logs=False).execute({"ti": FakeTI()})  # type: ignore[arg-type]
    assert sum(r.method == "POST" for r in broker.requests) == 2


def test_persistent_unavailability_is_retryable(wire, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The launch is retried, honouring Retry-After, for the unavailability timeout
    (not a fixed three attempts: a broker restart, or the sweep of an attempt that died
    mid-launch, takes longer), then the try fails retryably."""
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    monkeypatch.setattr("airflow_plugin.retry._clock", lambda: now[0])
    monkeypatch.setattr("airflow_plugin.operator.time.sleep", sleep)
    broker = wire(ScriptedBroker(["Pending"]))
    broker.launch_response = httpx.Response(
        503, headers={"Retry-After": "5"}, json={"error": "u", "reason": "api down"}
    )
    with pytest.raises(AirflowException, match="will retry") as caught:
        operator(broker_unavailable_timeout_seconds=120).execute({"ti": FakeTI()})  # type: ignore[arg-type]
    assert not isinstance(caught.value, AirflowFailException)
    assert sum(sleeps) == 120  # retried for the whole timeout, never past it
    assert min(sleeps) >= 5  # Retry-After honoured
    assert sum(r.method == "POST" for r in broker.requests) == len(sleeps) + 1


def test_startup_timeout_kills_the_launch(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Pending"]))
    op = operator(startup_timeout_seconds=1, poll_interval=0.2)
    with pytest.raises(AirflowException, match="still Pending"):
        op.execute({"ti": FakeTI()})  # type: ignore[arg-type]
    assert broker.deleted


def test_log_stream_reconnects_and_skips_lines_already_seen(wire, capsys) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Running", "Running", "Succeeded"]))
    broker.logs = [
        (200, "2026-11-24T10:00:00Z a\n"),
        (503, "stream cut"),
        (200, "2026-11-24T10:00:00Z a\n2026-11-24T10:00:02Z b\n"),
    ]
    operator().execute({"ti": FakeTI()})  # type: ignore[arg-type]
    out = capsys.readouterr().out
    pod_lines = [
        line.split("[pod] ")[1].split()[0] for line in out.splitlines() if "[pod] " in line
    ]
    assert pod_lines == ["a", "b"]
    resumed = [r for r in broker.requests if r.url.path.endswith("/logs")][-1]
    assert "since_seconds" in resumed.url.params


def test_on_kill_deletes_the_launch(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Running"]))
    op = operator()
    op.on_kill()  # nothing launched yet: no call
    assert broker.requests == []
    op._launch_id = "L1"
    op.on_kill()
    assert broker.deleted
    assert broker.requests[-1].url.path == "/v1/launches/L1"
    assert broker.requests[-1].url.params["reason"] == "on_kill"


def test_deferrable_defers_with_a_serializable_trigger(wire) -> None:  # type: ignore[no-untyped-def]
    wire(ScriptedBroker(["Pending"]))
    ti = FakeTI()
    with pytest.raises(TaskDeferred) as deferred:
        operator(deferrable=True).execute({"ti": ti})  # type: ignore[arg-type]
    trigger = deferred.value.trigger
    assert isinstance(trigger, BrokerLaunchTrigger)
    path, kwargs = trigger.serialize()
    assert path == "airflow_plugin.trigger.BrokerLaunchTrigger"
    rebuilt = BrokerLaunchTrigger(**kwargs)
    assert rebuilt.serialize() == (path, kwargs)
    assert "dev" not in json.dumps(kwargs)  # no credential in the trigger row
    assert deferred.value.method_name == "execute_complete"
    assert ti.xcom["launch_id"] == "L1"


def test_execute_complete_fetches_logs_and_applies_outcome(wire, capsys) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Succeeded"]))
    broker.logs = [(200, "line-1\n")]
    operator().execute_complete({"ti": FakeTI()}, {"status": "done", "launch_id": "L1"})  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "[pod] line-1" in out
    assert broker.deleted
    with pytest.raises(AirflowFailException, match="gone"):
        operator().execute_complete(
            {},
            {"status": "error", "launch_id": "L1", "message": "gone", "retryable": False},  # type: ignore[arg-type]
        )
    with pytest.raises(AirflowException, match="Pending"):
        operator().execute_complete({}, {"status": "startup_timeout", "launch_id": "L1"})  # type: ignore[arg-type]


def run_trigger(trigger: BrokerLaunchTrigger) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return dict(event.payload)
        raise AssertionError("no event")

    return asyncio.run(first())


def test_trigger_polls_until_the_pod_ends(monkeypatch, conn_settings) -> None:  # type: ignore[no-untyped-def]
    broker = ScriptedBroker(["Pending", "Running", "Succeeded"])

    async def aget_conn(self: BrokerHook) -> AsyncBrokerClient:
        return AsyncBrokerClient(conn_settings, transport=httpx.MockTransport(broker))

    monkeypatch.setattr(BrokerHook, "aget_conn", aget_conn)
    event = run_trigger(BrokerLaunchTrigger("L1", poll_interval=0.01))
    assert event == {
        "status": "done",
        "launch_id": "L1",
        "phase": "Succeeded",
        "pod_name": "d-t-1",
        "last_log_ns": None,
    }
    assert len(broker.requests) == 3


def test_trigger_reports_startup_timeout_and_permanent_errors(monkeypatch, conn_settings) -> None:  # type: ignore[no-untyped-def]
    responses = {"pending": ScriptedBroker(["Pending"])}

    async def aget_conn(self: BrokerHook) -> AsyncBrokerClient:
        return AsyncBrokerClient(conn_settings, transport=httpx.MockTransport(responses["now"]))

    monkeypatch.setattr(BrokerHook, "aget_conn", aget_conn)
    responses["now"] = responses["pending"]
    event = run_trigger(BrokerLaunchTrigger("L1", startup_timeout_seconds=1, started_at=0.0))
    assert event["status"] == "startup_failed"
    assert event["kind"] == "schedule_timeout"  # no container state yet: not scheduled
    responses["now"] = lambda r: httpx.Response(404, json={"error": "nf", "reason": "no launch"})  # type: ignore[assignment]
    event = run_trigger(BrokerLaunchTrigger("L1"))
    assert event["status"] == "error"
    assert event["retryable"] is False


def test_error_mapping() -> None:
    with pytest.raises(AirflowFailException, match="secrets not granted: a, b"), broker_errors("x"):
        raise DeniedError("nope", ["a", "b"])
    with pytest.raises(AirflowFailException), broker_errors("x"):
        raise InvalidRequestError("bad")
    with pytest.raises(AirflowException) as caught, broker_errors("x"):
        raise TemporaryError("down", component="vault")
    assert not isinstance(caught.value, AirflowFailException)


def test_split_timestamp() -> None:
    stamp, text = split_timestamp("2026-11-24T10:00:00.123456789Z hello world")
    assert text == "hello world"
    assert stamp == 1795514400_123456789
    later, _ = split_timestamp("2026-11-24T10:00:00.123456790Z next")
    assert later == stamp + 1  # same microsecond, still ordered
    assert split_timestamp("plain line") == (None, "plain line")
