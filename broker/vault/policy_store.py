"""Policy sync between files and Vault: read the stored policy, plan, apply, export.

Vault holds the truth: the catalog and the grants are two KV v2 documents in the config
mount (``{mount}/data/policies/catalog`` and ``.../grants``), and each grant is one ACL
policy ``{prefix}{team}.{grant}`` (``sys/policies/acl``). Writes use KV check-and-set so
two concurrent applies cannot silently overwrite each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import hvac
import hvac.exceptions
from pydantic import ValidationError

from broker.core.policy import Grant, PolicySet, Team, grant_acl_hcl
from broker.errors import ConflictError, InvalidRequestError, NotFoundError
from broker.vault.client import translate_errors
from broker.vault.layout import VaultLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredDocument:
    data: dict[str, Any] | None  # None: not written yet
    version: int  # 0: not written yet


@dataclass(frozen=True)
class StoredPolicy:
    """What Vault holds right now."""

    catalog: StoredDocument
    grants: StoredDocument

    @property
    def versions(self) -> tuple[int, int]:
        return (self.catalog.version, self.grants.version)


def read_document(client: hvac.Client, mount: str, path: str) -> StoredDocument:
    """GET ``{mount}/data/{path}`` (latest version); missing -> empty document."""
    try:
        with translate_errors(f"read {mount}/{path}"):
            response = client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=mount, raise_on_deleted_version=False
            )
    except NotFoundError:
        return StoredDocument(None, 0)
    body = response.get("data") or {}
    version = int((body.get("metadata") or {}).get("version") or 0)
    return StoredDocument(body.get("data"), version)


def read_stored(client: hvac.Client, layout: VaultLayout) -> StoredPolicy:
    """Both policy documents from the config mount."""
    return StoredPolicy(
        read_document(client, layout.config_mount, layout.catalog_path),
        read_document(client, layout.config_mount, layout.grants_path),
    )


def documents(policy: PolicySet) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (catalog, grants) KV documents of ``policy`` (full dumps, so equal policies
    give equal documents)."""
    dumped = policy.model_dump(mode="json")
    return {"secrets": dumped["catalog"]}, {"teams": dumped["teams"]}


def parse_stored(stored: StoredPolicy, layout: VaultLayout) -> PolicySet:
    """The PolicySet in Vault (empty when nothing was applied yet: default deny)."""
    raw = {
        "catalog": (stored.catalog.data or {}).get("secrets", {}),
        "teams": (stored.grants.data or {}).get("teams", {}),
    }
    try:
        return PolicySet.model_validate(raw).with_prefix(layout.policy_prefix)
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors(include_input=False))
        raise InvalidRequestError(
            f"the policy stored in Vault ({layout.config_mount}/) is malformed at {fields}; "
            "re-apply the policy files"
        ) from exc


def list_grant_policies(client: hvac.Client, layout: VaultLayout) -> dict[str, str]:
    """Every ACL policy named with the grant prefix -> its rules (``sys/policies/acl``)."""
    with translate_errors("list ACL policies"):
        names = client.sys.list_acl_policies()["data"]["keys"]
    result: dict[str, str] = {}
    for name in names:
        if name.startswith(layout.policy_prefix):
            with translate_errors(f"read ACL policy {name}"):
                result[name] = client.sys.read_acl_policy(name)["data"]["policy"]
    return result


def merge(current: PolicySet, files: PolicySet) -> PolicySet:
    """``files`` over ``current``: what files define wins; what only Vault has is kept
    (``apply`` without ``--prune``)."""
    catalog = {**current.catalog, **files.catalog}
    teams: dict[str, Team] = dict(current.teams)
    for name, team in files.teams.items():
        old = current.teams.get(name)
        kept: tuple[Grant, ...] = ()
        if old is not None:
            new_ids = {g.id for g in team.grants}
            kept = tuple(g for g in old.grants if g.id not in new_ids)
        teams[name] = team.model_copy(update={"grants": team.grants + kept})
    return PolicySet(catalog=catalog, teams=teams, policy_prefix=files.policy_prefix)


Action = Literal["add", "change", "remove", "keep"]


@dataclass(frozen=True)
class Change:
    action: Action
    kind: Literal["secret", "grant", "vault-policy"]
    name: str
    detail: str = ""

    def __str__(self) -> str:
        mark = {"add": "+", "change": "~", "remove": "-", "keep": "="}[self.action]
        note = " (kept: not in the files; --prune removes it)" if self.action == "keep" else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"{mark} {self.kind} {self.name}{detail}{note}"


@dataclass
class PolicyPlan:
    """What :func:`apply_plan` would do. ``changes`` is the readable diff; the rest is
    the exact write set."""

    layout: VaultLayout
    desired: PolicySet
    changes: list[Change] = field(default_factory=list)
    catalog_doc: dict[str, Any] | None = None  # None: unchanged
    grants_doc: dict[str, Any] | None = None
    catalog_cas: int = 0
    grants_cas: int = 0
    put_policies: dict[str, str] = field(default_factory=dict)
    delete_policies: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (
            self.catalog_doc is not None
            or self.grants_doc is not None
            or self.put_policies
            or self.delete_policies
        )


def _field_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            parts.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return "; ".join(parts)


def plan(
    client: hvac.Client, layout: VaultLayout, files: PolicySet, *, prune: bool = False
) -> PolicyPlan:
    """Compare the files with Vault. Reads the two KV documents and every ACL policy
    with the grant prefix; writes nothing."""
    _require_mount(client, layout)
    stored = read_stored(client, layout)
    current = parse_stored(stored, layout)
    files = files.with_prefix(layout.policy_prefix)
    desired = files if prune else merge(current, files)
    result = PolicyPlan(layout=layout, desired=desired)

    for name in sorted(set(current.catalog) | set(desired.catalog)):
        old, new = current.catalog.get(name), desired.catalog.get(name)
        if old is None and new is not None:
            result.changes.append(Change("add", "secret", name, new.display()))
        elif new is None and old is not None:
            result.changes.append(Change("remove", "secret", name, old.display()))
        elif old != new and old is not None and new is not None:
            detail = _field_diff(old.model_dump(mode="json"), new.model_dump(mode="json"))
            result.changes.append(Change("change", "secret", name, detail))
    if not prune:
        result.changes.extend(
            Change("keep", "secret", n) for n in sorted(set(current.catalog) - set(files.catalog))
        )

    old_grants, new_grants = dict(current.grants()), dict(desired.grants())
    file_grants = dict(files.grants())
    for gid in sorted(set(old_grants) | set(new_grants)):
        og, ng = old_grants.get(gid), new_grants.get(gid)
        if og is None and ng is not None:
            result.changes.append(Change("add", "grant", gid, _grant_summary(ng)))
        elif ng is None and og is not None:
            result.changes.append(Change("remove", "grant", gid, _grant_summary(og)))
        elif og != ng and og is not None and ng is not None:
            detail = _field_diff(og.model_dump(mode="json"), ng.model_dump(mode="json"))
            result.changes.append(Change("change", "grant", gid, detail))
        elif gid not in file_grants:
            result.changes.append(Change("keep", "grant", gid))

    # Team descriptions live in the grants document too.
    catalog_doc, grants_doc = documents(desired)
    if stored.catalog.data != catalog_doc:
        result.catalog_doc, result.catalog_cas = catalog_doc, stored.catalog.version
    if stored.grants.data != grants_doc:
        result.grants_doc, result.grants_cas = grants_doc, stored.grants.version
        if not any(c.kind == "grant" and c.action != "keep" for c in result.changes):
            result.changes.append(Change("change", "grant", "(team descriptions)"))

    existing = list_grant_policies(client, layout)
    wanted = {
        desired.policy_name(gid): grant_acl_hcl(desired, gid, g) for gid, g in desired.grants()
    }
    for name, hcl in sorted(wanted.items()):
        if name not in existing:
            result.put_policies[name] = hcl
            result.changes.append(Change("add", "vault-policy", name))
        elif existing[name] != hcl:
            result.put_policies[name] = hcl
            result.changes.append(Change("change", "vault-policy", name, "read paths changed"))
    for name in sorted(set(existing) - set(wanted)):
        if prune:
            result.delete_policies.append(name)
            result.changes.append(Change("remove", "vault-policy", name))
        else:
            result.changes.append(Change("keep", "vault-policy", name))
    return result


def _grant_summary(grant: Grant) -> str:
    tasks = f" tasks={grant.tasks}" if grant.tasks else ""
    limits = grant.constraints.model_dump(exclude_none=True)
    extra = f" {limits}" if limits else ""
    return f"dags={grant.dags}{tasks} secrets={list(grant.secrets)}{extra}"


def _require_mount(client: hvac.Client, layout: VaultLayout) -> None:
    with translate_errors("list secrets engines"):
        mounts = client.sys.list_mounted_secrets_engines()
    table = mounts.get("data", mounts)
    entry = table.get(f"{layout.config_mount}/")
    if entry is None:
        raise NotFoundError(
            f"Vault has no {layout.config_mount}/ mount: run `podbroker vault bootstrap` first"
        )
    if entry.get("type") != "kv" or str((entry.get("options") or {}).get("version")) != "2":
        raise ConflictError(f"{layout.config_mount}/ is not a KV version 2 mount")


def apply_plan(client: hvac.Client, plan_: PolicyPlan) -> None:
    """Write the plan: ACL policies first (so grants never point at missing policies),
    then the catalog and grants documents with check-and-set, then prune deletions."""
    layout = plan_.layout
    for name, hcl in plan_.put_policies.items():
        with translate_errors(f"write ACL policy {name}"):
            client.sys.create_or_update_acl_policy(name=name, policy=hcl)
        log.info("wrote Vault ACL policy %s", name)
    for path, doc, cas in (
        (layout.catalog_path, plan_.catalog_doc, plan_.catalog_cas),
        (layout.grants_path, plan_.grants_doc, plan_.grants_cas),
    ):
        if doc is None:
            continue
        try:
            with translate_errors(f"write {layout.config_mount}/{path}"):
                client.secrets.kv.v2.create_or_update_secret(
                    path=path, secret=doc, cas=cas, mount_point=layout.config_mount
                )
        except InvalidRequestError as exc:
            if "check-and-set" in exc.reason:
                raise ConflictError(
                    f"{layout.config_mount}/{path} changed since the plan was made; plan again"
                ) from exc
            raise
        log.info("wrote %s/%s", layout.config_mount, path)
    for name in plan_.delete_policies:
        with translate_errors(f"delete ACL policy {name}"):
            client.sys.delete_acl_policy(name)
        log.info("deleted Vault ACL policy %s", name)


def export_policy(client: hvac.Client, layout: VaultLayout) -> PolicySet:
    """The policy Vault currently holds (for ``policies export``)."""
    _require_mount(client, layout)
    return parse_stored(read_stored(client, layout), layout)
