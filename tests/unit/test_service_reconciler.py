"""The reconciler's watch reaction and each branch of its sweep, on in-memory ports.
Ages come from creation times in the past (the sweep reads the wall clock)."""

from __future__ import annotations

import dataclasses

from broker.core import podmeta
from broker.core.audit_events import EventKind
from broker.core.plan import secret_name_for
from broker.errors import KubernetesUnavailableError
from tests.unit.fakes import NAMESPACE, Services, ago, make_task

GRACE = 60  # make_services' orphan grace
RETENTION = 600  # make_services' pod retention
ORPHAN_ID = "0123456789abcdef0123"


def test_orphan_secret_past_grace_is_released_and_revoked(svc: Services) -> None:
    svc.cluster.add_secret(
        ORPHAN_ID, lease_ids=["l-1"], accessor="acc-1", created_at=ago(GRACE + 5)
    )
    result = svc.reconciler.sweep()
    assert result.orphan_secrets_deleted == 1
    assert svc.cluster.secrets == {}
    assert svc.store.revoked_leases == ["l-1"]
    assert svc.store.revoked_accessors == ["acc-1"]
    (step,) = svc.audit.of_kind(EventKind.RECONCILER_CLEANUP)
    assert step.details["action"] == "delete orphan secret"


def test_orphan_secret_within_grace_is_kept(svc: Services) -> None:
    # Its pod may be about to appear: a launch creates the Secret right after the pod.
    svc.cluster.add_secret(ORPHAN_ID, created_at=ago(GRACE - 30))
    assert svc.reconciler.sweep().orphan_secrets_deleted == 0
    assert len(svc.cluster.secrets) == 1
    assert svc.store.revoked_accessors == []


def test_finished_unclaimed_pod_is_cleaned_and_kept_for_retention(svc: Services) -> None:
    pod = svc.cluster.add_pod(make_task(), phase="Failed", exit_code=3, secret_names=["wh"])
    svc.cluster.add_secret_for(pod, accessor="acc-1")
    result = svc.reconciler.sweep()
    assert result.secrets_cleaned == 1
    assert svc.cluster.secrets == {}
    assert svc.store.revoked_accessors == ["acc-1"]
    kept = svc.cluster.pods[(NAMESPACE, pod.name)]
    assert kept.claimed
    (finished,) = svc.audit.of_kind(EventKind.POD_FINISHED)
    assert finished.details == {"phase": "Failed", "exit_code": 3}


def test_claimed_pod_whose_secret_survived_its_claimant_is_forced(svc: Services) -> None:
    pod = svc.cluster.add_pod(
        make_task(), phase="Succeeded", secret_names=["wh"], claimed_at=ago(GRACE + 5)
    )
    svc.cluster.add_secret_for(pod, accessor="acc-1")
    result = svc.reconciler.sweep()
    assert result.secrets_cleaned == 1
    assert svc.cluster.secrets == {}
    assert svc.store.revoked_accessors == ["acc-1"]


def test_recently_claimed_pod_is_left_to_its_claimant(svc: Services) -> None:
    pod = svc.cluster.add_pod(
        make_task(), phase="Succeeded", secret_names=["wh"], claimed_at=ago(1)
    )
    svc.cluster.add_secret_for(pod)
    result = svc.reconciler.sweep()
    assert result.secrets_cleaned == 0
    assert len(svc.cluster.secrets) == 1


def test_pod_without_its_secret_past_grace_is_deleted(svc: Services) -> None:
    pod = svc.cluster.add_pod(make_task(), secret_names=["wh"], created_at=ago(GRACE + 5))
    result = svc.reconciler.sweep()
    assert result.orphan_pods_deleted == 1
    assert svc.cluster.deleted_pods == [(NAMESPACE, pod.name)]


def test_young_or_deleting_pods_without_secret_are_kept(svc: Services) -> None:
    svc.cluster.add_pod(make_task("young"), secret_names=["wh"], created_at=ago(GRACE - 30))
    svc.cluster.add_pod(
        make_task("going"), secret_names=["wh"], created_at=ago(GRACE + 5), deleting=True
    )
    svc.cluster.add_pod(make_task("plain"), created_at=ago(GRACE + 5))  # asked for no secrets
    assert svc.reconciler.sweep().orphan_pods_deleted == 0
    assert svc.cluster.count("delete_pod") == 0


def test_retained_pod_past_retention_is_deleted(svc: Services) -> None:
    old = svc.cluster.add_pod(make_task("old"), phase="Succeeded", claimed_at=ago(RETENTION + 5))
    svc.cluster.add_pod(make_task("recent"), phase="Succeeded", claimed_at=ago(RETENTION - 60))
    result = svc.reconciler.sweep()
    assert result.expired_pods_deleted == 1
    assert svc.cluster.deleted_pods == [(NAMESPACE, old.name)]


def test_pending_pod_past_its_deadline_is_deleted_and_its_secret_released(
    svc: Services,
) -> None:
    deadline = 30
    pod = svc.cluster.add_pod(
        make_task(),
        secret_names=["db"],
        active_deadline_seconds=deadline,
        created_at=ago(deadline + GRACE + 5),
    )
    svc.cluster.add_secret_for(pod, lease_ids=["l-1"], accessor="acc-1")
    result = svc.reconciler.sweep()
    assert result.orphan_pods_deleted == 1
    assert svc.cluster.pods == {}
    assert svc.cluster.secrets == {}
    assert svc.store.revoked_leases == ["l-1"]
    assert svc.store.revoked_accessors == ["acc-1"]


def test_pending_pod_within_its_deadline_is_kept(svc: Services) -> None:
    pod = svc.cluster.add_pod(
        make_task(), secret_names=["db"], active_deadline_seconds=3600, created_at=ago(GRACE + 5)
    )
    svc.cluster.add_secret_for(pod)
    svc.reconciler.sweep()
    assert svc.cluster.count("delete_pod") == 0
    assert len(svc.cluster.secrets) == 1


def test_sweep_reports_a_namespace_it_could_not_list(svc: Services) -> None:
    svc.cluster.fail("list_managed_pods", KubernetesUnavailableError("api server gone"))
    result = svc.reconciler.sweep()
    assert result.errors == [f"{NAMESPACE}: api server gone"]


# -- watch events ---------------------------------------------------------------------------


def test_deleted_event_revokes_through_the_secrets_annotations(svc: Services) -> None:
    pod = svc.cluster.add_pod(make_task(), phase="Running", secret_names=["db"])
    svc.cluster.add_secret_for(pod, lease_ids=["l-1"], accessor="acc-1")
    del svc.cluster.pods[(NAMESPACE, pod.name)]  # someone else deleted it
    svc.reconciler.on_pod_event("DELETED", pod)
    assert svc.store.revoked_leases == ["l-1"]
    assert svc.store.revoked_accessors == ["acc-1"]
    assert svc.cluster.deleted_secrets == [(NAMESPACE, secret_name_for(str(pod.launch_id)))]


def test_deleted_event_of_a_claimed_pod_is_left_to_its_claimant(svc: Services) -> None:
    pod = svc.cluster.add_pod(
        make_task(), phase="Succeeded", secret_names=["db"], claimed_at=ago(1)
    )
    svc.cluster.add_secret_for(pod)
    svc.reconciler.on_pod_event("DELETED", pod)
    assert svc.store.revoked_accessors == []


def test_a_pod_ending_is_cleaned_at_once(svc: Services) -> None:
    pod = svc.cluster.add_pod(make_task(), phase="Running", secret_names=["wh"])
    svc.cluster.add_secret_for(pod, accessor="acc-1")
    svc.reconciler.on_pod_event("MODIFIED", pod)
    assert svc.store.revoked_accessors == []
    ended = svc.cluster.set_phase(NAMESPACE, pod.name, "Succeeded", exit_code=0)
    svc.reconciler.on_pod_event("MODIFIED", ended)
    assert svc.store.revoked_accessors == ["acc-1"]
    assert svc.cluster.secrets == {}


def test_a_failing_cleanup_on_an_event_is_left_to_the_sweep(svc: Services) -> None:
    pod = svc.cluster.add_pod(make_task(), phase="Succeeded", secret_names=["wh"])
    svc.cluster.add_secret_for(pod, accessor="acc-1")
    svc.cluster.fail("delete_secret", KubernetesUnavailableError("api server gone"))
    svc.reconciler.on_pod_event("MODIFIED", pod)  # logged, not raised
    assert len(svc.cluster.secrets) == 1
    svc.reconciler.sweep()  # the claim is fresh: the sweep waits out the grace first
    assert len(svc.cluster.secrets) == 1
    # Time passes: the claim is now older than the grace.
    key = (NAMESPACE, pod.name)
    claimed = svc.cluster.pods[key]
    svc.cluster.pods[key] = dataclasses.replace(
        claimed, annotations={**claimed.annotations, **podmeta.claim_annotations(ago(GRACE + 5))}
    )
    assert svc.reconciler.sweep().secrets_cleaned == 1
    assert svc.cluster.secrets == {}
    assert svc.store.revoked_accessors == ["acc-1"]


def test_a_pod_deleted_while_being_claimed_does_not_stop_the_sweep(svc: Services) -> None:
    gone = svc.cluster.add_pod(make_task("gone"), phase="Succeeded", secret_names=["wh"])
    svc.cluster.add_secret_for(gone, accessor="acc-gone")
    other = svc.cluster.add_pod(make_task("other"), phase="Succeeded", secret_names=["wh"])
    svc.cluster.add_secret_for(other, accessor="acc-other")
    # Someone deletes the first pod between the sweep's list and its claim.
    svc.cluster.before("claim_pod", lambda: svc.cluster.pods.pop((NAMESPACE, gone.name)))
    result = svc.reconciler.sweep()
    assert result.errors == []
    assert "acc-other" in svc.store.revoked_accessors
