"""What each launch holds in Vault (its child token's accessor, its lease ids), kept in
the broker's own database next to the audit trail. Written as soon as Vault issues
something and before any value is used, so every kill, sweep and rollback can give it
back even when the broker crashed or the garbage collector deleted the launch's Secret
(whose annotations used to be the only record)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from broker.core.objects import HeldByLaunch
from broker.core.podmeta import VaultHoldings
from broker.errors import AuditUnavailableError


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class HoldingsLedger:
    """Table ``launch_holdings`` of the audit store's database (schema v2)."""

    def __init__(self, engine: Engine, shown_url: str) -> None:
        self._engine = engine
        self._url = shown_url

    def _fail(self, exc: BaseException, doing: str) -> AuditUnavailableError:
        cause = type(getattr(exc, "orig", None) or exc).__name__
        return AuditUnavailableError(
            f"holdings ledger {self._url} unavailable while {doing} ({cause})"
        )

    def _write(self) -> Connection:
        return self._engine.connect().execution_options(podbroker_write=True)

    def hold(
        self,
        launch_id: str,
        namespace: str,
        *,
        token_accessor: str | None = None,
        lease_ids: Sequence[str] = (),
    ) -> None:
        """Add what Vault just issued for ``launch_id`` (committed before returning)."""
        try:
            with self._write() as conn, conn.begin():
                row = conn.execute(
                    text(
                        "SELECT lease_ids, token_accessor FROM launch_holdings "
                        "WHERE launch_id = :id"
                    ),
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
        except SQLAlchemyError as exc:
            raise self._fail(exc, "recording what a launch holds") from exc

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
        try:
            with self._write() as conn, conn.begin():
                conn.execute(
                    text(
                        "UPDATE launch_holdings SET released_at = :t "
                        "WHERE launch_id = :id AND released_at IS NULL"
                    ),
                    {"id": launch_id, "t": _now()},
                )
        except SQLAlchemyError as exc:
            raise self._fail(exc, "marking a launch's holdings released") from exc

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
