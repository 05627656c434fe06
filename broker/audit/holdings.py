"""What each launch holds in Vault (its child token's accessor, its lease ids), kept in
the broker's own database next to the audit trail. Written as soon as Vault issues
something and before any value is used, so every kill, sweep and rollback can give it
back even when the broker crashed or the garbage collector deleted the launch's Secret
(whose annotations used to be the only record)."""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from broker.core.leases import IssuedLease, LeaseRecord
from broker.core.objects import HeldByLaunch, LaunchInProgressError
from broker.core.podmeta import VaultHoldings
from broker.errors import AuditUnavailableError

T = TypeVar("T")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def open_launch(conn: Connection, launch_id: str, namespace: str) -> None:
    """Open a launch's row (holding nothing yet) inside the caller's transaction. One
    attempt of a launch at a time: a row given back earlier starts afresh, but a row
    still open (another request for the same task try between its intent and its pod,
    or one that died there and awaits the sweep) refuses this one, retryably. Two
    attempts under one launch id would otherwise share one record of what Vault issued,
    and one's token or lease would be lost or revoked under the other's pod."""
    opened = conn.execute(
        text(
            "INSERT INTO launch_holdings (launch_id, namespace, lease_ids, token_accessor, "
            "created_at) VALUES (:id, :ns, '[]', NULL, :t) ON CONFLICT (launch_id) DO UPDATE "
            "SET namespace = :ns, lease_ids = '[]', token_accessor = NULL, created_at = :t, "
            "released_at = NULL WHERE launch_holdings.released_at IS NOT NULL"
        ),
        {"id": launch_id, "ns": namespace, "t": _now()},
    )
    if opened.rowcount == 0:
        raise LaunchInProgressError(
            f"another request for this task try (launch {launch_id}) is still launching, or "
            "stopped mid-launch and is being cleaned up: retry shortly",
            retry_after=5,
        )


def release_launch(conn: Connection, launch_id: str) -> None:
    """Mark everything ``launch_id`` held given back, inside the caller's transaction."""
    conn.execute(
        text(
            "UPDATE launch_holdings SET released_at = :t "
            "WHERE launch_id = :id AND released_at IS NULL"
        ),
        {"id": launch_id, "t": _now()},
    )


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


_LEASE_COLUMNS = (
    "l.lease_id, l.launch_id, l.secret_name, l.grant_id, l.ttl_seconds, l.cap_at, "
    "l.expires_at, l.renewals"
)


def _lease(row: Sequence[object]) -> LeaseRecord:
    return LeaseRecord(
        lease_id=str(row[0]),
        launch_id=str(row[1]),
        secret_name=str(row[2]),
        grant=str(row[3]),
        ttl_seconds=int(str(row[4])),
        cap_at=int(str(row[5])) / 1000,
        expires_at=int(str(row[6])) / 1000,
        renewals=int(str(row[7])),
    )


Bounded = Callable[[str, Callable[[], Any]], Any]
"""Runs a database operation under the audit store's deadline (``AuditStore._bounded``)."""


def _unbounded(_doing: str, work: Callable[[], Any]) -> Any:
    return work()


Writer = Callable[[str, Callable[[Connection], Any]], Any]
"""Runs ``op(conn)`` in a committed write transaction and returns its result: the audit
store's group commit (``AuditStore.holdings``), so the ledger's writes share the audit
writer's transactions instead of queueing on the database's write lock beside it."""


def _bounded(doing: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Run the method under the store's deadline: a frozen database gives a prompt
    AuditUnavailableError, never a hung cleanup."""

    def wrap(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def bounded(self: HoldingsLedger, *args: Any, **kwargs: Any) -> T:
            return cast(T, self._run(doing, lambda: method(self, *args, **kwargs)))

        return bounded

    return wrap


class HoldingsLedger:
    """Tables ``launch_holdings`` (schema v2) and ``launch_leases`` (v3: the renewal
    state of each dynamic lease, so renewal survives restarts and one replica renews)
    of the audit store's database."""

    def __init__(
        self,
        engine: Engine,
        shown_url: str,
        *,
        bounded: Bounded = _unbounded,
        writer: Writer | None = None,
    ) -> None:
        self._engine = engine
        self._url = shown_url
        self._run = bounded
        self._writer = writer

    def _fail(self, exc: BaseException, doing: str) -> AuditUnavailableError:
        cause = type(getattr(exc, "orig", None) or exc).__name__
        return AuditUnavailableError(
            f"holdings ledger {self._url} unavailable while {doing} ({cause})"
        )

    def _write_op(self, doing: str, op: Callable[[Connection], T]) -> T:
        """The one write path: ``op(conn)`` committed (through the writer when given,
        else in a transaction of its own under the store's deadline)."""

        def own_transaction() -> T:
            connection = self._engine.connect().execution_options(podbroker_write=True)
            with connection as conn, conn.begin():
                return op(conn)

        try:
            if self._writer is not None:
                return cast(T, self._writer(doing, op))
            return cast(T, self._run(doing, own_transaction))
        except SQLAlchemyError as exc:
            raise self._fail(exc, doing) from exc

    def hold(
        self,
        launch_id: str,
        namespace: str,
        *,
        token_accessor: str | None = None,
        lease_ids: Sequence[str] = (),
    ) -> None:
        """Add what Vault just issued for ``launch_id`` (committed before returning)."""

        def op(conn: Connection) -> None:
            row = conn.execute(
                text("SELECT lease_ids, token_accessor FROM launch_holdings WHERE launch_id = :id"),
                {"id": launch_id},
            ).first()
            if row is None:
                conn.execute(
                    text(
                        "INSERT INTO launch_holdings (launch_id, namespace, lease_ids, "
                        "token_accessor, created_at) VALUES (:id, :ns, :leases, :acc, :t)"
                    ),
                    {
                        "id": launch_id,
                        "ns": namespace,
                        "leases": json.dumps(list(lease_ids)),
                        "acc": token_accessor,
                        "t": _now(),
                    },
                )
                return
            leases = list(dict.fromkeys([*json.loads(row[0] or "[]"), *lease_ids]))
            conn.execute(
                text(
                    "UPDATE launch_holdings SET lease_ids = :leases, "
                    "token_accessor = COALESCE(:acc, token_accessor), released_at = NULL "
                    "WHERE launch_id = :id"
                ),
                {"id": launch_id, "leases": json.dumps(leases), "acc": token_accessor},
            )

        self._write_op("recording what a launch holds", op)

    @_bounded("reading what a launch holds")
    def held(self, launch_id: str) -> VaultHoldings | None:
        """What ``launch_id`` still holds (None when nothing is recorded or released)."""
        try:
            with self._engine.connect() as conn:
                row = conn.execute(
                    text(
                        "SELECT lease_ids, token_accessor FROM launch_holdings "
                        "WHERE launch_id = :id AND released_at IS NULL"
                    ),
                    {"id": launch_id},
                ).first()
        except SQLAlchemyError as exc:
            raise self._fail(exc, "reading what a launch holds") from exc
        if row is None:
            return None
        return VaultHoldings(tuple(json.loads(row[0] or "[]")), row[1])

    def released(self, launch_id: str) -> None:
        """Everything ``launch_id`` held was given back."""

        self._write_op("marking holdings released", lambda conn: release_launch(conn, launch_id))

    @_bounded("listing unreleased holdings")
    def unreleased(self, limit: int = 1000) -> list[HeldByLaunch]:
        """Launches that still hold something, oldest first."""
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT launch_id, namespace, lease_ids, token_accessor, created_at "
                        "FROM launch_holdings WHERE released_at IS NULL "
                        "ORDER BY created_at LIMIT :n"
                    ),
                    {"n": limit},
                ).all()
        except SQLAlchemyError as exc:
            raise self._fail(exc, "listing unreleased holdings") from exc
        return [
            HeldByLaunch(
                launch_id=row[0],
                namespace=row[1],
                holdings=VaultHoldings(tuple(json.loads(row[2] or "[]")), row[3]),
                created_at=dt.datetime.fromisoformat(row[4]),
            )
            for row in rows
        ]

    # -- lease renewal (schema v3) ----------------------------------------------------------

    def track_lease(self, launch_id: str, lease: IssuedLease, next_renewal_at: float) -> None:
        """Record a lease issued to ``launch_id`` for renewal (idempotent)."""

        def op(conn: Connection) -> None:
            exists = conn.execute(
                text("SELECT 1 FROM launch_leases WHERE lease_id = :id"),
                {"id": lease.lease_id},
            ).first()
            if exists:
                return
            conn.execute(
                text(
                    "INSERT INTO launch_leases (lease_id, launch_id, secret_name, grant_id, "
                    "ttl_seconds, cap_at, expires_at, next_renewal_at, renewals) VALUES "
                    "(:id, :launch, :name, :grant, :ttl, :cap, :exp, :next, 0)"
                ),
                {
                    "id": lease.lease_id,
                    "launch": launch_id,
                    "name": lease.secret_name,
                    "grant": lease.grant,
                    "ttl": lease.ttl_seconds,
                    "cap": _ms(lease.cap_at),
                    "exp": _ms(lease.issued_at + lease.ttl_seconds),
                    "next": _ms(next_renewal_at),
                },
            )

        self._write_op("recording a lease", op)

    @_bounded("listing due leases")
    def due_leases(self, now: float, limit: int) -> list[LeaseRecord]:
        """Leases of unreleased launches whose renewal time has come and that no replica
        is renewing, soonest expiry first."""
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(
                    text(
                        f"SELECT {_LEASE_COLUMNS} FROM launch_leases l JOIN launch_holdings h "  # noqa: S608
                        "ON h.launch_id = l.launch_id WHERE h.released_at IS NULL "
                        "AND l.next_renewal_at IS NOT NULL AND l.next_renewal_at <= :now "
                        "AND (l.renewing_until IS NULL OR l.renewing_until < :now) "
                        "ORDER BY l.expires_at LIMIT :n"
                    ),
                    {"now": _ms(now), "n": limit},
                ).all()
        except SQLAlchemyError as exc:
            raise self._fail(exc, "listing leases due for renewal") from exc
        return [_lease(row) for row in rows]

    @_bounded("reading the next renewal")
    def next_renewal(self) -> float | None:
        """The earliest renewal time of any unreleased launch's lease."""
        try:
            with self._engine.connect() as conn:
                found = conn.execute(
                    text(
                        "SELECT MIN(l.next_renewal_at) FROM launch_leases l JOIN launch_holdings "
                        "h ON h.launch_id = l.launch_id WHERE h.released_at IS NULL"
                    )
                ).scalar()
        except SQLAlchemyError as exc:
            raise self._fail(exc, "reading the next lease renewal") from exc
        return None if found is None else int(found) / 1000

    def claim_lease(self, lease_id: str, now: float, until: float) -> bool:
        """Claim one due lease for renewal until ``until`` (compare-and-set in one
        UPDATE): exactly one replica gets True."""

        def op(conn: Connection) -> bool:
            result = conn.execute(
                text(
                    "UPDATE launch_leases SET renewing_until = :until WHERE lease_id = :id "
                    "AND next_renewal_at IS NOT NULL AND next_renewal_at <= :now "
                    "AND (renewing_until IS NULL OR renewing_until < :now)"
                ),
                {"id": lease_id, "now": _ms(now), "until": _ms(until)},
            )
            return bool(result.rowcount == 1)

        return self._write_op("claiming a lease", op)

    def lease_renewed(
        self, lease_id: str, *, expires_at: float, next_renewal_at: float | None
    ) -> None:
        """The claimed lease now expires at ``expires_at``; renew it again at
        ``next_renewal_at`` (None: never, it reached its cap). Releases the claim."""

        def op(conn: Connection) -> None:
            conn.execute(
                text(
                    "UPDATE launch_leases SET expires_at = :exp, next_renewal_at = :next, "
                    "renewing_until = NULL, renewals = renewals + 1 WHERE lease_id = :id"
                ),
                {
                    "id": lease_id,
                    "exp": _ms(expires_at),
                    "next": None if next_renewal_at is None else _ms(next_renewal_at),
                },
            )

        self._write_op("recording a renewal", op)

    def lease_retry(self, lease_id: str, *, next_renewal_at: float | None) -> None:
        """The renewal failed: release the claim and try again at ``next_renewal_at``
        (None: give up, the lease is gone)."""

        def op(conn: Connection) -> None:
            conn.execute(
                text(
                    "UPDATE launch_leases SET next_renewal_at = :next, renewing_until = NULL "
                    "WHERE lease_id = :id"
                ),
                {
                    "id": lease_id,
                    "next": None if next_renewal_at is None else _ms(next_renewal_at),
                },
            )

        self._write_op("rescheduling a renewal", op)

    @_bounded("listing a launch's leases")
    def leases_of(self, launch_id: str) -> list[LeaseRecord]:
        """The leases recorded for ``launch_id`` (released or not)."""
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(
                    text(
                        f"SELECT {_LEASE_COLUMNS} FROM launch_leases l "  # noqa: S608 (constants)
                        "WHERE l.launch_id = :id"
                    ),
                    {"id": launch_id},
                ).all()
        except SQLAlchemyError as exc:
            raise self._fail(exc, "reading a launch's leases") from exc
        return [_lease(row) for row in rows]
