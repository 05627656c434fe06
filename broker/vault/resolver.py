"""Runtime secret resolution: cached policy from Vault, decision, child token, reads.

The broker's own token only reads the policy documents and mints child tokens; every
secret is read with a child token carrying only the policies of the grants that allowed
it, so Vault refuses anything outside the grant even if the broker's check were wrong.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import hvac

from broker.core.models import SecretRequest, TaskIdentity
from broker.core.policy import DatabaseSecret, Decision, KvSecret, PolicySet, decide
from broker.core.secret_value import SecretValue
from broker.errors import (
    BrokerError,
    DeniedError,
    InvalidRequestError,
    NotFoundError,
    VaultUnavailableError,
)
from broker.vault.client import VaultSession, translate_errors
from broker.vault.layout import VaultLayout
from broker.vault.policy_store import StoredPolicy, parse_stored, read_stored

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSecret:
    """One secret read for a launch. ``keys`` hold masked values; ``repr`` shows names."""

    name: str
    keys: dict[str, SecretValue]
    vault_path: str
    version: int | None = None
    lease_id: str | None = None
    lease_ttl: int | None = None
    grant: str = ""
    kind: str = "kv"


@dataclass(frozen=True)
class ResolvedBundle:
    """Everything read for one launch. ``token_accessor`` identifies the child token in
    Vault's audit log (it is not the token)."""

    secrets: list[ResolvedSecret]
    token_accessor: str
    launch_id: str = ""
    token_ttl: int = 0
    grant_policies: list[str] = field(default_factory=list)

    @property
    def lease_ids(self) -> list[str]:
        return [s.lease_id for s in self.secrets if s.lease_id]


class SecretResolver:
    """Decides and resolves secret requests against Vault.

    ``cache_ttl``: how long the policy read from Vault is trusted before it is read again
    (a change applied to Vault is enforced within this time). ``child_ttl``: TTL of the
    child token when only KV secrets are read. ``default_dynamic_ttl``: lease TTL for
    dynamic credentials whose grant sets no ``max_lease_ttl``."""

    def __init__(
        self,
        session: VaultSession,
        cache_ttl: float = 10.0,
        *,
        layout: VaultLayout | None = None,
        child_ttl: int = 60,
        default_dynamic_ttl: int = 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.cache_ttl = cache_ttl
        self.layout = layout or VaultLayout()
        self.child_ttl = child_ttl
        self.default_dynamic_ttl = default_dynamic_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._policy: PolicySet | None = None
        self._versions: tuple[int, int] | None = None
        self._checked_at = float("-inf")
        self._reads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="vault-read")

    # -- policy ------------------------------------------------------------------------

    def policy_set(self) -> PolicySet:
        """The policy from ``{config_mount}/data/policies/{catalog,grants}``, re-read when
        ``cache_ttl`` has passed and re-parsed only when a KV version changed. Fails
        closed: Vault unreachable -> :class:`VaultUnavailableError`, no stale answer."""
        with self._lock:
            now = self._clock()
            if self._policy is not None and now - self._checked_at < self.cache_ttl:
                return self._policy
            stored: StoredPolicy = self.session.call(
                "read the podbroker policy", lambda c: read_stored(c, self.layout)
            )
            if self._policy is None or stored.versions != self._versions:
                try:
                    self._policy = parse_stored(stored, self.layout)
                except InvalidRequestError as exc:
                    # A malformed stored policy is an outage of the policy source, not the
                    # caller's fault: retryable, and nothing is allowed meanwhile.
                    raise VaultUnavailableError(exc.reason) from exc
                if stored.versions == (0, 0):
                    log.warning(
                        "no podbroker policy in %s/ yet: every request is denied",
                        self.layout.config_mount,
                    )
                log.info("loaded podbroker policy versions %s", stored.versions)
                self._versions = stored.versions
            self._checked_at = now
            return self._policy

    def decide(self, identity: TaskIdentity, requests: Sequence[SecretRequest]) -> Decision:
        return decide(self.policy_set(), identity, requests)

    # -- resolution --------------------------------------------------------------------

    def resolve(
        self,
        identity: TaskIdentity,
        requests: Sequence[SecretRequest],
        decision: Decision,
        *,
        launch_id: str,
    ) -> ResolvedBundle:
        """Mint ONE child token through the token role (``auth/token/create/{role}``)
        with only ``decision.grant_policies``, then read each requested secret with it:
        KV v2 ``{mount}/data/{path}`` (pinned version, key subset) and database
        ``{mount}/creds/{role}`` (lease TTL capped by the grant).

        Token limits: uses = number of reads (+1 with dynamic credentials, because Vault
        revokes leases created with a token's last use); TTL = ``child_ttl`` for KV only,
        else the smallest lease cap (leases die with the token that created them).
        On any failure, leases obtained so far and the child token are revoked.
        Raises NotFoundError / DeniedError when the decision does not allow the request.
        """
        decision.raise_for_denial()
        names = list(dict.fromkeys(r.name for r in requests))
        missing = [n for n in names if n not in decision.secrets]
        if missing:
            raise DeniedError("the decision does not cover " + ", ".join(missing), denied=missing)
        policy = self.policy_set()
        entries: dict[str, KvSecret | DatabaseSecret] = {}
        for name in names:
            entry = policy.catalog.get(name)
            if entry is None:
                raise NotFoundError(f"unknown secret {name!r}: not in the catalog")
            entries[name] = entry
        caps = [
            decision.secrets[n].max_lease_ttl or self.default_dynamic_ttl
            for n, e in entries.items()
            if isinstance(e, DatabaseSecret)
        ]
        dynamic = bool(caps)
        token_ttl = max(min(caps), 30) if dynamic else self.child_ttl
        num_uses = len(names) + (1 if dynamic else 0)
        child_token, accessor = self._mint(identity, decision, launch_id, token_ttl, num_uses)

        def read(name: str) -> ResolvedSecret:
            # A client per read (its token); the HTTP pool underneath is shared.
            child = self.session.new_client(child_token)
            entry = entries[name]
            grant = decision.secrets[name].grant
            if isinstance(entry, KvSecret):
                return self._read_kv(child, name, entry, grant)
            cap = decision.secrets[name].max_lease_ttl or self.default_dynamic_ttl
            return self._read_database(child, name, entry, grant, cap, token_ttl)

        # The reads are independent: run them at once so a launch waits for the slowest
        # one, not their sum (the pod create overlaps this whole step).
        futures = [self._reads.submit(read, name) for name in names]
        resolved = [f.result() for f in futures if f.exception() is None]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            self._cleanup([s.lease_id for s in resolved if s.lease_id], accessor)
            raise errors[0]  # type: ignore[misc]
        log.info(
            "resolved %s for %s/%s run %s launch %s with child token accessor %s",
            names,
            identity.dag_id,
            identity.task_id,
            identity.run_id,
            launch_id,
            accessor,
        )
        return ResolvedBundle(
            secrets=resolved,
            token_accessor=accessor,
            launch_id=launch_id,
            token_ttl=token_ttl,
            grant_policies=list(decision.grant_policies),
        )

    def _mint(
        self,
        identity: TaskIdentity,
        decision: Decision,
        launch_id: str,
        ttl: int,
        num_uses: int,
    ) -> tuple[str, str]:
        if not decision.grant_policies:
            raise DeniedError("no grant policy to read secrets with", denied=list(decision.secrets))
        meta = {
            "dag_id": identity.dag_id,
            "task_id": identity.task_id,
            "run_id": identity.run_id,
            "try_number": str(identity.try_number),
            "map_index": str(identity.map_index),
            "launch_id": launch_id,
        }

        def create(client: hvac.Client) -> Any:
            return client.auth.token.create(
                role_name=self.layout.token_role,
                policies=list(decision.grant_policies),
                meta=meta,
                ttl=f"{ttl}s",
                num_uses=num_uses,
                renewable=False,
                display_name=f"launch-{launch_id}"[:100],
            )

        response = self.session.call(f"mint a child token via {self.layout.token_role}", create)
        auth = response["auth"]
        return str(auth["client_token"]), str(auth["accessor"])

    def _read_kv(
        self, child: hvac.Client, name: str, entry: KvSecret, grant: str
    ) -> ResolvedSecret:
        where = f"{entry.mount}/{entry.path}" + (f"@v{entry.version}" if entry.version else "")
        try:
            with translate_errors(f"read secret {name!r} ({where})"):
                response = child.secrets.kv.v2.read_secret_version(
                    path=entry.path,
                    mount_point=entry.mount,
                    version=entry.version,
                    raise_on_deleted_version=False,
                )
        except DeniedError as exc:
            raise DeniedError(exc.reason, denied=[name]) from exc
        body = response.get("data") or {}
        data = body.get("data")
        if not isinstance(data, dict):
            raise NotFoundError(f"secret {name!r}: {where} has no data (deleted or destroyed)")
        if entry.keys is not None:
            absent = [k for k in entry.keys if k not in data]
            if absent:
                raise NotFoundError(f"secret {name!r}: {where} has no key(s) {absent}")
            data = {k: data[k] for k in entry.keys}
        values = {
            k: SecretValue(v if isinstance(v, str) else json.dumps(v)) for k, v in data.items()
        }
        version = (body.get("metadata") or {}).get("version")
        return ResolvedSecret(
            name=name,
            keys=values,
            vault_path=f"{entry.mount}/data/{entry.path}",
            version=int(version) if version is not None else entry.version,
            grant=grant,
            kind="kv",
        )

    def _read_database(
        self,
        child: hvac.Client,
        name: str,
        entry: DatabaseSecret,
        grant: str,
        cap: int,
        token_ttl: int,
    ) -> ResolvedSecret:
        path = f"{entry.mount}/creds/{entry.role}"
        try:
            with translate_errors(f"read secret {name!r} ({path})"):
                response = child.read(path)
        except DeniedError as exc:
            raise DeniedError(exc.reason, denied=[name]) from exc
        if not isinstance(response, dict) or not isinstance(response.get("data"), dict):
            raise NotFoundError(f"secret {name!r}: {path} returned no credentials")
        lease_id = str(response.get("lease_id") or "")
        lease_ttl = int(response.get("lease_duration") or 0)
        if lease_id and lease_ttl > cap:
            # Shorten the lease to the grant's cap (sys/leases/renew with an increment
            # sets the TTL from now). The token TTL is the hard bound either way.
            try:
                renewed = self.session.call(
                    f"cap the lease of {name!r}",
                    lambda c: c.sys.renew_lease(lease_id=lease_id, increment=cap),
                )
                lease_ttl = int(renewed.get("lease_duration") or lease_ttl)
            except BrokerError as exc:
                log.warning("could not shorten the lease of %r: %s", name, exc.reason)
        lease_ttl = min(lease_ttl, token_ttl) if lease_ttl else token_ttl
        keys = {
            k: SecretValue(v if isinstance(v, str) else json.dumps(v))
            for k, v in response["data"].items()
        }
        return ResolvedSecret(
            name=name,
            keys=keys,
            vault_path=path,
            lease_id=lease_id or None,
            lease_ttl=lease_ttl,
            grant=grant,
            kind="database",
        )

    # -- cleanup -----------------------------------------------------------------------

    def revoke(self, lease_ids: Sequence[str]) -> None:
        """Revoke leases now (``sys/leases/revoke``); revoking an already revoked or
        expired lease is not an error. Tries every lease, then raises the first
        :class:`VaultUnavailableError` if any could not be revoked."""
        failure: BrokerError | None = None
        for lease_id in lease_ids:
            try:
                self._revoke_one(lease_id)
                log.info("revoked lease %s", lease_id)
            except NotFoundError:
                continue
            except BrokerError as exc:
                log.warning("could not revoke lease %s: %s", lease_id, exc.reason)
                failure = failure or exc
        if failure is not None:
            raise failure

    def _revoke_one(self, lease_id: str) -> None:
        self.session.call(f"revoke lease {lease_id}", lambda c: c.sys.revoke_lease(lease_id))

    def revoke_token(self, accessor: str) -> None:
        """Revoke a child token by accessor (``auth/token/revoke-accessor``); its leases
        go with it. Unknown or expired accessors are ignored."""
        try:
            self.session.call(
                f"revoke child token {accessor}",
                lambda c: c.auth.token.revoke_accessor(accessor),
            )
        except (NotFoundError, InvalidRequestError):
            return

    def _cleanup(self, lease_ids: list[str], accessor: str) -> None:
        try:
            self.revoke(lease_ids)
            self.revoke_token(accessor)
        except BrokerError as exc:
            log.warning("cleanup after a failed resolution incomplete: %s", exc.reason)
