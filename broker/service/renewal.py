"""Long tasks keep their dynamic credentials: the leases of running launches are renewed
at about two thirds of their TTL (with jitter), never past their grant's
``max_lease_ttl``, until the launch's holdings are released (the pod ended).

The state lives in the holdings ledger (``launch_leases``), so renewal survives a broker
restart, and every replica runs this loop: a lease is renewed by whichever replica claims
it first (a compare-and-set with a claim time in one UPDATE). What happens at the cap is
recorded once (``lease_capped``): the lease is not renewed again and expires there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from broker.core import audit_events as ev
from broker.core.leases import IssuedLease, LeaseRecord, next_renewal_at, renewal_step
from broker.errors import BrokerError, InvalidRequestError, NotFoundError
from broker.metrics import LEASE_RENEWALS
from broker.service.ports import AuditSink, BundleLike, LeaseLedger, SecretStore

log = logging.getLogger("podbroker.renewal")


class LeaseRenewer:
    """``batch``: leases renewed per pass at most (overdue leases after a restart are
    taken soonest-expiring first, a batch at a time, not all at once); ``claim_seconds``:
    how long a replica's claim on a lease holds (a crashed replica's claim lapses after
    it); ``max_wait``/``min_wait``: bounds of the sleep between passes (the loop wakes
    for the next due renewal)."""

    def __init__(
        self,
        *,
        ledger: LeaseLedger,
        secrets: SecretStore,
        audit: AuditSink,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] | None = None,
        batch: int = 50,
        claim_seconds: float = 15.0,
        max_wait: float = 5.0,
        min_wait: float = 0.2,
    ) -> None:
        self.ledger = ledger
        self.secrets = secrets
        self.audit = audit
        self._clock = clock
        rng = random.Random()  # noqa: S311 (spreads timing; nothing secret)
        self._jitter = jitter or (lambda: rng.uniform(-1.0, 1.0))
        self.batch = batch
        self.claim_seconds = claim_seconds
        self.max_wait = max_wait
        self.min_wait = min_wait
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- new leases ---------------------------------------------------------------------

    def track(self, launch_id: str, bundle: BundleLike) -> None:
        """Schedule the first renewal of each lease a launch was just issued. Never
        raises: a lease not tracked only expires at its own TTL."""
        now = self._clock()
        for secret in bundle.secrets:
            if not secret.lease_id or not secret.lease_ttl:
                continue
            ttl = secret.lease_ttl
            lease = IssuedLease(
                lease_id=secret.lease_id,
                secret_name=secret.name,
                grant=secret.grant,
                ttl_seconds=ttl,
                cap_seconds=max(secret.lease_cap or ttl, ttl),
                issued_at=now,
            )
            try:
                self.ledger.track_lease(launch_id, lease, next_renewal_at(now, ttl, self._jitter()))
            except BrokerError as exc:
                log.warning("lease of %r not tracked for renewal: %s", secret.name, exc.reason)
        self._wake.set()  # the loop may be sleeping past this lease's first renewal

    # -- one pass -------------------------------------------------------------------------

    def renew_due(self) -> int:
        """Renew every due lease this replica can claim; returns how many it handled."""
        now = self._clock()
        handled = 0
        for lease in self.ledger.due_leases(now, self.batch):
            if not self.ledger.claim_lease(lease.lease_id, now, now + self.claim_seconds):
                continue  # another replica has it
            self._renew(lease, self._clock())
            handled += 1
        return handled

    def _renew(self, lease: LeaseRecord, now: float) -> None:
        step = renewal_step(now, lease.ttl_seconds, lease.cap_at)
        if step.capped:
            log.warning("lease of %r of launch %s at its cap", lease.secret_name, lease.launch_id)
            self.ledger.lease_retry(lease.lease_id, next_renewal_at=None)
            return
        try:
            granted = self.secrets.renew(lease.lease_id, step.increment)
        except (NotFoundError, InvalidRequestError) as exc:
            # Revoked or expired meanwhile: nothing left to renew.
            LEASE_RENEWALS.labels("gone").inc()
            log.warning(
                "lease of %r of launch %s is gone (%s)",
                lease.secret_name,
                lease.launch_id,
                exc.reason,
            )
            self.ledger.lease_retry(lease.lease_id, next_renewal_at=None)
            return
        except BrokerError as exc:
            LEASE_RENEWALS.labels("error").inc()
            left = lease.expires_at - now
            retry = now + min(5.0, max(0.5, left / 4))
            log.warning("renewing lease of %r failed (%s); retrying", lease.secret_name, exc.reason)
            self.ledger.lease_retry(lease.lease_id, next_renewal_at=retry)
            return
        expires_at = now + granted
        # Vault's own max TTL (the role's, the mount's) may grant less than asked.
        capped = step.reaches_cap or granted < step.increment
        next_at = None if capped else next_renewal_at(now, granted, self._jitter())
        self.ledger.lease_renewed(lease.lease_id, expires_at=expires_at, next_renewal_at=next_at)
        LEASE_RENEWALS.labels("capped" if capped else "renewed").inc()
        if capped:
            self._record(
                ev.EventKind.LEASE_CAPPED,
                lease,
                ttl=granted,
                expires_at=ev.format_time(_utc(expires_at)),
                cap_at=ev.format_time(_utc(lease.cap_at)),
                by="grant max_lease_ttl" if step.reaches_cap else "Vault max TTL",
            )
        elif lease.renewals == 0:
            # Sparingly: the first renewal says renewal works for this lease; the rest
            # are in the metrics, and the cap (or the release) ends the story.
            self._record(
                ev.EventKind.LEASE_RENEWED,
                lease,
                ttl=granted,
                expires_at=ev.format_time(_utc(expires_at)),
            )

    def _record(self, kind: ev.EventKind, lease: LeaseRecord, **details: Any) -> None:
        with contextlib.suppress(BrokerError):
            self.audit.append(
                ev.launch_event(
                    kind,
                    launch_id=lease.launch_id,
                    secret_names=[lease.secret_name],
                    lease_id=lease.lease_id,
                    grant=lease.grant,
                    **details,
                )
            )

    # -- background -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lease-renewal", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            wait = self.max_wait
            try:
                if self.renew_due() >= self.batch:
                    wait = 0.0  # more are due: next batch now
                else:
                    upcoming = self.ledger.next_renewal()
                    if upcoming is not None:
                        wait = upcoming - self._clock()
            except Exception:  # keep renewing; say why this pass failed
                log.exception("lease renewal pass failed")
            self._wake.wait(min(self.max_wait, max(self.min_wait, wait)))
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


def _utc(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, dt.UTC)
