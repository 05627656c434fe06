"""Dry-run launches (issue 13 item 9), the pod's events and the pending diagnosis in a
launch's status (item 3), and grants bound to pod templates (issue 12 item 5)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from broker.core.api_models import ContainerSpec, LaunchRequest
from broker.core.audit_events import EventKind
from broker.core.models import SecretRequest
from broker.core.objects import ContainerStatus, PodInfo
from broker.core.pending import diagnose_pending, pod_event, recent_events
from broker.core.policy import Grant, KvSecret, PolicySet, Team, decide
from broker.errors import DeniedError, KubernetesUnavailableError
from tests.unit.fakes import CALLER, OTHER_CALLER, Services, make_task

# -- dry run ---------------------------------------------------------------------------


def dry_request(*secrets: str, dag_id: str = "etl_daily") -> LaunchRequest:
    return LaunchRequest(
        task=make_task(dag_id=dag_id),
        container=ContainerSpec(image="python:3.12"),
        secrets=[SecretRequest(name=s) for s in secrets],
    )


def test_dry_run_plans_without_creating_or_reading(svc: Services) -> None:
    result = svc.launches.dry_run(CALLER, dry_request("wh", "db"))
    assert result.dry_run is True
    assert result.decision.allowed
    assert result.decision.matched_grants == ["etl/loaders"]
    assert [(r.name, r.kind, r.path) for r in result.vault_reads] == [
        ("wh", "kv", "secret/data/wh"),
        ("db", "database", "database/creds/ro"),
    ]
    assert result.token is not None and result.token.num_uses == 3
    env = {e["name"]: e for e in result.pod["spec"]["containers"][0]["env"]}
    assert env["WH_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == result.secret_name
    assert result.secret_keys_known
    # nothing created, nothing read, no token minted
    assert svc.cluster.pods == {} and svc.cluster.secrets == {}
    assert svc.store.issued == []
    (event,) = svc.audit.events
    assert event.kind == EventKind.LAUNCH_DRY_RUN
    assert event.details["allowed"] is True


def test_dry_run_of_a_kv_secret_without_declared_keys(svc: Services) -> None:
    result = svc.launches.dry_run(CALLER, dry_request("api"))
    assert not result.secret_keys_known
    assert result.vault_reads[0].keys is None


def test_a_denied_dry_run_is_a_decision_not_an_error(svc: Services) -> None:
    result = svc.launches.dry_run(CALLER, dry_request("wh", "nope"))
    assert not result.decision.allowed
    assert result.decision.unknown == ["nope"]
    assert result.vault_reads == [] and result.token is None
    assert svc.audit.events[0].details["denied"] == ["nope"]


def test_dry_run_still_checks_the_callers_scope(svc: Services) -> None:
    with pytest.raises(DeniedError):
        svc.launches.dry_run(OTHER_CALLER, dry_request("wh"))


# -- events and the pending diagnosis --------------------------------------------------


def test_status_of_a_pending_pod_carries_its_events(svc: Services) -> None:
    view = svc.launch("wh")
    pod = svc.cluster.pods[(view.namespace, view.pod_name)]
    svc.cluster.pods[(view.namespace, view.pod_name)] = dataclasses.replace(
        pod,
        containers=(ContainerStatus("base", "waiting", reason="ImagePullBackOff", message="nope"),),
    )
    svc.cluster.events[(view.namespace, view.pod_name)] = [
        pod_event(type="Warning", reason="Failed", message="pull failed", count=3, last_seen=None)
    ]
    status = svc.lookup.status(CALLER, view.launch_id)
    assert [e.reason for e in status.events] == ["Failed"]
    assert status.pending is not None
    assert (status.pending.kind, status.pending.permanent) == ("image_pull_error", True)


def test_status_without_events_when_the_api_cannot_list_them(svc: Services) -> None:
    view = svc.launch()
    svc.cluster._failures.fail("pod_events", KubernetesUnavailableError("down"))
    status = svc.lookup.status(CALLER, view.launch_id)
    assert status.events == [] and status.pending is None


def pod(*containers: ContainerStatus, **fields: object) -> PodInfo:
    return PodInfo(namespace="t", name="p", phase="Pending", containers=containers, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reason", "message", "kind", "permanent"),
    [
        ("InvalidImageName", "bad", "invalid_image", True),
        ("ErrImagePull", "429", "image_pull_error", False),
        ("ImagePullBackOff", "back-off", "image_pull_error", True),
        ("CreateContainerConfigError", 'configmap "x" not found', "config_error", True),
        # the broker's own Secret arrives just after the pod: that heals by itself
        ("CreateContainerConfigError", 'secret "podbroker-0123" not found', "config_error", False),
    ],
)
def test_waiting_reasons_are_classified(
    reason: str, message: str, kind: str, permanent: bool
) -> None:
    diagnosis = diagnose_pending(
        pod(ContainerStatus("base", "waiting", reason=reason, message=message)), []
    )
    assert diagnosis is not None
    assert (diagnosis.kind, diagnosis.permanent, diagnosis.reason) == (kind, permanent, reason)


def test_unschedulable_from_the_condition_or_the_events() -> None:
    from_condition = diagnose_pending(pod(unschedulable="0/1 nodes are available"), [])
    assert from_condition is not None and from_condition.kind == "unschedulable"
    assert not from_condition.permanent
    event = pod_event(
        type="Warning", reason="FailedScheduling", message="no nodes", count=1, last_seen=None
    )
    assert diagnose_pending(pod(), [event]) is not None
    assert diagnose_pending(pod(scheduled=True), [event]) is None  # an old event
    assert diagnose_pending(dataclasses.replace(pod(), phase="Running"), [event]) is None


def test_events_are_bounded_and_newest_first() -> None:
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    events = [
        pod_event(
            type="Warning",
            reason=f"R{i}",
            message="x\x1b[31m" + "y" * 2000,
            count=None,
            last_seen=base + dt.timedelta(seconds=i),
        )
        for i in range(30)
    ]
    recent = recent_events(events)
    assert [e.reason for e in recent[:2]] == ["R29", "R28"]
    assert len(recent) == 10
    assert all(len(e.message) <= 500 and "\x1b" not in e.message for e in recent)
    assert recent[0].count == 1


# -- grants bound to pod templates -------------------------------------------------------


def test_a_grant_can_require_pod_templates() -> None:
    policy = PolicySet(
        catalog={"wh": KvSecret(mount="secret", path="wh")},
        teams={
            "etl": Team(
                grants=(Grant(id="g", dags="etl_*", secrets=("wh",), pod_templates=("sealed",)),)
            )
        },
    )
    requests = [SecretRequest(name="wh")]
    assert decide(policy, make_task(), requests, pod_template="sealed").allowed
    for template in (None, "small"):
        decision = decide(policy, make_task(), requests, pod_template=template)
        assert not decision.allowed and decision.denied == ["wh"]
        assert (
            "secret 'wh'" in decision.reasons[0] and "pod templates sealed" in decision.reasons[0]
        )
