"""The need-to-know policy model (pure: no I/O).

A :class:`PolicySet` is a *catalog* (logical secret name -> where it lives in Vault) and
*teams* holding *grants* (which DAGs, optionally which tasks, may receive which names,
under which constraints). The decision over it is :func:`broker.core.policy.decide`.

Each grant becomes one Vault ACL policy (named by
:func:`~broker.core.policy.naming.grant_policy_name`) allowing ``read`` on exactly the
catalog paths it covers (:func:`grant_acl_hcl`); the broker reads secrets with a child
token that carries only the policies of the grants that allowed the request, so Vault
enforces the same decision a second time.
"""

from __future__ import annotations

import fnmatch
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from broker.core.models import SECRET_NAME_PATTERN, TaskIdentity
from broker.core.policy.naming import GRANT_POLICY_PREFIX, grant_full_id, grant_policy_name

TEAM_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,48}[a-z0-9])?$"
GRANT_ID_PATTERN = TEAM_PATTERN
# Vault mount and path segments: no leading/trailing slash, no "..", no glob characters
# (they end up verbatim in ACL policy paths, where "*" and "+" are wildcards).
MOUNT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
VAULT_PATH_PATTERN = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"
GLOB_PATTERN = r"^[A-Za-z0-9_.\-*?\[\]!]{1,250}$"
# An image reference glob: registry/repository[:tag][@sha256:digest], with * and ?.
IMAGE_GLOB_PATTERN = r"^[A-Za-z0-9_.\-/:@*?\[\]!]{1,500}$"


class StrictModel(BaseModel):
    """Unknown fields are errors (typos in policy files must not pass); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class KvSecret(StrictModel):
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


class DatabaseSecret(StrictModel):
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


class Constraints(StrictModel):
    """Optional limits of a grant: only ``env`` or only ``file`` delivery; a maximum lease
    TTL (seconds) for dynamic credentials."""

    delivery: Literal["env", "file"] | None = None
    max_lease_ttl: Annotated[int, Field(ge=1, le=31 * 24 * 3600)] | None = None


class Grant(StrictModel):
    """DAGs matching ``dags`` (and tasks matching ``tasks`` when given; fnmatch globs,
    case-sensitive) may receive ``secrets``."""

    id: Annotated[str, Field(pattern=GRANT_ID_PATTERN)]
    dags: Annotated[str, Field(pattern=GLOB_PATTERN)]
    tasks: Annotated[str, Field(pattern=GLOB_PATTERN)] | None = None
    secrets: tuple[Annotated[str, Field(pattern=SECRET_NAME_PATTERN)], ...] = Field(min_length=1)
    constraints: Constraints = Field(default_factory=Constraints)
    images: tuple[Annotated[str, Field(pattern=IMAGE_GLOB_PATTERN)], ...] | None = None
    """Globs over the full image reference the pod runs (``None``: any image). List
    exact digests (``registry/etl@sha256:<64 hex>``) for sensitive secrets: tags can
    move, and a glob in the digest (``@sha256:*``) matches any image pushed there."""
    pod_templates: tuple[Annotated[str, Field(min_length=1, max_length=253)], ...] | None = None
    """The platform pod templates launches receiving these secrets must run under
    (``None``: any template, or none)."""
    require_verified_task: bool = False
    """Launches receiving these secrets must be confirmed with Airflow (the task instance
    exists, runs this try, on the calling pod) whatever the broker's verification mode."""
    on_exposure: Literal["mask", "revoke"] = "mask"
    """When a value of these secrets shows in a launch's log stream: it is always masked
    and audited; ``revoke`` also revokes a dynamic credential's lease at once."""
    description: str = ""

    def matches(self, identity: TaskIdentity) -> bool:
        if not fnmatch.fnmatchcase(identity.dag_id, self.dags):
            return False
        return self.tasks is None or fnmatch.fnmatchcase(identity.task_id, self.tasks)

    def allows_template(self, pod_template: str | None) -> bool:
        """True when the grant names no templates, or ``pod_template`` is one of them."""
        return self.pod_templates is None or pod_template in self.pod_templates

    def allows_image(self, image: str | None) -> bool:
        """True when the grant has no image list, or ``image`` matches one of its globs.
        An unknown image (``None``) never satisfies an image list."""
        if self.images is None:
            return True
        return image is not None and any(fnmatch.fnmatchcase(image, g) for g in self.images)


class Team(StrictModel):
    description: str = ""
    grants: tuple[Grant, ...] = ()


class PolicySet(StrictModel):
    """The whole need-to-know policy. ``policy_prefix`` is where this set's grant ACL
    policies live in Vault (a runtime setting, not part of the files)."""

    catalog: dict[Annotated[str, Field(pattern=SECRET_NAME_PATTERN)], CatalogEntry] = Field(
        default_factory=dict
    )
    teams: dict[Annotated[str, Field(pattern=TEAM_PATTERN)], Team] = Field(default_factory=dict)
    policy_prefix: str = Field(default=GRANT_POLICY_PREFIX, exclude=True)

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
