"""Lease renewal as plain arithmetic: when a lease is renewed, by how much, and when it
has reached its grant's cap. The renewal loop (``broker.service.renewal``) executes
these decisions; times are seconds since the epoch."""

from __future__ import annotations

from dataclasses import dataclass

RENEW_AT_FRACTION = 2 / 3
"""A lease is renewed once this fraction of its TTL has passed."""
JITTER_FRACTION = 0.1
"""Renewal times are spread by up to this fraction of the TTL either way, so leases
issued together (or found overdue after a restart) are not all renewed at once."""
MIN_LEAD_SECONDS = 1.0
"""Renew at least this long before a lease expires, however short its TTL."""


@dataclass(frozen=True)
class IssuedLease:
    """A dynamic credential's lease as issued to a launch: ``ttl_seconds`` is the TTL
    Vault gave it (what each renewal asks for again), ``cap_seconds`` the grant's
    ``max_lease_ttl`` counted from ``issued_at``."""

    lease_id: str
    secret_name: str
    grant: str
    ttl_seconds: int
    cap_seconds: int
    issued_at: float

    @property
    def cap_at(self) -> float:
        return self.issued_at + self.cap_seconds


def next_renewal_at(now: float, ttl_seconds: float, jitter: float) -> float:
    """When to renew a lease that has ``ttl_seconds`` left at ``now``: at about two
    thirds of it, moved by ``jitter`` (in [-1, 1]) times JITTER_FRACTION of the TTL, and
    never later than MIN_LEAD_SECONDS before it expires."""
    jitter = max(-1.0, min(1.0, jitter))
    at = now + ttl_seconds * (RENEW_AT_FRACTION + JITTER_FRACTION * jitter)
    return max(now, min(at, now + ttl_seconds - MIN_LEAD_SECONDS))


@dataclass(frozen=True)
class RenewalStep:
    """What to do with a due lease: renew it by ``increment`` seconds, or nothing more
    (``capped``: its next renewal would reach the grant's cap; Vault lets it expire
    there)."""

    increment: int
    reaches_cap: bool

    @property
    def capped(self) -> bool:
        return self.increment <= 0


def renewal_step(now: float, ttl_seconds: int, cap_at: float) -> RenewalStep:
    """The increment for a renewal at ``now``: the lease's own TTL again, cut so the
    lease never outlives ``cap_at``. ``reaches_cap`` when this renewal ends at the cap
    (it is the last one)."""
    left = int(cap_at - now)
    if left <= 0:
        return RenewalStep(0, True)
    if left <= ttl_seconds:
        return RenewalStep(left, True)
    return RenewalStep(ttl_seconds, False)


@dataclass(frozen=True)
class LeaseRecord:
    """A lease as the ledger keeps it for renewal (times in epoch seconds)."""

    lease_id: str
    launch_id: str
    secret_name: str
    grant: str
    ttl_seconds: int
    cap_at: float
    expires_at: float
    renewals: int = 0
