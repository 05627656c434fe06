"""airflow_plugin.launch_watch against in-memory fakes of the broker client: status reads
ride out an outage and give up at its deadline, waits stop at terminal phases and at the
startup timeout, the log is followed and resumed after the last timestamp seen. Time is
a fake clock that only moves when the watcher sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from airflow_plugin.launch_watch import (
    AsyncLaunchWatcher,
    LaunchWatcher,
    OutageTimeoutError,
    StartupFailedError,
    split_timestamp,
)
from broker.core.api_models import LaunchView, Phase
from broker.core.models import TaskIdentity
from broker.errors import (
    AuthenticationError,
    BrokerError,
    NotFoundError,
    TemporaryError,
    VaultUnavailableError,
)

Answer = LaunchView | BrokerError


def view(phase: Phase) -> LaunchView:
    return LaunchView(
        launch_id="L1",
        task=TaskIdentity(dag_id="d", task_id="t", run_id="r", try_number=1),
        namespace="jobs",
        pod_name="d-t-1",
        phase=phase,
        created=True,
    )


def down(retry_after: int = 1) -> TemporaryError:
    return TemporaryError("broker restarting", component="broker", retry_after=retry_after)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


class Log:
    """Records what the watcher logs, formatted."""

    def __init__(self) -> None:
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def info(self, event: Any, *args: Any) -> None:
        self.infos.append(event % args)

    def warning(self, event: Any, *args: Any) -> None:
        self.warnings.append(event % args)

    @property
    def pod_lines(self) -> list[str]:
        return [line.removeprefix("[pod] ") for line in self.infos if line.startswith("[pod] ")]


class FakeClient:
    """``statuses``: what successive get_launch calls answer (the last one repeats);
    ``log_passes``: per iter_log_lines call, the lines and then optionally an error."""

    def __init__(
        self, statuses: list[Answer], log_passes: list[tuple[list[str], BrokerError | None]]
    ) -> None:
        self.statuses = statuses
        self.log_passes = log_passes
        self.status_reads = 0
        self.log_calls: list[dict[str, Any]] = []

    def _next_status(self) -> LaunchView:
        self.status_reads += 1
        answer = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(answer, BrokerError):
            raise answer
        return answer

    def get_launch(self, launch_id: str) -> LaunchView:
        assert launch_id == "L1"
        return self._next_status()

    def iter_log_lines(
        self,
        launch_id: str,
        *,
        follow: bool,
        since_seconds: int | None = None,
        timestamps: bool = False,
        idle_timeout: float | None = None,
    ) -> Iterator[str]:
        self.log_calls.append(
            {"follow": follow, "since_seconds": since_seconds, "timestamps": timestamps}
        )
        lines, error = self.log_passes.pop(0) if len(self.log_passes) > 1 else self.log_passes[0]
        yield from lines
        if error is not None:
            raise error


class AsyncFakeClient(FakeClient):
    async def get_launch(self, launch_id: str) -> LaunchView:  # type: ignore[override]
        return self._next_status()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("airflow_plugin.retry._clock", fake)
    return fake


def watcher(
    client: FakeClient, clock: Clock, log: Log, *, timeout: float = 60, poll: float = 2
) -> LaunchWatcher:
    return LaunchWatcher(
        client,
        poll_interval=poll,
        unavailable_timeout=timeout,
        log=log,
        sleep=clock.sleep,
        clock=clock,
    )


def async_watcher(
    client: AsyncFakeClient, clock: Clock, log: Log, *, timeout: float = 60
) -> AsyncLaunchWatcher:
    return AsyncLaunchWatcher(
        client,
        poll_interval=2,
        unavailable_timeout=timeout,
        log=log,
        sleep=clock.asleep,
        clock=clock,
    )


# -- status ----------------------------------------------------------------------------


def test_status_rides_out_an_outage_and_a_token_rotation(clock: Clock) -> None:
    log = Log()
    client = FakeClient([down(1), AuthenticationError("token rotating"), view("Running")], [])
    assert watcher(client, clock, log).status("L1").phase == "Running"
    assert clock.sleeps == [2.0, 4.0]  # backing off from the poll interval, doubling
    assert log.warnings[0] == ("polling launch L1 failed (broker restarting); retrying in 2.0s")


def test_status_honours_retry_after(clock: Clock) -> None:
    client = FakeClient([VaultUnavailableError("sealed", retry_after=7), view("Running")], [])
    watcher(client, clock, Log()).status("L1")
    assert clock.sleeps == [7.0]


def test_status_gives_up_at_the_deadline_naming_the_last_error(clock: Clock) -> None:
    client = FakeClient([down()], [])
    with pytest.raises(OutageTimeoutError) as caught:
        watcher(client, clock, Log(), timeout=45).status("L1")
    assert sum(clock.sleeps) == pytest.approx(45)
    assert caught.value.seconds == pytest.approx(45)
    assert isinstance(caught.value.error, TemporaryError)
    assert str(caught.value) == "broker restarting (unavailable for 45s)"
    with pytest.raises(OutageTimeoutError):
        watcher(FakeClient([down()], []), clock, Log(), timeout=0).status("L1")


def test_permanent_errors_are_not_ridden_out(clock: Clock) -> None:
    client = FakeClient([NotFoundError("no launch L1"), view("Running")], [])
    with pytest.raises(NotFoundError):
        watcher(client, clock, Log()).status("L1")
    assert clock.sleeps == []


# -- waiting for start and end -----------------------------------------------------------


def test_wait_for_start_returns_the_first_non_pending_view(clock: Clock) -> None:
    client = FakeClient([view("Pending"), view("Running")], [])
    started = watcher(client, clock, Log()).wait_for_start(view("Pending"), startup_timeout=60)
    assert started.phase == "Running"
    assert clock.sleeps == [2.0, 2.0]


def test_wait_for_start_stops_at_the_schedule_timeout(clock: Clock) -> None:
    client = FakeClient([view("Pending")], [])
    with pytest.raises(StartupFailedError, match="not scheduled after 10s") as failed:
        watcher(client, clock, Log()).wait_for_start(view("Pending"), startup_timeout=10)
    assert failed.value.failure.kind == "schedule_timeout"
    assert sum(clock.sleeps) == pytest.approx(12)  # the first poll past the deadline


@pytest.mark.parametrize("end", ["Succeeded", "Failed", "Deleted"])
def test_wait_for_end_stops_at_each_terminal_phase(clock: Clock, end: Phase) -> None:
    client = FakeClient([view("Running"), view("Running"), view(end)], [])
    assert watcher(client, clock, Log()).wait_for_end(view("Pending")).phase == end
    assert client.status_reads == 3
    assert watcher(client, clock, Log()).wait_for_end(view(end)).phase == end  # no read
    assert client.status_reads == 3


# -- logs --------------------------------------------------------------------------------


def test_follow_resumes_after_the_last_timestamp_then_reads_the_tail(clock: Clock) -> None:
    a, b, c = (f"2026-11-24T10:00:0{i}.000000001Z {t}" for i, t in enumerate("abc"))
    log = Log()
    client = FakeClient(
        [view("Running"), view("Succeeded")],
        [
            ([a, b], down(3)),  # the stream breaks after two lines
            ([a, b, c], None),  # reopened: the whole window again
            ([a, b, c, "2026-11-24T10:00:09Z d"], None),  # the tail after the end
        ],
    )
    w = watcher(client, clock, log)
    w.follow_logs(view("Running"))
    assert log.pod_lines == ["a", "b", "c", "d"]  # nothing twice, nothing lost
    assert [call["follow"] for call in client.log_calls] == [True, True, False]
    assert client.log_calls[0]["since_seconds"] is None
    assert client.log_calls[1]["since_seconds"] is not None  # resumed, not from the start
    assert all(call["timestamps"] for call in client.log_calls)
    assert w.last_log_ns == split_timestamp("2026-11-24T10:00:09Z d")[0]
    assert "log stream interrupted (broker restarting); reconnecting in 3.0s" in log.warnings
    assert 3.0 in clock.sleeps


def test_follow_gives_up_on_the_log_only(clock: Clock) -> None:
    log = Log()
    client = FakeClient([view("Running")], [(["x"], None), ([], down())])
    watcher(client, clock, log, timeout=20).follow_logs(view("Running"))  # returns
    assert log.pod_lines[0] == "x"
    assert "giving up on the log stream: broker restarting" in log.warnings


def test_follow_stops_at_a_permanent_log_error_and_skips_the_tail_of_a_deleted_pod(
    clock: Clock,
) -> None:
    log = Log()
    refused = FakeClient([view("Running")], [([], NotFoundError("no log"))])
    watcher(refused, clock, log).follow_logs(view("Running"))
    assert log.warnings == ["cannot read the pod log: no log"]
    deleted = FakeClient([view("Deleted")], [(["only"], None)])
    watcher(deleted, clock, log).follow_logs(view("Running"))
    assert [call["follow"] for call in deleted.log_calls] == [True]


def test_copy_logs_reads_once_without_timestamps(clock: Clock) -> None:
    log = Log()
    client = FakeClient([view("Succeeded")], [(["one", "two"], None)])
    w = watcher(client, clock, log)
    w.copy_logs(view("Succeeded"))
    w.copy_logs(view("Deleted"))  # nothing left to read
    assert log.pod_lines == ["one", "two"]
    assert client.log_calls == [{"follow": False, "since_seconds": None, "timestamps": False}]


# -- async (the trigger) -----------------------------------------------------------------


def test_async_wait_rides_out_an_outage_until_the_end(clock: Clock) -> None:
    client = AsyncFakeClient([view("Running"), down(1), view("Failed")], [])
    end = asyncio.run(
        async_watcher(client, clock, Log()).wait_for_end(
            "L1", started_at=clock.now, startup_timeout_seconds=60
        )
    )
    assert end.phase == "Failed"
    assert clock.sleeps == [2.0, 2.0]  # one poll interval, one back-off


def test_async_wait_fails_at_the_schedule_timeout(clock: Clock) -> None:
    client = AsyncFakeClient([view("Pending")], [])
    with pytest.raises(StartupFailedError) as failed:
        asyncio.run(
            async_watcher(client, clock, Log()).wait_for_end(
                "L1", started_at=clock.now - 100, startup_timeout_seconds=60
            )
        )
    assert failed.value.failure.kind == "schedule_timeout"
    assert client.status_reads == 1


def test_async_wait_gives_up_after_the_outage_timeout(clock: Clock) -> None:
    client = AsyncFakeClient([down()], [])
    with pytest.raises(OutageTimeoutError, match=r"unavailable for 30s"):
        asyncio.run(
            async_watcher(client, clock, Log(), timeout=30).wait_for_end(
                "L1", started_at=clock.now, startup_timeout_seconds=60
            )
        )
