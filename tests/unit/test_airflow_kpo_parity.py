"""What KubernetesPodOperator users expect of BrokerPodOperator (issue 13), against the
scripted broker and in-memory fakes: the return value from the termination message,
skip_on_exit_code, on_kill_action, an explicit deadline, the KPO input types (duck typed
kubernetes.client models), pending reasons/events with fail-fast and split timeouts,
deferred logging_interval, the extra link and templated nested values."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowSkipException,
    TaskDeferred,
)
from kubernetes.client import (
    V1Affinity,
    V1EnvVar,
    V1EnvVarSource,
    V1NodeAffinity,
    V1NodeSelector,
    V1NodeSelectorRequirement,
    V1NodeSelectorTerm,
    V1ObjectFieldSelector,
    V1ResourceRequirements,
    V1Toleration,
)
from pydantic import Field

from airflow_plugin import result
from airflow_plugin.client import AsyncBrokerClient
from airflow_plugin.hook import BrokerHook
from airflow_plugin.inputs import affinity_dict, env_dict, tolerations
from airflow_plugin.launch_watch import LaunchWatcher, StartupFailedError
from airflow_plugin.links import BrokerLaunchLink
from airflow_plugin.operator import DEFAULT_LAUNCH_TIMEOUT_SECONDS
from airflow_plugin.trigger import BrokerLaunchTrigger
from broker.core.api_models import ContainerState, LaunchView, Phase
from broker.core.models import Strict, TaskIdentity
from broker.core.objects import CONTAINER_NAME
from tests.unit import test_airflow_operator as base
from tests.unit.test_airflow_operator import FakeTI, ScriptedBroker, operator, run_trigger

wire = base.wire
conn_settings = base.conn_settings


class WithMessage(ScriptedBroker):
    """Ended views carry the task container's terminated state and its message."""

    def __init__(self, phases: list[str], *, message: str | None, exit_code: int = 0) -> None:
        super().__init__(phases, exit_code=exit_code)
        self.message = message

    def view(self, phase: str) -> dict[str, Any]:
        view = super().view(phase)
        if phase in ("Succeeded", "Failed"):
            view["containers"] = [
                {
                    "name": "base",
                    "state": "terminated",
                    "exit_code": self.exit_code,
                    "message": self.message,
                }
            ]
        return view


def ctx() -> dict[str, Any]:
    return {"ti": FakeTI()}


# -- item 2: the return value ------------------------------------------------------------


def test_result_container_name_matches_the_broker() -> None:
    assert result.CONTAINER_NAME == CONTAINER_NAME


def test_json_termination_message_is_returned_parsed(wire) -> None:  # type: ignore[no-untyped-def]
    wire(WithMessage(["Succeeded"], message='{"rows": 42, "table": "orders"}\n'))
    op = operator(do_xcom_push=True, get_logs=False)
    assert op.execute(ctx()) == {"rows": 42, "table": "orders"}  # type: ignore[arg-type]


def test_text_termination_message_is_returned_as_written(wire) -> None:  # type: ignore[no-untyped-def]
    wire(WithMessage(["Succeeded"], message="s3://bucket/out.parquet"))
    assert operator(do_xcom_push=True, get_logs=False).execute(ctx()) == "s3://bucket/out.parquet"  # type: ignore[arg-type]


def test_nothing_is_returned_unless_asked_or_written(wire) -> None:  # type: ignore[no-untyped-def]
    wire(WithMessage(["Succeeded"], message="42"))
    op = operator(get_logs=False)
    assert op.do_xcom_push is False  # KPO's default
    assert op.execute(ctx()) is None  # type: ignore[arg-type]
    wire(WithMessage(["Succeeded"], message=None))
    assert operator(do_xcom_push=True, get_logs=False).execute(ctx()) is None  # type: ignore[arg-type]


def test_a_message_at_the_kubelet_cap_is_refused(wire) -> None:  # type: ignore[no-untyped-def]
    wire(WithMessage(["Succeeded"], message="x" * 4096))
    with pytest.raises(AirflowFailException, match=r"4096 bytes.*cut short"):
        operator(do_xcom_push=True, get_logs=False).execute(ctx())  # type: ignore[arg-type]
    wire(WithMessage(["Succeeded"], message="é" * 2047))  # 4094 bytes: fits
    assert operator(do_xcom_push=True, get_logs=False).execute(ctx()) == "é" * 2047  # type: ignore[arg-type]


def test_a_failed_pod_returns_nothing(wire) -> None:  # type: ignore[no-untyped-def]
    wire(WithMessage(["Failed"], message='{"partial": true}', exit_code=3))
    with pytest.raises(AirflowException, match="exit code 3"):
        operator(do_xcom_push=True, get_logs=False).execute(ctx())  # type: ignore[arg-type]


def test_only_the_task_containers_terminated_message_counts() -> None:
    view = LaunchView(
        launch_id="L1",
        task=TaskIdentity(dag_id="d", task_id="t", run_id="r", try_number=1),
        namespace="jobs",
        pod_name="p",
        phase="Succeeded",
        containers=[
            ContainerState(name="sidecar", state="terminated", message="not mine"),
            ContainerState(name="base", state="terminated", message=""),
        ],
    )
    assert result.task_result(view) is None


# -- item 5: skip, on_kill_action, deadline, grace period ---------------------------------


@pytest.mark.parametrize("skip", [3, [1, 3]])
def test_skip_on_exit_code(wire, skip: Any) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Failed"], exit_code=3))
    with pytest.raises(AirflowSkipException, match="exited with code 3"):
        operator(skip_on_exit_code=skip, get_logs=False).execute(ctx())  # type: ignore[arg-type]
    assert broker.deleted  # on_finish_action still applies
    wire(ScriptedBroker(["Failed"], exit_code=4))
    with pytest.raises(AirflowException, match="exit code 4"):
        operator(skip_on_exit_code=skip, get_logs=False).execute(ctx())  # type: ignore[arg-type]


def test_on_kill_action_keep_pod(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Running"]))
    op = operator(on_kill_action="keep_pod")
    op._launch_id = "L1"
    op.on_kill()
    assert broker.requests == []
    with pytest.raises(ValueError, match="on_kill_action"):
        operator(on_kill_action="delete_active_pod")


def test_trigger_on_kill_keeps_the_pod_when_asked(monkeypatch, conn_settings) -> None:  # type: ignore[no-untyped-def]
    broker = ScriptedBroker(["Running"])

    async def aget_conn(self: BrokerHook) -> AsyncBrokerClient:
        return AsyncBrokerClient(conn_settings, transport=httpx.MockTransport(broker))

    monkeypatch.setattr(BrokerHook, "aget_conn", aget_conn)
    asyncio.run(BrokerLaunchTrigger("L1", on_kill_action="keep_pod").on_kill())
    assert broker.requests == []
    asyncio.run(BrokerLaunchTrigger("L1").on_kill())
    assert broker.deleted


def test_deadline_is_explicit_and_logged(wire, capsys) -> None:  # type: ignore[no-untyped-def]
    wire(ScriptedBroker(["Succeeded"]))
    op = operator(get_logs=False)
    assert op.build_request(ctx()).timeout_seconds == DEFAULT_LAUNCH_TIMEOUT_SECONDS == 604800  # type: ignore[arg-type]
    op.execute(ctx())  # type: ignore[arg-type]
    assert "after 604800s (default: 7 days" in capsys.readouterr().out
    op = operator(execution_timeout=timedelta(days=30))
    assert op.deadline() == (604800, "execution_timeout, capped at the broker's maximum")
    assert operator(launch_timeout_seconds=90).deadline() == (90, "launch_timeout_seconds")


def test_termination_grace_period_is_sent_and_bounded(wire) -> None:  # type: ignore[no-untyped-def]
    wire(ScriptedBroker(["Succeeded"]))
    request = operator(termination_grace_period=90).build_request(ctx())  # type: ignore[arg-type]
    assert request.termination_grace_period_seconds == 90
    assert operator().build_request(ctx()).termination_grace_period_seconds is None  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="between 0 and 3600"):
        operator(termination_grace_period=7200)


# -- item 7: KPO input types --------------------------------------------------------------


def test_kubernetes_models_are_accepted_by_duck_typing(wire) -> None:  # type: ignore[no-untyped-def]
    wire(ScriptedBroker(["Succeeded"]))
    op = operator(
        env_vars=[V1EnvVar(name="MODE", value="full"), {"name": "EMPTY"}],
        container_resources=V1ResourceRequirements(
            requests={"cpu": "100m"}, limits={"memory": "1Gi"}
        ),
        tolerations=[
            V1Toleration(key="gpu", operator="Exists", effect="NoSchedule"),
            {"key": "pool", "value": "etl", "tolerationSeconds": 30},
        ],
    )
    request = op.build_request(ctx())  # type: ignore[arg-type]
    assert request.container.env == {"MODE": "full", "EMPTY": ""}
    assert request.container.resources.requests == {"cpu": "100m"}
    assert request.container.resources.limits == {"memory": "1Gi"}
    assert [t.key for t in request.scheduling.tolerations] == ["gpu", "pool"]
    assert request.scheduling.tolerations[1].toleration_seconds == 30


def test_value_from_env_is_refused_naming_the_variable() -> None:
    field_ref = V1EnvVar(
        name="POD_NAME",
        value_from=V1EnvVarSource(field_ref=V1ObjectFieldSelector(field_path="metadata.name")),
    )
    with pytest.raises(ValueError, match=r"env var POD_NAME uses valueFrom \(field_ref\)"):
        operator(env_vars=[field_ref])
    with pytest.raises(ValueError, match="env var X uses valueFrom"):
        env_dict([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}])


def _affinity() -> V1Affinity:
    return V1Affinity(
        node_affinity=V1NodeAffinity(
            required_during_scheduling_ignored_during_execution=V1NodeSelector(
                node_selector_terms=[
                    V1NodeSelectorTerm(
                        match_expressions=[
                            V1NodeSelectorRequirement(key="pool", operator="In", values=["etl"])
                        ]
                    )
                ]
            )
        )
    )


def test_affinity_becomes_kubernetes_json() -> None:
    assert affinity_dict(_affinity()) == {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["etl"]}]}
                ]
            }
        }
    }
    assert tolerations(None) == []


def test_affinity_is_sent_only_where_the_request_model_has_it(wire) -> None:  # type: ignore[no-untyped-def]
    from broker.core.api_models import Scheduling

    if "affinity" in Scheduling.model_fields:
        wire(ScriptedBroker(["Succeeded"]))
        request = operator(affinity=_affinity()).build_request(ctx())  # type: ignore[arg-type]
        assert request.scheduling.model_dump(by_alias=True)["affinity"]
    else:
        with pytest.raises(ValueError, match="affinity is not supported by this podbroker"):
            operator(affinity=_affinity())


# -- item 10: templated nested values, the extra link -------------------------------------


def test_list_env_values_and_resources_are_templated() -> None:
    op = operator(
        env_vars=[V1EnvVar(name="DAY", value="{{ ds }}")],
        container_resources=V1ResourceRequirements(limits={"memory": "{{ params.mem }}"}),
    )
    assert op.env_vars == {"DAY": "{{ ds }}"}
    assert {"env_vars", "container_resources"} <= set(op.template_fields)
    op.render_template_fields({"ds": "2026-01-01", "params": {"mem": "2Gi"}})  # type: ignore[arg-type]
    assert op.env_vars == {"DAY": "2026-01-01"}
    assert op.container_resources["limits"] == {"memory": "2Gi"}


def test_extra_link_points_at_the_task_instance_view() -> None:
    op = operator()
    assert [link.name for link in op.operator_extra_links] == ["Pod launch"]
    url = BrokerLaunchLink().get_link(op, ti_key=FakeTI())  # type: ignore[arg-type]
    assert url == (
        "/podbroker/task-instance?dag_id=analytics_etl_daily&run_id=manual__1"
        "&task_id=load&map_index=-1&try_number=2"
    )


# -- item 3: why the pod is pending -------------------------------------------------------


class Pending(Strict):
    kind: str
    reason: str
    message: str
    permanent: bool = False


class Event(Strict):
    reason: str
    message: str
    count: int = 1
    last_seen: str | None = None


class FutureView(LaunchView):
    """LaunchView with the fields the broker adds for issue 13 item 3."""

    events: list[Event] = Field(default_factory=list)
    pending: Pending | None = None


def future(
    phase: Phase = "Pending",
    *,
    waiting: str | None = None,
    pending: Pending | None = None,
    events: list[Event] | None = None,
) -> FutureView:
    return FutureView(
        launch_id="L1",
        task=TaskIdentity(dag_id="d", task_id="t", run_id="r", try_number=1),
        namespace="jobs",
        pod_name="p",
        phase=phase,
        containers=[ContainerState(name="base", state="waiting", reason=waiting)]
        if waiting
        else [],
        pending=pending,
        events=events or [],
    )


class Reader:
    def __init__(self, views: list[LaunchView]) -> None:
        self.views = views

    def get_launch(self, launch_id: str) -> LaunchView:
        return self.views.pop(0) if len(self.views) > 1 else self.views[0]

    def iter_log_lines(self, launch_id: str, **kwargs: Any) -> Any:
        return iter(())


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, event: Any, *args: Any) -> None:
        self.lines.append(event % args)

    def warning(self, event: Any, *args: Any) -> None:
        self.lines.append(event % args)


def watch(views: list[LaunchView], log: Log, clock: Clock) -> LaunchWatcher:
    return LaunchWatcher(
        Reader(views),
        poll_interval=1,
        unavailable_timeout=0,
        log=log,
        sleep=clock.sleep,
        clock=clock,
    )


def test_pending_reasons_and_events_are_shown_once_each_as_they_change() -> None:
    log, clock = Log(), Clock()
    unschedulable = Pending(kind="unschedulable", reason="Unschedulable", message="0/3 nodes")
    scheduling = Event(reason="FailedScheduling", message="0/3 nodes are available")
    views: list[LaunchView] = [
        future(pending=unschedulable, events=[scheduling]),
        future(pending=unschedulable, events=[scheduling]),
        future(waiting="ContainerCreating", events=[scheduling.model_copy(update={"count": 2})]),
        future("Running"),
    ]
    start = views[0]
    started = watch(views[1:], log, clock).wait_for_start(start, startup_timeout=60)
    assert started.phase == "Running"
    assert log.lines == [
        "pod p pending (unschedulable): Unschedulable: 0/3 nodes",
        "pod p event FailedScheduling: 0/3 nodes are available",
        "pod p: container base waiting: ContainerCreating",
        "pod p event FailedScheduling (x2): 0/3 nodes are available",
    ]


def test_a_permanent_pending_error_fails_at_once() -> None:
    log, clock = Log(), Clock()
    bad = Pending(
        kind="invalid_image", reason="InvalidImageName", message="bad ref", permanent=True
    )
    with pytest.raises(StartupFailedError, match="InvalidImageName: bad ref \\(permanent") as exc:
        watch([future(pending=bad)], log, clock).wait_for_start(
            future(pending=bad), startup_timeout=600
        )
    assert exc.value.failure.kind == "pending_permanent"
    assert clock.now == 0  # no waiting


def test_schedule_and_startup_timeouts_are_separate() -> None:
    clock = Clock()
    # Scheduled at once, then stuck pulling: the startup clock runs from scheduling.
    views: list[LaunchView] = [future(waiting="ImagePullBackOff")]
    with pytest.raises(StartupFailedError, match="scheduled but not started after 5s") as exc:
        watch(views, Log(), clock).wait_for_start(future(), startup_timeout=5, schedule_timeout=100)
    assert exc.value.failure.kind == "startup_timeout"
    assert "ImagePullBackOff" in str(exc.value)
    assert clock.now == pytest.approx(7)  # 1s to schedule + the first poll past 5s


def test_operator_fails_fast_and_deletes_on_a_permanent_error(wire, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Pending"]))
    bad = Pending(
        kind="config_error", reason="CreateContainerConfigError", message="x", permanent=True
    )
    monkeypatch.setattr(LaunchWatcher, "status", lambda self, launch_id: future(pending=bad))
    op = operator(get_logs=False, startup_timeout_seconds=600)
    with pytest.raises(AirflowException, match="CreateContainerConfigError"):
        op.execute(ctx())  # type: ignore[arg-type]
    deletes = [r.url.params.get("reason") for r in broker.requests if r.method == "DELETE"]
    assert deletes == ["pending_permanent"]


# -- item 8: logging_interval --------------------------------------------------------------


def test_trigger_fires_running_after_the_logging_interval(monkeypatch, conn_settings) -> None:  # type: ignore[no-untyped-def]
    broker = ScriptedBroker(["Running"])

    async def aget_conn(self: BrokerHook) -> AsyncBrokerClient:
        return AsyncBrokerClient(conn_settings, transport=httpx.MockTransport(broker))

    monkeypatch.setattr(BrokerHook, "aget_conn", aget_conn)
    trigger = BrokerLaunchTrigger(
        "L1", poll_interval=0.01, logging_interval=0, last_log_ns=5, started_at=123.0
    )
    event = run_trigger(trigger)
    assert event["status"] == "running"
    assert event["last_log_ns"] == 5 and event["started_at"] == 123.0
    path, kwargs = trigger.serialize()
    assert BrokerLaunchTrigger(**kwargs).serialize() == (path, kwargs)
    json.dumps(kwargs)


def test_running_event_copies_new_lines_and_defers_again(wire, capsys) -> None:  # type: ignore[no-untyped-def]
    broker = wire(ScriptedBroker(["Running"]))
    broker.logs = [
        (200, "2026-01-01T00:00:01Z old\n2026-01-01T00:00:02Z new-1\n2026-01-01T00:00:03Z new-2\n")
    ]
    seen = 1767225601 * 1_000_000_000  # 2026-01-01T00:00:01Z, already shown
    op = operator(deferrable=True, logging_interval=30)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute_complete(
            ctx(),  # type: ignore[arg-type]
            {"status": "running", "launch_id": "L1", "last_log_ns": seen, "started_at": 50.0},
        )
    out = capsys.readouterr().out
    assert "[pod] new-1" in out and "[pod] new-2" in out and "[pod] old" not in out
    trigger = deferred.value.trigger
    assert isinstance(trigger, BrokerLaunchTrigger)
    assert trigger.last_log_ns == seen + 2_000_000_000
    assert trigger.started_at == 50.0 and trigger.logging_interval == 30
    assert not broker.deleted


def test_done_after_logging_interval_reads_only_the_rest(wire, capsys) -> None:  # type: ignore[no-untyped-def]
    broker = wire(WithMessage(["Succeeded"], message="[1, 2]"))
    broker.logs = [(200, "2026-01-01T00:00:01Z old\n2026-01-01T00:00:09Z last\n")]
    op = operator(deferrable=True, logging_interval=30, do_xcom_push=True)
    value = op.execute_complete(
        ctx(),  # type: ignore[arg-type]
        {"status": "done", "launch_id": "L1", "last_log_ns": 1767225601 * 1_000_000_000},
    )
    out = capsys.readouterr().out
    assert "[pod] last" in out and "[pod] old" not in out
    assert value == [1, 2]
