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
from urllib.parse import quote

import hvac

from broker.core.plan import ChildToken, SecretsPlan, VaultRead
from broker.core.policy import PolicySet
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
from broker.vault.policy_store import Part, StoredPolicy, parse_stored, read_stored

log = logging.getLogger(__name__)

MINT_GRACE_SECONDS = 30
"""How long a revocable child token lives before the broker has durably recorded it.
Longer than a bounded audit-store write; short enough that a token minted by a broker
killed before recording it (known to nobody, holding no lease) ends on its own soon."""


@dataclass(frozen=True)
class ResolvedSecret:
    """One secret read for a launch. ``keys`` hold masked values; ``repr`` shows names."""

    name: str
    keys: dict[str, SecretValue]
    vault_path: str
    version: int | None = None
    lease_id: str | None = None
    lease_ttl: int | None = None
    lease_cap: int | None = None
    """Seconds from issue the lease may be renewed up to (its grant's cap, bounded by
    the child token's TTL, which takes the lease along when it ends)."""
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


class VaultPolicySource:
    """The need-to-know policy as stored in Vault, cached (the policy-source port).

    ``cache_ttl``: how long the policy read from Vault is trusted before it is read again
    (a change applied to Vault is enforced within this time)."""

    def __init__(
        self,
        session: VaultSession,
        cache_ttl: float = 10.0,
        *,
        layout: VaultLayout | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.cache_ttl = cache_ttl
        self.layout = layout or VaultLayout()
        self._clock = clock
        self._lock = threading.Lock()
        self._policy: PolicySet | None = None
        self._versions: tuple[int, ...] | None = None
        self._parts: dict[str, Part] = {}
        self._checked_at = float("-inf")

    def current(self) -> PolicySet:
        """The policy from ``{config_mount}/data/policies/index`` and the parts it names
        (``.../policies/parts/*``), re-read when ``cache_ttl`` has passed. A refresh reads
        the index only, plus the parts it has not read before (parts never change), and
        re-parses only when the index version changed. A store without an index (written
        before parts) is read from ``policies/{catalog,grants}``. Fails closed: Vault
        unreachable -> :class:`VaultUnavailableError`, no stale answer."""
        with self._lock:
            now = self._clock()
            if self._policy is not None and now - self._checked_at < self.cache_ttl:
                return self._policy
            known = self._parts
            stored: StoredPolicy
            try:
                stored, parts = self.session.call(
                    "read the podbroker policy",
                    lambda c: read_stored(c, self.layout, known),
                )
            except InvalidRequestError as exc:
                # A malformed index or part is an outage of the policy source, not the
                # caller's fault: retryable, and nothing is allowed meanwhile.
                raise VaultUnavailableError(exc.reason) from exc
            self._parts = parts
            if self._policy is None or stored.versions != self._versions:
                try:
                    self._policy = parse_stored(stored, self.layout)
                except InvalidRequestError as exc:
                    # A malformed stored policy is an outage of the policy source, not the
                    # caller's fault: retryable, and nothing is allowed meanwhile.
                    raise VaultUnavailableError(exc.reason) from exc
                if stored.empty:
                    log.warning(
                        "no podbroker policy in %s/ yet: every request is denied",
                        self.layout.config_mount,
                    )
                log.info("loaded podbroker policy versions %s", stored.versions)
                self._versions = stored.versions
            self._checked_at = now
            return self._policy


class SecretResolver:
    """Executes the Vault part of a launch plan: mints its child token, makes its reads,
    and revokes what launches hold. It decides nothing: the plan says what to read."""

    def __init__(
        self,
        session: VaultSession,
        *,
        layout: VaultLayout | None = None,
        mint_grace_seconds: int = MINT_GRACE_SECONDS,
    ) -> None:
        self.session = session
        self.layout = layout or VaultLayout()
        self.mint_grace_seconds = mint_grace_seconds
        # Reads of concurrent launches share this pool: room for a burst's reads.
        self._reads = ThreadPoolExecutor(max_workers=32, thread_name_prefix="vault-read")

    def resolve(
        self,
        plan: SecretsPlan,
        *,
        launch_id: str,
        on_issue: Callable[[str | None, Sequence[str]], None] | None = None,
    ) -> ResolvedBundle:
        """Mint ONE child token through the token role (``auth/token/create/{role}``) as
        ``plan.token`` says, then make each of ``plan.reads`` with it: KV v2
        ``{mount}/data/{path}`` (pinned version, key subset) and database
        ``{mount}/creds/{role}`` (lease shortened to its cap).
        ``on_issue(accessor, lease_ids)`` is told what Vault issued (the token right after
        minting, the leases once read) before any value leaves this method, so it can be
        recorded durably; if it raises, everything issued is revoked and the error raised.
        A revocable (service) token is minted to live only ``mint_grace_seconds`` and
        extended to its full TTL once recorded: a broker killed in between leaves a token
        nobody holds, without leases, that ends on its own within the grace.
        On any failure, leases obtained so far and the child token are revoked."""
        spec = plan.token
        recorded_service_token = on_issue is not None and spec.token_type == "service"
        grace: int | None = None
        if recorded_service_token and self.mint_grace_seconds < spec.ttl_seconds:
            grace = self.mint_grace_seconds
        child_token, accessor = self._mint(spec, provisional_ttl=grace)
        if on_issue is not None:
            try:
                # A batch token has no accessor: nothing to record or revoke, it just ends.
                on_issue(accessor or None, ())
                if grace is not None:
                    self._extend(child_token, spec.ttl_seconds)
            except BaseException:
                self._cleanup([], accessor)
                raise

        def read(item: VaultRead) -> ResolvedSecret:
            # A client per read (its token); the HTTP pool underneath is shared.
            child = self.session.new_client(child_token)
            if item.kind == "kv":
                return self._read_kv(child, item)
            return self._read_database(child, item, plan.token.ttl_seconds)

        # The reads are independent: run them at once so a launch waits for the slowest
        # one, not their sum (the pod create overlaps this whole step).
        futures = [self._reads.submit(read, item) for item in plan.reads]
        resolved = [f.result() for f in futures if f.exception() is None]
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            self._cleanup([s.lease_id for s in resolved if s.lease_id], accessor)
            raise errors[0]  # type: ignore[misc]
        leases = [s.lease_id for s in resolved if s.lease_id]
        if on_issue is not None and leases:
            try:
                on_issue(None, leases)
            except BaseException:
                self._cleanup(leases, accessor)
                raise
        log.info(
            "resolved %s for launch %s with child token accessor %s",
            [item.name for item in plan.reads],
            launch_id,
            accessor,
        )
        return ResolvedBundle(
            secrets=resolved,
            token_accessor=accessor,
            launch_id=launch_id,
            token_ttl=plan.token.ttl_seconds,
            grant_policies=list(plan.token.policies),
        )

    def _mint(self, spec: ChildToken, *, provisional_ttl: int | None = None) -> tuple[str, str]:
        """Mint the child token; with ``provisional_ttl`` it lives that long and is
        renewable up to the plan's TTL (its explicit maximum)."""
        if not spec.policies:
            raise DeniedError("no grant policy to read secrets with")

        body: dict[str, Any] = {
            "policies": list(spec.policies),
            "meta": dict(spec.metadata),
            "ttl": f"{provisional_ttl or spec.ttl_seconds}s",
            "renewable": provisional_ttl is not None,
            "display_name": spec.display_name,
            "type": spec.token_type,
        }
        if spec.token_type == "service":
            body["num_uses"] = spec.num_uses  # batch tokens take no use count
            # Never renewable past the plan's TTL, whoever renews it.
            body["explicit_max_ttl"] = f"{spec.ttl_seconds}s"

        def create(client: hvac.Client) -> Any:
            # POST auth/token/create/{role}: hvac's helper cannot ask for a token type.
            return client.adapter.post(
                f"/v1/auth/token/create/{quote(self.layout.token_role, safe='')}", json=body
            )

        response = self.session.call(f"mint a child token via {self.layout.token_role}", create)
        auth = response["auth"]
        return str(auth["client_token"]), str(auth.get("accessor") or "")

    def _extend(self, child_token: str, ttl_seconds: int) -> None:
        """Give a recorded provisional token its full TTL: ``auth/token/renew`` with the
        broker's own token (the child's use count is left for its reads)."""

        def renew(client: hvac.Client) -> Any:
            return client.adapter.post(
                "/v1/auth/token/renew", json={"token": child_token, "increment": ttl_seconds}
            )

        self.session.call("extend the recorded child token to its TTL", renew)

    def _read_kv(self, child: hvac.Client, item: VaultRead) -> ResolvedSecret:
        name, where = item.name, item.where
        try:
            with translate_errors(f"read secret {name!r} ({where})"):
                response = child.secrets.kv.v2.read_secret_version(
                    path=item.path,
                    mount_point=item.mount,
                    version=item.version,
                    raise_on_deleted_version=False,
                )
        except DeniedError as exc:
            raise DeniedError(exc.reason, denied=[name]) from exc
        body = response.get("data") or {}
        data = body.get("data")
        if not isinstance(data, dict):
            raise NotFoundError(f"secret {name!r}: {where} has no data (deleted or destroyed)")
        if item.keys is not None:
            absent = [k for k in item.keys if k not in data]
            if absent:
                raise NotFoundError(f"secret {name!r}: {where} has no key(s) {absent}")
            data = {k: data[k] for k in item.keys}
        values = {
            k: SecretValue(v if isinstance(v, str) else json.dumps(v)) for k, v in data.items()
        }
        version = (body.get("metadata") or {}).get("version")
        return ResolvedSecret(
            name=name,
            keys=values,
            vault_path=item.vault_path,
            version=int(version) if version is not None else item.version,
            grant=item.grant,
            kind="kv",
        )

    def _read_database(self, child: hvac.Client, item: VaultRead, token_ttl: int) -> ResolvedSecret:
        name, path = item.name, item.vault_path
        cap = item.lease_cap or token_ttl
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
            # Shorten the lease to the grant's cap (a renewal with an increment sets the
            # TTL from now). The token TTL is the hard bound either way.
            try:
                renewed = self.session.call(
                    f"cap the lease of {name!r}",
                    lambda c: _renew_lease(c, lease_id, cap),
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
            lease_cap=min(cap, token_ttl),
            grant=item.grant,
            kind="database",
        )

    # -- cleanup -----------------------------------------------------------------------

    def revoke(self, lease_ids: Sequence[str]) -> None:
        """Revoke leases now (``sys/leases/revoke/{lease_id}``); revoking an already revoked or
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

    def renew(self, lease_id: str, increment: int) -> int:
        """Renew a lease by ``increment`` seconds from now (``sys/leases/renew/
        {lease_id}``, the path form the broker's policy scopes to the dynamic engines);
        returns the TTL Vault granted, which its own max TTLs may make shorter.
        :class:`NotFoundError`/:class:`InvalidRequestError` when the lease is gone."""
        renewed = self.session.call(
            f"renew lease {lease_id}", lambda c: _renew_lease(c, lease_id, increment)
        )
        return int(renewed.get("lease_duration") or 0)

    def _revoke_one(self, lease_id: str) -> None:
        self.session.call(f"revoke lease {lease_id}", lambda c: _revoke_lease(c, lease_id))

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


# The path forms of the lease endpoints name the lease in the URL, so the broker's ACL
# policy can allow them for the dynamic engines' leases only (``sys/leases/revoke/
# database/creds/*``); hvac's helpers use the body form, which only an unscoped
# ``sys/leases/revoke`` rule could allow.


def _lease_url(action: str, lease_id: str) -> str:
    return f"/v1/sys/leases/{action}/{quote(lease_id, safe='/')}"


def _revoke_lease(client: hvac.Client, lease_id: str) -> None:
    """PUT ``sys/leases/revoke/{lease_id}`` (204; an unknown lease is not an error)."""
    client.adapter.put(_lease_url("revoke", lease_id))


def _renew_lease(client: hvac.Client, lease_id: str, increment: int) -> dict[str, Any]:
    """PUT ``sys/leases/renew/{lease_id}`` with ``increment`` (seconds from now)."""
    response = client.adapter.put(_lease_url("renew", lease_id), json={"increment": increment})
    return response if isinstance(response, dict) else {}
