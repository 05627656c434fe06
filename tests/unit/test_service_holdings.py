"""The holdings ledger is the source of truth for giving back what Vault issued: it is
written before values are used and read by every kill, sweep and rollback (in-memory
ports; the real-stack regressions are in tests/integration/test_broker_holdings.py)."""

from __future__ import annotations

import threading

import pytest

from broker.core.audit_events import EventKind
from broker.core.podmeta import VaultHoldings
from broker.errors import BrokerUnavailableError, KubernetesUnavailableError, VaultUnavailableError
from tests.unit.fakes import CALLER, make_services, make_task, wait_until


def test_a_launch_records_its_token_and_leases_and_its_end_releases_them() -> None:
    svc = make_services()
    view = svc.launch("db")
    bundle = svc.store.issued[0]
    assert svc.ledger.held(view.launch_id) == VaultHoldings(
        tuple(bundle.lease_ids), bundle.token_accessor
    )
    pod = svc.cluster.read_pod(view.namespace, view.pod_name)
    assert pod is not None
    svc.lookup.kill(CALLER, view.launch_id)
    assert svc.ledger.held(view.launch_id) is None
    assert bundle.token_accessor in svc.store.revoked_accessors


def test_a_kv_only_launch_makes_no_holdings_write_beyond_its_opening() -> None:
    """A batch token has no accessor and KV reads no lease: nothing to give back, so no
    commit for it (one durable write less per KV launch); a dynamic launch records both."""
    svc = make_services()
    svc.store.batch_tokens = True
    kv = svc.launch("wh")
    assert svc.ledger.holds == 1  # the opening, with the launch's intent
    assert svc.ledger.held(kv.launch_id) == VaultHoldings((), None)
    svc.launch("db", task_identity=make_task("dynamic"))
    assert svc.ledger.holds == 1 + 3  # opening, token accessor, leases


def test_reads_that_fail_after_the_mint_give_the_token_back() -> None:
    svc = make_services()
    svc.store.fail("resolve", VaultUnavailableError("vault down"))
    with pytest.raises(VaultUnavailableError):
        svc.launch("db")
    (launch_id,) = svc.ledger.rows
    assert svc.ledger.held(launch_id) is None  # released
    assert svc.store.revoked_accessors == [svc.ledger.rows[launch_id][1].token_accessor]


def test_the_sweep_revokes_holdings_whose_pod_is_gone() -> None:
    svc = make_services(grace_seconds=60)
    view = svc.launch("db", task_identity=make_task("crashed"))
    accessor = svc.store.issued[0].token_accessor
    # The pod and its Secret vanished while the broker was down (GC, a crash...).
    svc.cluster.pods.clear()
    svc.cluster.secrets.clear()
    assert svc.reconciler.sweep().orphan_holdings_revoked == 0  # within the grace
    svc.ledger.age(view.launch_id, 120)
    assert svc.reconciler.sweep().orphan_holdings_revoked == 1
    assert accessor in svc.store.revoked_accessors
    assert svc.ledger.held(view.launch_id) is None
    assert svc.reconciler.sweep().orphan_holdings_revoked == 0  # once


def test_the_sweep_leaves_running_launches_alone() -> None:
    svc = make_services(grace_seconds=0)
    view = svc.launch("db")
    svc.ledger.age(view.launch_id, 3600)
    assert svc.reconciler.sweep().orphan_holdings_revoked == 0
    assert svc.ledger.held(view.launch_id) is not None


def test_a_sweep_that_cannot_list_the_pods_revokes_nothing() -> None:
    """With the API server unreachable no pod seems to run; that is no reason to revoke
    the leases of launches that do (make chaos found it freezing the API server)."""
    svc = make_services(grace_seconds=0)
    view = svc.launch("db")
    svc.ledger.age(view.launch_id, 3600)
    svc.cluster.fail("list_managed_pods", KubernetesUnavailableError("api server frozen"))
    result = svc.reconciler.sweep()
    assert result.errors and result.orphan_holdings_revoked == 0
    assert svc.store.revoked_leases == [] and svc.store.revoked_accessors == []
    assert svc.ledger.held(view.launch_id) is not None


def test_a_deleted_pod_whose_secret_is_already_gone_is_revoked_from_the_ledger() -> None:
    svc = make_services()
    view = svc.launch("db")
    pod = svc.cluster.read_pod(view.namespace, view.pod_name)
    assert pod is not None
    accessor = svc.store.issued[0].token_accessor
    svc.cluster.pods.clear()
    svc.cluster.secrets.clear()  # the garbage collector was first
    svc.reconciler.on_pod_event("DELETED", pod)
    assert accessor in svc.store.revoked_accessors
    assert svc.ledger.held(view.launch_id) is None


def test_a_failed_revocation_stays_in_the_ledger_for_the_next_sweep() -> None:
    svc = make_services(grace_seconds=0)
    view = svc.launch("db")
    svc.store.fail("revoke_token", VaultUnavailableError("vault down"), times=1)
    svc.lookup.kill(CALLER, view.launch_id)
    assert svc.ledger.held(view.launch_id) is not None  # not given back yet
    svc.ledger.age(view.launch_id, 10)
    assert svc.reconciler.sweep().orphan_holdings_revoked == 1
    assert svc.ledger.held(view.launch_id) is None


def test_a_kill_does_not_wait_for_a_down_audit_store_and_records_afterwards() -> None:
    svc = make_services()
    view = svc.launch("db")
    accessor = svc.store.issued[0].token_accessor
    svc.audit.down = True
    svc.ledger.down = True
    killed = svc.lookup.kill(CALLER, view.launch_id)
    assert killed.phase == "Deleted"
    assert svc.cluster.read_pod(view.namespace, view.pod_name) is None
    assert accessor in svc.store.revoked_accessors  # undone although nothing was recorded
    svc.audit.down = False
    svc.ledger.down = False
    wait_until(
        lambda: {EventKind.LAUNCH_KILLED, EventKind.LEASES_REVOKED} <= set(svc.audit.kinds()),
        timeout=10,
    )


def test_a_second_attempt_of_a_try_in_flight_is_refused_before_vault_is_asked() -> None:
    """Two requests for one task try (an operator's retry reaching another replica while
    the first still launches): one launch id, one record of what Vault issued. The
    second waits (retryable) instead of minting a token the record cannot keep."""
    svc = make_services()
    task = make_task("raced")
    first = svc.launch("db", task_identity=task)
    svc.cluster.pods.clear()  # as if the first were between its intent and its pod
    with pytest.raises(BrokerUnavailableError, match="still launching"):
        svc.launch("db", task_identity=task)
    assert len(svc.store.issued) == 1  # nothing minted for the second
    assert svc.ledger.held(first.launch_id) == VaultHoldings(
        tuple(svc.store.issued[0].lease_ids), svc.store.issued[0].token_accessor
    )


def test_a_duplicate_arriving_while_its_try_launches_reattaches_once_the_pod_exists() -> None:
    """Concurrent duplicates (an HTTP retry, two schedulers) get the pod the attempt in
    flight makes, as a duplicate a moment later would, and mint nothing themselves.
    (Regression: they were answered 503 while the first attempt was still launching.)"""
    svc = make_services()
    svc.launches.other_attempt_wait = 5.0
    task = make_task("duplicated")
    first = svc.launch("db", task_identity=task)
    pods = dict(svc.cluster.pods)
    svc.cluster.pods.clear()  # as if the first were between its intent and its pod
    threading.Timer(0.2, lambda: svc.cluster.pods.update(pods)).start()
    second = svc.launch("db", task_identity=task)
    assert (second.launch_id, second.created) == (first.launch_id, False)
    assert len(svc.store.issued) == 1  # nothing minted for the duplicate
    assert svc.audit.kinds().count(EventKind.LAUNCH_REATTACHED) == 1


def test_a_pod_create_that_fails_closes_the_launchs_row_so_a_retry_can_open_it() -> None:
    svc = make_services()
    task = make_task("api-down")
    svc.cluster.fail("create_pod", KubernetesUnavailableError("api server gone"))
    with pytest.raises(KubernetesUnavailableError):
        svc.launch(task_identity=task)
    view = svc.launch(task_identity=task)  # the operator's in-process retry
    assert view.created
