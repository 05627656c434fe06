"""What the launch service needs from its Vault and audit adapters (small seams)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from broker.core.audit_events import AuditEvent
from broker.core.models import SecretRequest, TaskIdentity
from broker.core.policy import Decision, PolicySet
from broker.core.secret_value import SecretValue


class ResolvedSecretLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def keys(self) -> dict[str, SecretValue]: ...
    @property
    def vault_path(self) -> str: ...
    @property
    def version(self) -> int | None: ...
    @property
    def lease_id(self) -> str | None: ...


class BundleLike(Protocol):
    @property
    def secrets(self) -> Sequence[ResolvedSecretLike]: ...
    @property
    def token_accessor(self) -> str: ...
    @property
    def lease_ids(self) -> list[str]: ...


class SecretSource(Protocol):
    def policy_set(self) -> PolicySet: ...
    def decide(self, identity: TaskIdentity, requests: Sequence[SecretRequest]) -> Decision: ...
    def resolve(
        self,
        identity: TaskIdentity,
        requests: Sequence[SecretRequest],
        decision: Decision,
        *,
        launch_id: str,
    ) -> BundleLike: ...
    def revoke(self, lease_ids: Sequence[str]) -> None: ...
    def revoke_token(self, accessor: str) -> None: ...


class AuditSink(Protocol):
    def append(self, event: AuditEvent) -> object: ...
    def append_many(self, events: Sequence[AuditEvent]) -> object: ...
    def ping(self) -> None: ...
