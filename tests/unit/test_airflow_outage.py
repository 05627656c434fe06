"""The Airflow side when the broker is briefly unavailable while a pod runs, and when a
deferred task is killed: polls ride out outages (capped exponential backoff up to
``broker_unavailable_timeout_seconds``), a try that fails after its launch was created
deletes the launch first (no orphaned pod beside the retry's), and the trigger's
on_kill deletes the launch. The scripted broker (httpx.MockTransport) stands in for the
real one here only; tests/e2e runs the real one."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

from airflow_plugin.client import AsyncBrokerClient
from airflow_plugin.hook import BrokerHook
from airflow_plugin.retry import Outage
from airflow_plugin.settings import BrokerConnectionSettings
from airflow_plugin.trigger import BrokerLaunchTrigger
from broker.errors import TemporaryError
from tests.unit import test_airflow_operator as base
from tests.unit.test_airflow_operator import FakeTI, ScriptedBroker, operator, run_trigger

# The scripted-broker fixtures of the operator tests.
wire = base.wire
conn_settings = base.conn_settings

UNAVAILABLE = {"error": "unavailable", "reason": "kubernetes API unreachable", "retryable": True}


class FakeClock:
    """Monotonic time that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("airflow_plugin.retry._clock", fake)
    monkeypatch.setattr("airflow_plugin.operator.time.sleep", fake.sleep)
    return fake


class Flaky(ScriptedBroker):
    """A scripted broker whose status GETs answer 503 (with Retry-After: 1) on the
    calls numbered in ``down`` (1-based), or on every call from ``down_from`` on."""

    def __init__(
        self,
        phases: list[str],
        *,
        down: set[int] | None = None,
        down_from: int | None = None,
        delete_status: int = 200,
    ) -> None:
        super().__init__(phases)
        self.down = down or set()
        self.down_from = down_from
        self.delete_status = delete_status
        self.gets = 0

    def __call__(self, req: httpx.Request) -> httpx.Response:
        if req.method == "DELETE" and self.delete_status != 200:
            self.requests.append(req)
            return httpx.Response(self.delete_status, json=UNAVAILABLE)
        if req.method == "GET" and not req.url.path.endswith("/logs"):
            self.gets += 1
            if self.gets in self.down or (self.down_from and self.gets >= self.down_from):
                self.requests.append(req)
                return httpx.Response(503, json=UNAVAILABLE, headers={"Retry-After": "1"})
        return super().__call__(req)

    def deletes(self) -> list[str]:
        return [r.url.params.get("reason", "") for r in self.requests if r.method == "DELETE"]


def context(ti: FakeTI | None = None) -> Any:
    return {"ti": ti or FakeTI()}


# -- Outage --------------------------------------------------------------------------


def test_outage_backs_off_exponentially_capped_and_stops_at_the_deadline() -> None:
    clock = FakeClock()
    outage = Outage(100, first_delay=1, max_delay=30, clock=clock)
    delays = []
    while (delay := outage.next_delay()) is not None:
        delays.append(delay)
        clock.sleep(delay)
    assert delays[:6] == [1, 2, 4, 8, 16, 30]
    assert max(delays) == 30
    assert sum(delays) == pytest.approx(100)  # the last wait ends at the deadline
    assert outage.elapsed == pytest.approx(100)


def test_outage_honours_retry_after_and_resets_after_a_success() -> None:
    clock = FakeClock()
    outage = Outage(300, first_delay=1, max_delay=30, clock=clock)
    assert outage.next_delay(retry_after=5) == 5
    assert outage.next_delay(retry_after=120) == 30  # the hint is capped too
    clock.sleep(299)
    assert outage.next_delay() == pytest.approx(1)  # never past the deadline
    outage.reset()
    assert outage.elapsed == 0
    assert outage.next_delay() == 1  # a new outage starts from the first delay
    assert Outage(0, clock=clock).next_delay() is None  # 0: no retrying
    with pytest.raises(ValueError, match="negative"):
        Outage(-1)


# -- blocking operator ---------------------------------------------------------------


def test_one_503_while_polling_is_ridden_out(wire, clock) -> None:  # type: ignore[no-untyped-def]
    broker = wire(Flaky(["Running", "Succeeded"], down={2}))
    ti = FakeTI()
    operator(get_logs=False).execute(context(ti))
    assert sum(r.method == "POST" for r in broker.requests) == 1
    assert broker.deletes() == ["on_finish_action"]  # the normal end, nothing else
    assert 1.0 in clock.sleeps  # backed off (Retry-After: 1) instead of failing


def test_persistent_unavailability_deletes_the_launch_then_fails_retryable(wire, clock) -> None:  # type: ignore[no-untyped-def]
    broker = wire(Flaky(["Running"], down_from=2))
    op = operator(get_logs=False, broker_unavailable_timeout_seconds=60)
    with pytest.raises(AirflowException, match="reading the launch status") as caught:
        op.execute(context())
    assert not isinstance(caught.value, AirflowFailException)  # Airflow retries the task
    assert broker.deletes() == ["task_failed"]  # ...but not beside this try's pod
    assert broker.requests[-1].url.path == "/v1/launches/L1"
    waits = [s for s in clock.sleeps if s >= 1]
    assert waits == sorted(waits)  # backed off, growing
    assert sum(waits) == pytest.approx(60)  # until the deadline, not beyond


def test_a_failing_delete_does_not_mask_the_polling_error(wire, clock) -> None:  # type: ignore[no-untyped-def]
    broker = wire(Flaky(["Running"], down_from=2, delete_status=503))
    op = operator(get_logs=False, broker_unavailable_timeout_seconds=5)
    with pytest.raises(AirflowException, match="reading the launch status"):
        op.execute(context())
    assert broker.deletes() == ["task_failed"]


def test_zero_timeout_fails_at_once_and_still_deletes(wire, clock) -> None:  # type: ignore[no-untyped-def]
    broker = wire(Flaky(["Running"], down={2}))
    op = operator(get_logs=False, broker_unavailable_timeout_seconds=0)
    with pytest.raises(AirflowException, match="will retry"):
        op.execute(context())
    assert broker.deletes() == ["task_failed"]
    with pytest.raises(ValueError, match="broker_unavailable_timeout_seconds"):
        operator(broker_unavailable_timeout_seconds=-1)


def test_permanent_error_while_polling_also_deletes(wire, clock) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Running"]))
    original = broker.__call__
    gets = []

    def forbidden_after_one(req: httpx.Request) -> httpx.Response:
        if req.method == "GET":
            gets.append(req)
            if len(gets) > 1:
                broker.requests.append(req)
                return httpx.Response(403, json={"error": "denied", "reason": "not yours"})
        response: httpx.Response = original(req)
        return response

    wire(forbidden_after_one)
    with pytest.raises(AirflowFailException, match="denied"):
        operator(get_logs=False).execute(context())
    assert broker.deleted


def test_startup_timeout_deletes_once(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(Flaky(["Pending"]))
    op = operator(get_logs=False, startup_timeout_seconds=1, poll_interval=0.2)
    with pytest.raises(AirflowException, match="still Pending"):
        op.execute(context())
    assert broker.deletes() == ["schedule_timeout"]  # never scheduled (no container states)


def test_log_reconnects_back_off_then_give_up_on_the_log_only(wire, clock, capsys) -> None:  # type: ignore[no-untyped-def]
    broker = wire(Flaky(["Running"] * 30 + ["Succeeded"]))
    broker.logs = [(200, "2026-11-24T10:00:00Z first\n")] + [(503, "kubelet away")] * 40
    broker.logs.append((200, ""))
    operator(broker_unavailable_timeout_seconds=20).execute(context())
    out = capsys.readouterr().out
    assert "[pod] first" in out
    assert "giving up on the log stream" in out
    reconnect_waits = [s for s in clock.sleeps if s >= 1]
    assert reconnect_waits == sorted(reconnect_waits)
    assert sum(reconnect_waits) == pytest.approx(20)
    assert broker.deletes() == ["on_finish_action"]  # the pod ended: a normal finish


# -- deferrable operator and trigger -------------------------------------------------


def test_trigger_gets_the_unavailable_timeout(wire) -> None:  # type: ignore[no-untyped-def]
    wire(ScriptedBroker(["Pending"]))
    with pytest.raises(TaskDeferred) as deferred:
        operator(deferrable=True, broker_unavailable_timeout_seconds=42).execute(context())
    _, kwargs = deferred.value.trigger.serialize()
    assert kwargs["broker_unavailable_timeout_seconds"] == 42
    assert BrokerLaunchTrigger(**kwargs).broker_unavailable_timeout_seconds == 42


def test_trigger_error_deletes_the_launch_before_failing(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(Flaky(["Running"]))
    event = {"status": "error", "launch_id": "L1", "message": "broker down", "retryable": True}
    with pytest.raises(AirflowException, match="broker down") as caught:
        operator().execute_complete({}, event)
    assert not isinstance(caught.value, AirflowFailException)
    assert broker.deletes() == ["trigger_error"]


def test_trigger_error_stays_the_error_when_the_delete_fails(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(Flaky(["Running"], delete_status=503))
    event = {"status": "error", "launch_id": "L1", "message": "gone", "retryable": False}
    with pytest.raises(AirflowFailException, match="gone"):
        operator().execute_complete({}, event)
    assert broker.deletes() == ["trigger_error"]


def test_resume_rides_out_a_503_reading_the_final_status(wire, clock) -> None:  # type: ignore[no-untyped-def]
    broker = wire(Flaky(["Succeeded"], down={1}))
    operator(get_logs=False).execute_complete({}, {"status": "done", "launch_id": "L1"})
    assert broker.deletes() == ["on_finish_action"]


@pytest.fixture
def async_broker(monkeypatch: pytest.MonkeyPatch, conn_settings: BrokerConnectionSettings):  # type: ignore[no-untyped-def]
    """Points the trigger's hook at a scripted broker; asyncio.sleep advances a clock."""
    clock = FakeClock()
    monkeypatch.setattr("airflow_plugin.retry._clock", clock)
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        clock.sleep(seconds)
        await real_sleep(0)

    monkeypatch.setattr("airflow_plugin.trigger.asyncio.sleep", fake_sleep)

    def install(broker: ScriptedBroker) -> FakeClock:
        async def aget_conn(self: BrokerHook) -> AsyncBrokerClient:
            return AsyncBrokerClient(conn_settings, transport=httpx.MockTransport(broker))

        monkeypatch.setattr(BrokerHook, "aget_conn", aget_conn)
        return clock

    return install


def test_trigger_rides_out_a_503(async_broker) -> None:  # type: ignore[no-untyped-def]
    broker = Flaky(["Running", "Succeeded"], down={2})
    clock = async_broker(broker)
    event = run_trigger(BrokerLaunchTrigger("L1", poll_interval=0.01))
    assert event["status"] == "done"
    assert 1.0 in clock.sleeps


def test_trigger_gives_up_retryable_after_the_timeout(async_broker) -> None:  # type: ignore[no-untyped-def]
    broker = Flaky(["Running"], down_from=1)
    clock = async_broker(broker)
    trigger = BrokerLaunchTrigger("L1", poll_interval=0.01, broker_unavailable_timeout_seconds=90)
    event = run_trigger(trigger)
    assert event["status"] == "error"
    assert event["retryable"] is True
    assert "unavailable for 90s" in event["message"]
    waits = [s for s in clock.sleeps if s >= 1]
    assert waits[:6] == [1, 2, 4, 8, 16, 30]  # doubling, capped
    assert sum(waits) == pytest.approx(90)


def test_trigger_on_kill_deletes_the_launch(async_broker) -> None:  # type: ignore[no-untyped-def]
    broker = Flaky(["Running"])
    async_broker(broker)
    asyncio.run(BrokerLaunchTrigger("L/1").on_kill())
    assert broker.deletes() == ["on_kill"]
    assert broker.requests[-1].url.raw_path.startswith(b"/v1/launches/L%2F1?")


def test_trigger_on_kill_retries_unavailability_then_logs(async_broker, capsys) -> None:  # type: ignore[no-untyped-def]
    broker = Flaky(["Running"], delete_status=503)
    clock = async_broker(broker)
    asyncio.run(BrokerLaunchTrigger("L1").on_kill())  # does not raise
    assert broker.deletes() == ["on_kill"] * 3
    assert clock.sleeps == [1.0, 2.0]
    assert "could not delete launch L1" in capsys.readouterr().out


def test_trigger_on_kill_stops_at_a_permanent_error(async_broker, capsys) -> None:  # type: ignore[no-untyped-def]
    gone: list[httpx.Request] = []

    def not_found(req: httpx.Request) -> httpx.Response:
        gone.append(req)
        return httpx.Response(404, json={"error": "not_found", "reason": "no launch L1"})

    async_broker(not_found)
    asyncio.run(BrokerLaunchTrigger("L1").on_kill())
    assert [r.method for r in gone] == ["DELETE"]
    assert "no launch L1" in capsys.readouterr().out


def test_async_kill_maps_errors_and_returns_the_view(
    conn_settings: BrokerConnectionSettings,
) -> None:
    broker = Flaky(["Running"])

    async def kill(transport: httpx.MockTransport) -> Any:
        client = AsyncBrokerClient(conn_settings, transport=transport)
        try:
            return await client.kill("L1", reason="on_kill")
        finally:
            await client.aclose()

    view = asyncio.run(kill(httpx.MockTransport(broker)))
    assert view.phase == "Deleted"
    assert broker.requests[-1].method == "DELETE"
    assert broker.requests[-1].url.params["reason"] == "on_kill"
    refused = httpx.MockTransport(lambda r: httpx.Response(503, json=UNAVAILABLE))
    with pytest.raises(TemporaryError, match="kubernetes API unreachable"):
        asyncio.run(kill(refused))
