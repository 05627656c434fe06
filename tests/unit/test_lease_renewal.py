"""Lease renewal of running launches: at about two thirds of the TTL with jitter, never
past the grant's cap, recorded sparingly, state in the ledger (a restart or a second
replica continues, exactly one replica renews a lease), stopped once released."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.audit.holdings import HoldingsLedger
from broker.audit.store import open_audit_store
from broker.core.audit_events import EventKind
from broker.core.leases import IssuedLease, next_renewal_at, renewal_step
from broker.core.plan import SecretLimits
from broker.errors import VaultUnavailableError
from broker.service.renewal import LeaseRenewer
from tests.unit.fakes import FakeAudit, FakeResolved, FakeSecretStore


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_renewal_time_is_two_thirds_with_jitter_and_before_expiry() -> None:
    assert next_renewal_at(0, 30, 0) == pytest.approx(20)
    assert next_renewal_at(0, 30, 1) == pytest.approx(23)
    assert next_renewal_at(0, 30, -1) == pytest.approx(17)
    assert next_renewal_at(0, 1.2, 1) == pytest.approx(0.2)  # at least 1 s before expiry


def test_renewal_step_never_passes_the_cap() -> None:
    assert renewal_step(0, 10, 100) == (step := renewal_step(0, 10, 100))
    assert (step.increment, step.reaches_cap) == (10, False)
    last = renewal_step(95, 10, 100)
    assert (last.increment, last.reaches_cap) == (5, True)
    assert renewal_step(100, 10, 100).capped


@pytest.fixture
def ledger(tmp_path: Path) -> HoldingsLedger:
    return open_audit_store(f"sqlite:///{tmp_path / 'audit.db'}").holdings()


def renewer(
    ledger: HoldingsLedger, store: FakeSecretStore, audit: FakeAudit, clock: Clock
) -> LeaseRenewer:
    return LeaseRenewer(ledger=ledger, secrets=store, audit=audit, clock=clock, jitter=lambda: 0)


class Bundle:
    def __init__(self, *secrets: FakeResolved) -> None:
        self.secrets = list(secrets)
        self.token_accessor = "acc"

    @property
    def lease_ids(self) -> list[str]:
        return [s.lease_id for s in self.secrets if s.lease_id]


def issue(ledger: HoldingsLedger, renew: LeaseRenewer, *, ttl: int, cap: int) -> str:
    lease_id = "database/creds/ro/lease-1"
    ledger.hold("launch-1", "tasks", token_accessor="acc", lease_ids=[lease_id])
    secret = FakeResolved(
        "db", {}, "database/creds/ro", None, lease_id, lease_ttl=ttl, lease_cap=cap, grant="g/x"
    )
    renew.track("launch-1", Bundle(secret))
    return lease_id


def test_a_lease_is_renewed_until_its_cap_then_capped_once(ledger: HoldingsLedger) -> None:
    store, audit, clock = FakeSecretStore(), FakeAudit(), Clock()
    renew = renewer(ledger, store, audit, clock)
    lease_id = issue(ledger, renew, ttl=30, cap=100)
    assert renew.renew_due() == 0  # not yet due
    for _ in range(10):
        clock.now += 20
        renew.renew_due()
    assert store.renewals == [(lease_id, 30), (lease_id, 30), (lease_id, 30), (lease_id, 20)]
    assert [e.kind for e in audit.events] == [EventKind.LEASE_RENEWED, EventKind.LEASE_CAPPED]
    capped = audit.events[-1]
    assert capped.details["by"] == "grant max_lease_ttl"
    assert capped.secret_names == ("db",) and capped.launch_id == "launch-1"
    assert ledger.due_leases(clock.now + 10_000, 10) == []


def test_vault_max_ttl_below_the_cap_is_recorded_as_the_cap(ledger: HoldingsLedger) -> None:
    store, audit, clock = FakeSecretStore(max_ttl=12), FakeAudit(), Clock()
    renew = renewer(ledger, store, audit, clock)
    issue(ledger, renew, ttl=30, cap=1000)
    clock.now += 20
    renew.renew_due()
    assert [e.kind for e in audit.events] == [EventKind.LEASE_CAPPED]
    assert audit.events[0].details["by"] == "Vault max TTL"


def test_released_launches_are_not_renewed(ledger: HoldingsLedger) -> None:
    store, audit, clock = FakeSecretStore(), FakeAudit(), Clock()
    renew = renewer(ledger, store, audit, clock)
    issue(ledger, renew, ttl=30, cap=1000)
    ledger.released("launch-1")
    clock.now += 25
    assert renew.renew_due() == 0 and store.renewals == []


def test_exactly_one_replica_renews_and_a_restart_continues(ledger: HoldingsLedger) -> None:
    store, audit, clock = FakeSecretStore(), FakeAudit(), Clock()
    first = renewer(ledger, store, audit, clock)
    issue(ledger, first, ttl=30, cap=1000)
    clock.now += 21
    due = ledger.due_leases(clock.now, 10)
    assert len(due) == 1
    claims = [ledger.claim_lease(due[0].lease_id, clock.now, clock.now + 15) for _ in range(3)]
    assert claims == [True, False, False]
    # The claimer died: its claim lapses and a new process (same ledger) renews.
    clock.now += 16
    restarted = renewer(ledger, store, audit, clock)
    assert restarted.renew_due() == 1
    assert len(store.renewals) == 1


def test_a_vault_outage_retries_soon_without_losing_the_lease(ledger: HoldingsLedger) -> None:
    store, audit, clock = FakeSecretStore(), FakeAudit(), Clock()
    renew = renewer(ledger, store, audit, clock)
    issue(ledger, renew, ttl=30, cap=1000)
    store.fail("renew", VaultUnavailableError("Vault down"))
    clock.now += 20
    renew.renew_due()
    assert store.renewals == []
    clock.now += 3
    renew.renew_due()
    assert len(store.renewals) == 1


def test_after_a_restart_overdue_leases_are_taken_a_batch_at_a_time(
    ledger: HoldingsLedger,
) -> None:
    store, audit, clock = FakeSecretStore(), FakeAudit(), Clock()
    renew = renewer(ledger, store, audit, clock)
    renew.batch = 5
    for n in range(12):
        ledger.hold(f"launch-{n}", "tasks", lease_ids=[f"lease-{n}"])
        renew.track(
            f"launch-{n}",
            Bundle(FakeResolved("db", {}, "p", None, f"lease-{n}", lease_ttl=30, lease_cap=900)),
        )
    clock.now += 25
    assert [renew.renew_due() for _ in range(4)] == [5, 5, 2, 0]


def test_dynamic_token_lives_as_long_as_the_largest_cap_kv_gets_a_batch_token() -> None:
    limits = SecretLimits()
    assert limits.kv_token_ttl <= 30
    assert IssuedLease("l", "db", "g", 10, 100, 5.0).cap_at == 105.0
