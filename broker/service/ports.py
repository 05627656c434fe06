"""What the service layer needs from its adapters: one small seam per backend. The
adapters (broker.vault, broker.kube, broker.audit) implement these; the fast service
tests use in-memory fakes of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from broker.core.api_models import PodEvent
from broker.core.audit_events import AuditEvent
from broker.core.leases import IssuedLease, LeaseRecord
from broker.core.objects import HeldByLaunch, PodInfo, PodRef, ReviewedToken, SecretMeta
from broker.core.plan import SecretsPlan
from broker.core.podmeta import VaultHoldings
from broker.core.policy import PolicySet
from broker.core.secret_value import SecretValue


class ResolvedSecretLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def keys(self) -> Mapping[str, SecretValue]: ...
    @property
    def vault_path(self) -> str: ...
    @property
    def version(self) -> int | None: ...
    @property
    def lease_id(self) -> str | None: ...
    @property
    def lease_ttl(self) -> int | None: ...
    @property
    def lease_cap(self) -> int | None: ...
    @property
    def grant(self) -> str: ...


class BundleLike(Protocol):
    @property
    def secrets(self) -> Sequence[ResolvedSecretLike]: ...
    @property
    def token_accessor(self) -> str: ...
    @property
    def lease_ids(self) -> list[str]: ...


class PolicySource(Protocol):
    """The need-to-know policy (from Vault, cached). Raises TemporaryError when it
    cannot be had: never a stale or empty answer that would allow too much."""

    def current(self) -> PolicySet: ...


class SecretStore(Protocol):
    """Executes the Vault part of a plan and gives back what launches held."""

    def resolve(
        self,
        plan: SecretsPlan,
        *,
        launch_id: str,
        on_issue: Callable[[str | None, Sequence[str]], None] | None = None,
    ) -> BundleLike: ...
    def revoke(self, lease_ids: Sequence[str]) -> None: ...
    def revoke_token(self, accessor: str) -> None: ...
    def renew(self, lease_id: str, increment: int) -> int: ...


class Cluster(Protocol):
    """The Kubernetes API as the broker uses it (pods and their Secrets, metadata only)."""

    def ping(self) -> None: ...
    def create_pod(self, manifest: dict[str, Any]) -> PodRef: ...
    def read_pod(self, namespace: str, name: str) -> PodInfo | None: ...
    def pod_events(self, namespace: str, name: str, uid: str = "") -> list[PodEvent]: ...
    def delete_pod(self, namespace: str, name: str, *, grace_seconds: int = 0) -> bool: ...
    def claim_pod(
        self, namespace: str, name: str, resource_version: str, annotations: dict[str, str]
    ) -> bool: ...
    def create_secret(self, manifest: dict[str, Any]) -> None: ...
    def delete_secret(self, namespace: str, name: str) -> bool: ...
    def secret_exists(self, namespace: str, name: str) -> bool: ...
    def read_secret_metadata(self, namespace: str, name: str) -> SecretMeta | None: ...
    def read_launch_secret_values(
        self, namespace: str, launch_id: str
    ) -> Mapping[str, SecretValue] | None: ...
    def list_managed_pods(
        self,
        namespace: str,
        *,
        launch_id: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[PodInfo]: ...
    def list_managed_secrets(self, namespace: str) -> list[SecretMeta]: ...
    def pod_logs(
        self,
        namespace: str,
        name: str,
        *,
        container: str,
        follow: bool,
        since_seconds: int | None = None,
        timestamps: bool = False,
    ) -> Iterator[bytes]: ...
    def watch_managed_pods(
        self,
        namespace: str,
        on_event: Callable[[str, PodInfo], None],
        stop: Callable[[], bool],
        timeout_seconds: int = 30,
    ) -> None: ...


class TokenReviewer(Protocol):
    def token_review(self, token: str, audience: str) -> ReviewedToken | None: ...


class HoldingsLedger(Protocol):
    """Durable record of what each launch holds in Vault (the source of truth for every
    kill, sweep and rollback)."""

    def hold(
        self,
        launch_id: str,
        namespace: str,
        *,
        token_accessor: str | None = None,
        lease_ids: Sequence[str] = (),
    ) -> None: ...
    def held(self, launch_id: str) -> VaultHoldings | None: ...
    def released(self, launch_id: str) -> None: ...
    def unreleased(self, limit: int = 1000) -> list[HeldByLaunch]: ...


class AuditSink(Protocol):
    def append(self, event: AuditEvent) -> object: ...
    def append_many(
        self,
        events: Sequence[AuditEvent],
        *,
        opens: tuple[str, str] | None = None,
        releases: Sequence[str] = (),
    ) -> object: ...
    def ping(self) -> None: ...


class LeaseLedger(Protocol):
    """The renewal state of each dynamic lease, shared by every replica (schema v3 of the
    holdings ledger). Times are epoch seconds."""

    def track_lease(self, launch_id: str, lease: IssuedLease, next_renewal_at: float) -> None: ...
    def due_leases(self, now: float, limit: int) -> list[LeaseRecord]: ...
    def next_renewal(self) -> float | None: ...
    def claim_lease(self, lease_id: str, now: float, until: float) -> bool: ...
    def lease_renewed(
        self, lease_id: str, *, expires_at: float, next_renewal_at: float | None
    ) -> None: ...
    def lease_retry(self, lease_id: str, *, next_renewal_at: float | None) -> None: ...
    def leases_of(self, launch_id: str) -> list[LeaseRecord]: ...
