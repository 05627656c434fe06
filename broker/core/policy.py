"""Need-to-know policy model and the decision (pure: no I/O).

A :class:`PolicySet` is a *catalog* (logical secret name -> where it lives in Vault) and
*teams* holding *grants* (which DAGs, optionally which tasks, may receive which names,
under which constraints). :func:`decide` is default deny: a requested name is allowed
only when some grant matches the task, names the secret, and its constraints accept the
requested delivery.

Each grant becomes one Vault ACL policy (:func:`grant_policy_name`) allowing ``read`` on
exactly the catalog paths it covers; the broker reads secrets with a child token that
carries only the policies of the grants that allowed the request, so Vault enforces the
same decision a second time.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from broker.core.models import SECRET_NAME_PATTERN, SecretRequest, TaskIdentity
from broker.errors import DeniedError, NotFoundError

# Same value as broker.vault.names.GRANT_POLICY_PREFIX (core must not import adapters;
# a unit test keeps the two equal).
DEFAULT_GRANT_POLICY_PREFIX = "podbroker-grant-"

TEAM_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,48}[a-z0-9])?$"
GRANT_ID_PATTERN = TEAM_PATTERN
# Vault mount and path segments: no leading/trailing slash, no "..", no glob characters
# (they end up verbatim in ACL policy paths, where "*" and "+" are wildcards).
MOUNT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
VAULT_PATH_PATTERN = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"
GLOB_PATTERN = r"^[A-Za-z0-9_.\-*?\[\]!]{1,250}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KvSecret(_Strict):
    """A KV v2 secret: ``{mount}/data/{path}``; ``keys`` limits which keys are delivered
    (``None``: all keys); ``version`` pins a KV version (``None``: the latest)."""

    type: Literal["kv"] = "kv"
    mount: Annotated[str, Field(pattern=MOUNT_PATTERN)]
    path: Annotated[str, Field(pattern=VAULT_PATH_PATTERN, max_length=500)]
    keys: tuple[Annotated[str, Field(min_length=1, max_length=250)], ...] | None = None
    version: Annotated[int, Field(ge=1)] | None = None
    sensitive: bool = False
    description: str = ""

    @field_validator("path")
    @classmethod
    def _no_dotdot(cls, value: str) -> str:
        if any(part in {".", ".."} for part in value.split("/")):
            raise ValueError("path must not contain '.' or '..' segments")
        return value

    @field_validator("keys")
    @classmethod
    def _unique_keys(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            if not value:
                raise ValueError("keys must not be empty (omit it to deliver every key)")
            if len(set(value)) != len(value):
                raise ValueError("keys must not repeat")
        return value

    def vault_paths(self) -> list[str]:
        """The ACL paths a grant on this secret needs (read on the data path)."""
        return [f"{self.mount}/data/{self.path}"]

    def display(self) -> str:
        pin = f"@v{self.version}" if self.version else ""
        keys = f" keys={list(self.keys)}" if self.keys else ""
        return f"kv {self.mount}/{self.path}{pin}{keys}"


class DatabaseSecret(_Strict):
    """Dynamic database credentials: ``{mount}/creds/{role}`` (a new login per launch)."""

    type: Literal["database"] = "database"
    mount: Annotated[str, Field(pattern=MOUNT_PATTERN)]
    role: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,126}$")]
    sensitive: bool = True
    description: str = ""

    def vault_paths(self) -> list[str]:
        return [f"{self.mount}/creds/{self.role}"]

    def display(self) -> str:
        return f"database {self.mount}/creds/{self.role}"


CatalogEntry = Annotated[KvSecret | DatabaseSecret, Field(discriminator="type")]


class Constraints(_Strict):
    """Optional limits of a grant: only ``env`` or only ``file`` delivery; a maximum lease
    TTL (seconds) for dynamic credentials."""

    delivery: Literal["env", "file"] | None = None
    max_lease_ttl: Annotated[int, Field(ge=1, le=31 * 24 * 3600)] | None = None


class Grant(_Strict):
    """DAGs matching ``dags`` (and tasks matching ``tasks`` when given; fnmatch globs,
    case-sensitive) may receive ``secrets``."""

    id: Annotated[str, Field(pattern=GRANT_ID_PATTERN)]
    dags: Annotated[str, Field(pattern=GLOB_PATTERN)]
    tasks: Annotated[str, Field(pattern=GLOB_PATTERN)] | None = None
    secrets: tuple[Annotated[str, Field(pattern=SECRET_NAME_PATTERN)], ...] = Field(min_length=1)
    constraints: Constraints = Field(default_factory=Constraints)
    description: str = ""

    def matches(self, identity: TaskIdentity) -> bool:
        if not fnmatch.fnmatchcase(identity.dag_id, self.dags):
            return False
        return self.tasks is None or fnmatch.fnmatchcase(identity.task_id, self.tasks)


class Team(_Strict):
    description: str = ""
    grants: tuple[Grant, ...] = ()


class PolicySet(_Strict):
    """The whole need-to-know policy. ``policy_prefix`` is where this set's grant ACL
    policies live in Vault (a runtime setting, not part of the files)."""

    catalog: dict[Annotated[str, Field(pattern=SECRET_NAME_PATTERN)], CatalogEntry] = Field(
        default_factory=dict
    )
    teams: dict[Annotated[str, Field(pattern=TEAM_PATTERN)], Team] = Field(default_factory=dict)
    policy_prefix: str = Field(default=DEFAULT_GRANT_POLICY_PREFIX, exclude=True)

    def grants(self) -> list[tuple[str, Grant]]:
        """Every grant with its full id ``team/grant``, in a stable order."""
        return [
            (grant_full_id(team, grant.id), grant)
            for team in sorted(self.teams)
            for grant in self.teams[team].grants
        ]

    def policy_name(self, full_id: str) -> str:
        return grant_policy_name(full_id, self.policy_prefix)

    def with_prefix(self, prefix: str) -> PolicySet:
        return self.model_copy(update={"policy_prefix": prefix})


def grant_full_id(team: str, grant_id: str) -> str:
    return f"{team}/{grant_id}"


def grant_policy_name(full_id: str, prefix: str = DEFAULT_GRANT_POLICY_PREFIX) -> str:
    """``analytics/warehouse-etl`` -> ``podbroker-grant-analytics.warehouse-etl`` (team
    and grant ids contain no dots, so the name is unambiguous)."""
    team, _, grant_id = full_id.partition("/")
    return f"{prefix}{team}.{grant_id}"


def grant_acl_hcl(policy: PolicySet, full_id: str, grant: Grant) -> str:
    """The Vault ACL policy text of one grant: ``read`` on exactly the catalog paths of
    the grant's (known) secrets. Deterministic, so applying twice changes nothing."""
    paths: set[str] = set()
    for name in grant.secrets:
        entry = policy.catalog.get(name)
        if entry is not None:
            paths.update(entry.vault_paths())
    lines = [f"# podbroker grant {full_id} (generated; edit the policy files instead)"]
    for path in sorted(paths):
        lines.append(f'path "{path}" {{\n  capabilities = ["read"]\n}}')
    return "\n".join(lines) + "\n"


class SecretDecision(_Strict):
    """Why one requested name was allowed: the grant and its limits."""

    name: str
    grant: str
    policy: str
    max_lease_ttl: int | None = None


class Decision(_Strict):
    """The outcome of :func:`decide`. ``allowed`` only when every name is known and
    granted. Names only, never values."""

    allowed: bool
    matched_grants: list[str] = Field(default_factory=list)
    denied: list[str] = Field(default_factory=list)
    unknown: list[str] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)
    grant_policies: list[str] = Field(default_factory=list)
    secrets: dict[str, SecretDecision] = Field(default_factory=dict)

    def raise_for_denial(self) -> None:
        """Raise when not allowed: unknown names -> :class:`NotFoundError` (404, the
        DAG names a secret the catalog does not have); otherwise names not granted ->
        :class:`DeniedError` (403) whose ``denied`` lists them."""
        if self.allowed:
            return
        reason = "; ".join(self.reasons) or "denied by policy"
        if self.unknown:
            raise NotFoundError(reason)
        raise DeniedError(reason, denied=self.denied)


def decide(
    policy: PolicySet, identity: TaskIdentity, requests: Sequence[SecretRequest]
) -> Decision:
    """Default deny. For each requested name: unknown if not in the catalog; allowed by
    the first grant (teams sorted, grants in file order) that matches the task, names the
    secret and accepts the requested delivery; denied otherwise. Repeated names are
    decided once."""
    grants = policy.grants()
    unknown: list[str] = []
    denied: list[str] = []
    reasons: list[str] = []
    chosen: dict[str, SecretDecision] = {}
    for request in requests:
        name = request.name
        if name in chosen or name in denied or name in unknown:
            continue
        if name not in policy.catalog:
            unknown.append(name)
            reasons.append(f"unknown secret {name!r}: not in the catalog")
            continue
        naming = [(gid, g) for gid, g in grants if name in g.secrets and g.matches(identity)]
        fitting = [
            (gid, g)
            for gid, g in naming
            if g.constraints.delivery is None or g.constraints.delivery == request.delivery.type
        ]
        if fitting:
            gid, grant = fitting[0]
            chosen[name] = SecretDecision(
                name=name,
                grant=gid,
                policy=policy.policy_name(gid),
                max_lease_ttl=grant.constraints.max_lease_ttl,
            )
            continue
        denied.append(name)
        if naming:
            allowed_modes = sorted({g.constraints.delivery or "any" for _, g in naming})
            reasons.append(
                f"secret {name!r}: grant(s) {', '.join(gid for gid, _ in naming)} allow "
                f"only {'/'.join(allowed_modes)} delivery, not {request.delivery.type}"
            )
        else:
            reasons.append(
                f"secret {name!r} is not granted to dag {identity.dag_id!r} "
                f"task {identity.task_id!r}"
            )
    matched = sorted({d.grant for d in chosen.values()})
    allowed = not unknown and not denied
    return Decision(
        allowed=allowed,
        matched_grants=matched,
        denied=denied,
        unknown=unknown,
        reasons=reasons,
        grant_policies=sorted({d.policy for d in chosen.values()}) if allowed else [],
        secrets=chosen,
    )
