"""Need-to-know per task instance (issue 11), on the in-memory ports: launches are
checked with Airflow's view of the task instance, secrets reach only approved images,
a differing second launch is a conflict, and a newer try ends the earlier try's pod."""

from __future__ import annotations

import pytest

from broker.core.audit_events import EventKind
from broker.core.models import Caller, EnvDelivery, SecretRequest
from broker.core.policy import Grant, Team
from broker.errors import AirflowUnavailableError, ConflictError, DeniedError
from broker.service.verification import TaskVerifier
from tests.unit.fakes import (
    CALLER,
    FakeTaskInstances,
    Services,
    make_services,
    make_task,
    sample_policy,
    wait_until,
)


def services(mode: str = "enforce", *, airflow: FakeTaskInstances | None = None) -> Services:
    verifier = TaskVerifier(airflow, mode, cache_seconds=0)  # type: ignore[arg-type]
    return make_services(verifier=verifier)


def decisions(svc: Services) -> list[dict[str, object]]:
    return [e.details for e in svc.audit.events if e.kind == EventKind.DECISION]


def test_enforce_lets_the_running_task_instance_launch() -> None:
    airflow = FakeTaskInstances()
    airflow.add(make_task())
    svc = services(airflow=airflow)
    view = svc.launch("wh")
    assert view.created
    assert decisions(svc)[-1]["verification"] == {"verdict": "enforce", "ok": True, "reason": None}


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda a: None, "has no task instance"),
        (
            lambda a: a.add(make_task(), ti_id="0199ffff-0000-7000-8000-000000000000"),
            "id does not match",
        ),
        (lambda a: a.add(make_task(), try_number=2), "is not the current try"),
        (lambda a: a.add(make_task(), state="success"), "is success, not running"),
    ],
    ids=["unknown", "wrong-id", "wrong-try", "not-running"],
)
def test_enforce_refuses_forged_identities_and_creates_nothing(setup: object, reason: str) -> None:
    airflow = FakeTaskInstances()
    setup(airflow)  # type: ignore[operator]
    svc = services(airflow=airflow)
    with pytest.raises(DeniedError, match=reason) as refused:
        svc.launch("wh")
    assert refused.value.denied == ["wh"]
    assert svc.cluster.count("create_pod") == 0
    assert svc.store.issued == []
    last = decisions(svc)[-1]
    assert last["allowed"] is False
    assert last["verification"]["ok"] is False  # type: ignore[index]


def test_a_token_bound_to_another_pod_is_refused() -> None:
    airflow = FakeTaskInstances()
    airflow.add(make_task(), hostname="worker-pod-1")
    svc = services(airflow=airflow)
    impostor = Caller(**{**CALLER.model_dump(), "bound_pod": "worker-pod-2"})
    with pytest.raises(DeniedError, match="is not the host"):
        svc.launch("wh", caller=impostor)
    genuine = Caller(**{**CALLER.model_dump(), "bound_pod": "worker-pod-1"})
    assert svc.launch("wh", caller=genuine).created


def test_missing_ti_id_is_refused_when_enforcing() -> None:
    airflow = FakeTaskInstances()
    airflow.add(make_task())
    svc = services(airflow=airflow)
    with pytest.raises(DeniedError, match="no task instance id"):
        svc.launch("wh", task_identity=make_task(ti_id=None))


def test_warn_mode_logs_and_launches() -> None:
    svc = services("warn", airflow=FakeTaskInstances())
    assert svc.launch("wh").created
    assert decisions(svc)[-1]["verification"]["ok"] is False  # type: ignore[index]


def test_airflow_down_is_retryable_when_enforcing_and_nothing_is_created() -> None:
    airflow = FakeTaskInstances()
    airflow.down = True
    svc = services(airflow=airflow)
    with pytest.raises(AirflowUnavailableError) as down:
        svc.launch("wh")
    assert down.value.retryable and down.value.http_status == 503
    assert svc.cluster.count("create_pod") == 0 and svc.store.issued == []


def test_mode_off_makes_no_airflow_call() -> None:
    airflow = FakeTaskInstances()
    svc = services("off", airflow=airflow)
    assert svc.launch("wh").created
    assert airflow.calls == 0
    assert "verification" not in decisions(svc)[-1]


def test_a_grant_can_require_verification_when_the_broker_does_not() -> None:
    airflow = FakeTaskInstances()
    svc = services("off", airflow=airflow)
    policy = sample_policy()
    strict = Grant(id="strict", dags="etl_*", secrets=("db",), require_verified_task=True)
    teams = {"etl": Team(grants=(strict, *policy.teams["etl"].grants))}
    svc.policies.policy = policy.model_copy(update={"teams": teams})
    assert svc.launch("wh").created  # not a strict secret: no check
    assert airflow.calls == 0
    with pytest.raises(DeniedError, match="has no task instance"):
        svc.launch("db", task_identity=make_task("other"))
    airflow.add(make_task("other"))
    assert svc.launch("db", task_identity=make_task("other")).created


def test_a_required_check_without_airflow_configured_fails_closed() -> None:
    svc = make_services()  # no Airflow source at all
    policy = sample_policy()
    strict = Grant(id="strict", dags="etl_*", secrets=("db",), require_verified_task=True)
    svc.policies.policy = policy.model_copy(update={"teams": {"etl": Team(grants=(strict,))}})
    with pytest.raises(DeniedError, match=r"no airflow\.api_url"):
        svc.launch("db")
    assert svc.store.issued == []


def test_secrets_reach_only_images_their_grant_lists() -> None:
    svc = make_services()
    policy = sample_policy()
    digest = "registry.local/etl@sha256:" + "a" * 64
    pinned = Grant(id="pinned", dags="etl_*", secrets=("wh",), images=(digest,))
    svc.policies.policy = policy.model_copy(update={"teams": {"etl": Team(grants=(pinned,))}})
    with pytest.raises(DeniedError, match="allow only images") as refused:
        svc.launch("wh", image="python:3.12")
    assert refused.value.denied == ["wh"]
    assert svc.cluster.count("create_pod") == 0
    assert svc.launch("wh", image=digest).created


def test_a_differing_second_launch_is_a_conflict_an_identical_one_reattaches() -> None:
    svc = make_services()
    first = svc.launch("wh")
    assert first.created
    again = svc.launch("wh")
    assert not again.created and again.launch_id == first.launch_id
    with pytest.raises(ConflictError, match="different request"):
        svc.launch("wh", image="attacker/image:latest")
    with pytest.raises(ConflictError):
        svc.launch(SecretRequest(name="wh", delivery=EnvDelivery(prefix="X_")))
    assert svc.cluster.count("create_pod") == 1
    assert [
        e.details.get("stage") for e in svc.audit.events if e.kind == EventKind.LAUNCH_FAILED
    ] == [
        "reattach",
        "reattach",
    ]


def test_a_newer_try_ends_the_earlier_tries_pod_and_revokes_it() -> None:
    svc = make_services()
    first = svc.launch("db", task_identity=make_task(try_number=1))
    held = svc.store.issued[0]
    second = svc.launch("db", task_identity=make_task(try_number=2))
    assert second.created and second.launch_id != first.launch_id
    wait_until(lambda: svc.cluster.read_pod(first.namespace, first.pod_name) is None)
    assert held.token_accessor in svc.store.revoked_accessors
    killed = [e for e in svc.audit.events if e.kind == EventKind.LAUNCH_KILLED]
    assert killed and killed[-1].details["reason"] == "superseded by try 2"
    assert svc.cluster.read_pod(second.namespace, second.pod_name) is not None


def test_the_sweep_ends_pods_whose_task_instance_airflow_has_ended() -> None:
    airflow = FakeTaskInstances()
    airflow.add(make_task("keep"))
    airflow.add(make_task("gone"))
    svc = services(airflow=airflow)
    kept = svc.launch("wh", task_identity=make_task("keep"))
    ended = svc.launch("db", task_identity=make_task("gone"))
    held = svc.store.issued[-1]
    assert svc.reconciler.sweep().ended_task_pods_killed == 0  # both still running
    airflow.add(make_task("gone"), state="failed")  # marked failed in Airflow
    assert svc.reconciler.sweep().ended_task_pods_killed == 1
    assert svc.cluster.read_pod(ended.namespace, ended.pod_name) is None
    assert held.token_accessor in svc.store.revoked_accessors
    assert svc.cluster.read_pod(kept.namespace, kept.pod_name) is not None
    killed = [e for e in svc.audit.events if e.kind == EventKind.LAUNCH_KILLED]
    assert (
        killed[-1].details["reason"]
        == "task instance ended in Airflow: its task instance is failed in Airflow"
    )


def two_tasks_swept_with_a_grace_of_30s() -> tuple[FakeTaskInstances, Services, list[float]]:
    """Airflow knows task instances "a" and "b"; the reconciler's clock is ``now[0]``."""
    airflow = FakeTaskInstances()
    airflow.add(make_task("a"))
    airflow.add(make_task("b"))
    now = [100.0]
    verifier = TaskVerifier(airflow, "enforce", cache_seconds=0)
    svc = make_services(verifier=verifier, ended_grace_seconds=30)
    svc.reconciler._clock = lambda: now[0]
    return airflow, svc, now


def test_the_sweep_waits_the_grace_and_asks_airflow_once_per_pass() -> None:
    airflow, svc, now = two_tasks_swept_with_a_grace_of_30s()
    svc.launch("wh", task_identity=make_task("a"))
    svc.launch("wh", task_identity=make_task("b"))
    airflow.records.clear()  # the run was deleted in Airflow
    calls = airflow.calls
    assert svc.reconciler.sweep().ended_task_pods_killed == 0  # grace starts
    assert airflow.calls == calls + 1  # one batched call for both launches
    now[0] += 31
    assert svc.reconciler.sweep().ended_task_pods_killed == 2


def test_the_sweep_asks_airflow_nothing_when_verification_is_off() -> None:
    airflow = FakeTaskInstances()
    svc = services("off", airflow=airflow)
    svc.launch("wh")
    svc.reconciler.sweep()
    assert airflow.calls == 0


def test_a_launch_missing_from_a_cut_short_answer_is_unknown_not_ended() -> None:
    airflow, svc, now = two_tasks_swept_with_a_grace_of_30s()
    first = svc.launch("wh", task_identity=make_task("a"))
    beyond = svc.launch("wh", task_identity=make_task("b"))
    airflow.add(make_task("a"), state="failed")
    airflow.cut_short_after = 1  # Airflow's answer holds "a" only, and says it is partial
    swept = svc.reconciler.sweep()
    assert swept.ended_task_pods_killed == 0 and any("cut short" in e for e in swept.errors)
    now[0] += 31
    swept = svc.reconciler.sweep()
    assert swept.ended_task_pods_killed == 1  # "a" is known to have failed
    assert svc.cluster.read_pod(first.namespace, first.pod_name) is None
    assert svc.cluster.read_pod(beyond.namespace, beyond.pod_name) is not None
    killed = [e for e in svc.audit.events if e.kind == EventKind.LAUNCH_KILLED]
    assert [e.launch_id for e in killed] == [first.launch_id]


def test_a_grace_clock_started_before_a_cut_short_answer_keeps_running() -> None:
    airflow, svc, now = two_tasks_swept_with_a_grace_of_30s()
    svc.launch("wh", task_identity=make_task("a"))
    gone = svc.launch("wh", task_identity=make_task("b"))
    del airflow.records[("etl_daily", "manual__1", "b", -1)]  # its run deleted in Airflow
    assert svc.reconciler.sweep().ended_task_pods_killed == 0  # grace starts
    airflow.cut_short_after = 1
    now[0] += 31
    assert svc.reconciler.sweep().ended_task_pods_killed == 0  # unknown: not judged
    airflow.cut_short_after = None
    assert svc.reconciler.sweep().ended_task_pods_killed == 1  # missing again, grace spent
    assert svc.cluster.read_pod(gone.namespace, gone.pod_name) is None
