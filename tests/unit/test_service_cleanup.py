"""Cleanup at a pod's end: exactly one replica claims the pod and gives back what its
launch held (Secret deleted, leases and child token revoked)."""

from __future__ import annotations

import threading

from broker.core.audit_events import EventKind
from broker.core.objects import PodInfo
from broker.errors import VaultUnavailableError
from tests.unit.fakes import Services, ago, make_task

LEASE = "database/creds/ro/lease-1"


def finished_pod_with_secret(svc: Services, *, claimed: bool = False) -> PodInfo:
    pod = svc.cluster.add_pod(
        make_task(),
        phase="Succeeded",
        exit_code=0,
        secret_names=["db"],
        claimed_at=ago(5) if claimed else None,
    )
    svc.cluster.add_secret_for(pod, lease_ids=[LEASE], accessor="acc-1")
    return pod


def test_two_replicas_finishing_the_same_pod_give_back_once(svc: Services) -> None:
    pod = finished_pod_with_secret(svc)
    first, second = svc.cleanup, svc.replica()
    # Both saw the same pod event (same resourceVersion).
    first.finish(pod)
    second.finish(pod)
    assert len(svc.cluster.deleted_secrets) == 1
    assert svc.store.revoked_leases == [LEASE]
    assert svc.store.revoked_accessors == ["acc-1"]
    assert svc.audit.kinds().count(EventKind.POD_FINISHED) == 1
    assert svc.cluster.count("claim_pod") == 2


def test_two_replicas_racing_in_threads_give_back_once(svc: Services) -> None:
    pod = finished_pod_with_secret(svc)
    replicas = [svc.cleanup, svc.replica()]
    start = threading.Barrier(len(replicas))

    def finish(replica_index: int) -> None:
        start.wait()
        replicas[replica_index].finish(pod)

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(len(replicas))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert svc.store.revoked_accessors == ["acc-1"]
    assert len(svc.cluster.deleted_secrets) == 1


def test_a_claimed_pod_is_left_to_its_claimant(svc: Services) -> None:
    pod = finished_pod_with_secret(svc, claimed=True)
    svc.cleanup.finish(pod)
    assert svc.cluster.count("claim_pod") == 0
    assert svc.cluster.deleted_secrets == []
    assert svc.store.revoked_accessors == []


def test_force_finishes_a_claimed_pod_whose_secret_remains(svc: Services) -> None:
    pod = finished_pod_with_secret(svc, claimed=True)
    svc.cleanup.finish(pod, force=True)
    assert svc.cluster.secrets == {}
    assert svc.store.revoked_leases == [LEASE]
    assert svc.store.revoked_accessors == ["acc-1"]
    assert EventKind.POD_FINISHED not in svc.audit.kinds()


def test_a_pod_changed_since_it_was_seen_is_still_claimed(svc: Services) -> None:
    stale = finished_pod_with_secret(svc)
    svc.cluster.set_phase(stale.namespace, stale.name, "Succeeded", exit_code=0)
    svc.cleanup.finish(stale)
    assert svc.cluster.count("claim_pod") == 2  # refused on the old version, then taken
    assert svc.cluster.pods[(stale.namespace, stale.name)].claimed
    assert svc.store.revoked_accessors == ["acc-1"]


def test_secret_is_deleted_even_when_vault_and_audit_are_down(svc: Services) -> None:
    pod = finished_pod_with_secret(svc)
    svc.store.fail("revoke", VaultUnavailableError("sealed"))
    svc.audit.down = True
    svc.cleanup.finish(pod)
    assert svc.cluster.secrets == {}
    assert svc.store.revoked_leases == []
    assert svc.audit.events == []


def test_a_failed_revoke_is_recorded_as_not_revoked(svc: Services) -> None:
    pod = finished_pod_with_secret(svc)
    svc.store.fail("revoke_token", VaultUnavailableError("sealed"))
    svc.cleanup.finish(pod)
    (revoked,) = svc.audit.of_kind(EventKind.LEASES_REVOKED)
    assert revoked.details["revoked"] is False
    assert revoked.details["error"] == VaultUnavailableError.__name__
    assert revoked.details["lease_ids"] == [LEASE]


def test_two_replicas_releasing_the_same_secret_record_and_revoke_once(svc: Services) -> None:
    """Both surviving replicas read a crashed claimant's Secret, then release it (the
    scale-out bench found launches whose Secret deletion was recorded twice)."""
    pod = finished_pod_with_secret(svc, claimed=True)
    meta = svc.cluster.read_secret_metadata(pod.namespace, f"podbroker-{pod.launch_id}")
    assert meta is not None
    svc.cleanup.release_secret(meta, reason="pod ended")
    svc.replica().release_secret(meta, reason="pod ended")
    assert svc.audit.kinds().count(EventKind.SECRET_DELETED) == 1
    assert svc.store.revoked_leases == [LEASE]
    assert svc.store.revoked_accessors == ["acc-1"]


def test_a_secret_deleted_by_someone_else_is_given_back_from_the_ledger(svc: Services) -> None:
    view = svc.launch("db")
    bundle = svc.store.issued[0]
    meta = svc.cluster.read_secret_metadata(view.namespace, f"podbroker-{view.launch_id}")
    assert meta is not None
    svc.cluster.secrets.clear()  # the garbage collector (or another replica) was first
    svc.cleanup.release_secret(meta, reason="pod ended")
    assert EventKind.SECRET_DELETED not in svc.audit.kinds()
    assert svc.store.revoked_leases == list(bundle.lease_ids)
    assert svc.store.revoked_accessors == [bundle.token_accessor]
    assert svc.ledger.held(view.launch_id) is None


def test_a_pods_end_is_recorded_in_one_commit_once_it_is_undone(svc: Services) -> None:
    """The Secret is deleted and Vault given back before anything waits for the audit
    store; the steps then go in one commit, in the order they happened, and the
    launch's ledger row is closed in that same commit (a broker killed before it leaves
    the row open for the sweep instead of losing the records)."""
    pod = finished_pod_with_secret(svc)
    svc.ledger.hold(pod.launch_id, pod.namespace, lease_ids=[LEASE], token_accessor="acc-1")

    def row_open() -> bool:
        return pod.launch_id in {held.launch_id for held in svc.ledger.unreleased()}

    commits: list[tuple[list[EventKind], list[str]]] = []
    undone_before_commit: list[bool] = []
    open_before_commit: list[bool] = []
    append_many = svc.audit.append_many

    def recording(events, *, opens=None, releases=()):  # type: ignore[no-untyped-def]
        undone_before_commit.append(
            len(svc.cluster.deleted_secrets) == 1 and svc.store.revoked_leases == [LEASE]
        )
        open_before_commit.append(row_open())
        commits.append(([event.kind for event in events], list(releases)))
        return append_many(events, opens=opens, releases=releases)

    svc.audit.append_many = recording  # type: ignore[method-assign]
    svc.cleanup.finish(pod)
    assert commits == [
        (
            [EventKind.POD_FINISHED, EventKind.SECRET_DELETED, EventKind.LEASES_REVOKED],
            [pod.launch_id],
        )
    ]
    assert undone_before_commit == [True]
    assert open_before_commit == [True]
    assert not row_open()


def test_a_kill_is_recorded_with_its_steps_in_one_commit(svc: Services) -> None:
    pod = svc.cluster.add_pod(make_task(), phase="Running", secret_names=["db"])
    svc.cluster.add_secret_for(pod, lease_ids=[LEASE], accessor="acc-1")
    before = len(svc.audit.events)
    svc.cleanup.end_launch(pod, "superseded by try 2", cleanup_reason="superseded")
    kinds = [event.kind for event in svc.audit.events[before:]]
    assert kinds == [EventKind.LAUNCH_KILLED, EventKind.SECRET_DELETED, EventKind.LEASES_REVOKED]
    assert svc.cluster.deleted_secrets and svc.store.revoked_accessors == ["acc-1"]
