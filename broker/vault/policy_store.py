"""Policy sync between files and Vault: read the stored policy, plan, apply, export.

Vault holds the truth, in the config mount (KV v2):

- ``{mount}/data/policies/parts/{name}``: the policy in *parts*, each a slice of the
  catalog or of one team's grants, stored as one JSON text (``{"body": "..."}``) of at
  most :data:`PART_BYTES`. A part is named after its content (``catalog-{sha256}``,
  ``team-{team}-{sha256}``), so it never changes once written; a reader checks the name
  against the content.
- ``{mount}/data/policies/index``: the names of the parts that make up the policy, in
  order. ``apply`` writes the new parts first and the index last (check-and-set), then
  deletes the parts the old index named and the new one does not: a reader sees the
  whole old policy or the whole new one, never a mix. A reader that finds a part gone
  (deleted by an apply after it read the old index) reads the index again.
- Each grant is one ACL policy ``{prefix}{team}.{grant}`` (``sys/policies/acl``).

Why parts: OpenBao refuses a request body of more than about 1,000 JSON strings ("high
complexity"), and integrated storage refuses an entry over 1 MiB; one document of every
grant stopped at about 50 grants. A part is one JSON string, bounded in bytes.

Stores written by the single-entry layout (``policies/catalog`` and ``policies/grants``,
documents of JSON objects) are still read while no index exists; the first ``apply``
writes the parts and the index, then deletes those two documents.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal, TypeVar

import hvac
import hvac.exceptions
from pydantic import ValidationError

from broker.core.policy import Grant, PolicySet, Team, grant_acl_hcl
from broker.errors import ConflictError, InvalidRequestError, NotFoundError
from broker.vault.client import translate_errors
from broker.vault.layout import VaultLayout

log = logging.getLogger(__name__)
T = TypeVar("T")

PART_BYTES: Final = 256 * 1024
"""Largest part body (UTF-8 bytes), well under integrated storage's 1 MiB entry limit.
A single catalog entry or grant larger than this still gets a part of its own."""
INDEX_FORMAT: Final = 1
VAULT_CONCURRENCY: Final = 8
"""Requests in flight at once when ``plan``/``apply`` read or write ACL policies."""
ORPHAN_GRACE: Final = timedelta(hours=1)
"""``apply --prune`` deletes parts no index names once they are this old (younger ones
may be an apply's in progress)."""
READ_ATTEMPTS: Final = 3
"""Index reads per policy read when parts vanish under it (concurrent applies)."""


@dataclass(frozen=True)
class StoredDocument:
    data: dict[str, Any] | None  # None: not written yet
    version: int  # 0: not written yet


@dataclass(frozen=True)
class Part:
    """One slice of the stored policy: ``kind`` catalog (``data``: name -> entry) or team
    (``data``: ``{"team", "description", "grants"}``). ``name`` is derived from the body."""

    name: str
    kind: Literal["catalog", "team"]
    data: dict[str, Any]
    body: str

    @classmethod
    def make(cls, kind: Literal["catalog", "team"], data: dict[str, Any]) -> Part:
        body = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        digest = hashlib.sha256(body.encode()).hexdigest()
        name = f"catalog-{digest}" if kind == "catalog" else f"team-{data['team']}-{digest}"
        return cls(name, kind, data, body)

    @classmethod
    def parse(cls, name: str, body: object) -> Part:
        """The part stored under ``name``; :class:`InvalidRequestError` when the body does
        not match its name (corrupted or written by something else)."""
        if not isinstance(body, str):
            raise InvalidRequestError(f"policy part {name} has no body")
        digest = hashlib.sha256(body.encode()).hexdigest()
        kind: Literal["catalog", "team"] = "catalog" if name.startswith("catalog-") else "team"
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not name.endswith(f"-{digest}") or not isinstance(data, dict):
            raise InvalidRequestError(
                f"policy part {name} does not match its name; re-apply the policy files "
                "with `policies apply --prune`"
            )
        return cls(name, kind, data, body)


@dataclass(frozen=True)
class StoredPolicy:
    """What Vault holds right now: the policy as plain documents, plus where it came
    from (``index_version`` 0: no index; ``legacy``: versions of the single-entry
    documents, read only when there is no index)."""

    catalog: dict[str, Any]
    teams: dict[str, Any]
    index_version: int = 0
    parts: tuple[str, ...] = ()
    legacy: tuple[int, int] = (0, 0)
    index_cas: int = 0
    """The index's current KV version even when it holds no data (a deleted version):
    what the next index write must check-and-set against."""

    @property
    def versions(self) -> tuple[int, ...]:
        """Changes whenever the stored policy may have changed (the cache key)."""
        return (self.index_version,) if self.index_version else (0, *self.legacy)

    @property
    def empty(self) -> bool:
        return self.index_version == 0 and self.legacy == (0, 0)


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


class _PartGoneError(Exception):
    """A part the index named is gone: an apply replaced it; read the index again."""


def _index_parts(index: StoredDocument, layout: VaultLayout) -> tuple[str, ...]:
    data = index.data or {}
    names = data.get("parts")
    if data.get("format") != INDEX_FORMAT or not isinstance(names, str):
        raise InvalidRequestError(
            f"the policy index {layout.config_mount}/{layout.index_path} is malformed; "
            "re-apply the policy files with `policies apply --prune`"
        )
    return tuple(n for n in names.split("\n") if n)


def read_part(client: hvac.Client, layout: VaultLayout, name: str) -> Part:
    """GET ``{mount}/data/policies/parts/{name}`` (latest version: parts never change)."""
    stored = read_document(client, layout.config_mount, layout.part_path(name))
    if stored.data is None:
        raise _PartGoneError(name)
    return Part.parse(name, stored.data.get("body"))


def read_stored(
    client: hvac.Client, layout: VaultLayout, known: Mapping[str, Part] | None = None
) -> tuple[StoredPolicy, dict[str, Part]]:
    """The stored policy: the index, then every part it names that ``known`` (parts
    read before, by name) does not hold; without an index, the two single-entry
    documents. Returns the policy and the parts it is made of (for the next call).
    Reads: 1 when nothing changed since ``known``, 1 + new parts otherwise."""
    known = dict(known or {})
    for attempt in range(READ_ATTEMPTS):
        index = read_document(client, layout.config_mount, layout.index_path)
        if index.data is None:
            return replace(_read_legacy(client, layout), index_cas=index.version), {}
        names = _index_parts(index, layout)
        try:
            parts = {n: known.get(n) or read_part(client, layout, n) for n in names}
        except _PartGoneError as gone:
            log.info("policy part %s replaced while reading (attempt %d)", gone, attempt + 1)
            continue
        return _assemble(parts.values(), index.version, names), parts
    raise InvalidRequestError(
        f"the policy index {layout.config_mount}/{layout.index_path} names parts that do "
        "not exist; re-apply the policy files with `policies apply --prune`"
    )


def _assemble(parts: Iterable[Part], index_version: int, names: tuple[str, ...]) -> StoredPolicy:
    catalog: dict[str, Any] = {}
    teams: dict[str, Any] = {}
    for part in parts:
        if part.kind == "catalog":
            catalog.update(part.data)
            continue
        name = str(part.data.get("team"))
        grants = part.data.get("grants")
        grants = grants if isinstance(grants, list) else []
        if name in teams:
            teams[name]["grants"].extend(grants)
        else:
            teams[name] = {**part.data, "grants": list(grants)}
            teams[name].pop("team", None)
    return StoredPolicy(
        catalog, teams, index_version=index_version, parts=names, index_cas=index_version
    )


def _read_legacy(client: hvac.Client, layout: VaultLayout) -> StoredPolicy:
    catalog = read_document(client, layout.config_mount, layout.catalog_path)
    grants = read_document(client, layout.config_mount, layout.grants_path)
    secrets = (catalog.data or {}).get("secrets")
    teams = (grants.data or {}).get("teams")
    return StoredPolicy(
        secrets if isinstance(secrets, dict) else {},
        teams if isinstance(teams, dict) else {},
        legacy=(catalog.version, grants.version),
    )


def split_parts(policy: PolicySet, budget: int = PART_BYTES) -> list[Part]:
    """``policy`` as parts (catalog slices first, then each team's, in name order), each
    body at most ``budget`` bytes unless one item alone is larger. Equal policies give
    equal parts; a change to one team changes only that team's parts."""
    dumped = policy.model_dump(mode="json")
    parts: list[Part] = []
    catalog = sorted(dumped["catalog"].items())
    for chunk in _chunks(catalog, budget - len(Part.make("catalog", {}).body)):
        parts.append(Part.make("catalog", dict(chunk)))
    for team in sorted(dumped["teams"]):
        body = dumped["teams"][team]
        head = {k: v for k, v in body.items() if k != "grants"}
        frame = Part.make("team", {**head, "team": team, "grants": []})
        chunks = _chunks(body.get("grants") or [], budget - len(frame.body.encode())) or [[]]
        for chunk in chunks:
            parts.append(Part.make("team", {**head, "team": team, "grants": list(chunk)}))
    return parts


def _chunks(items: list[Any], budget: int) -> list[list[Any]]:
    """``items`` in order, cut so each chunk's JSON (with commas) fits ``budget`` bytes;
    an item larger than that alone is a chunk of its own."""
    chunks: list[list[Any]] = []
    current: list[Any] = []
    size = 0
    for item in items:
        cost = len(json.dumps(item, separators=(",", ":")).encode()) + 1
        if current and size + cost > budget:
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += cost
    if current:
        chunks.append(current)
    return chunks


def parse_stored(stored: StoredPolicy, layout: VaultLayout) -> PolicySet:
    """The PolicySet in Vault (empty when nothing was applied yet: default deny)."""
    raw = {"catalog": stored.catalog, "teams": stored.teams}
    try:
        return PolicySet.model_validate(raw).with_prefix(layout.policy_prefix)
    except ValidationError as exc:
        fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors(include_input=False))
        raise InvalidRequestError(
            f"the policy stored in Vault ({layout.config_mount}/) is malformed at {fields}; "
            "re-apply the policy files with `policies apply --prune`"
        ) from exc


def list_grant_policies(client: hvac.Client, layout: VaultLayout) -> dict[str, str]:
    """Every ACL policy named with the grant prefix -> its rules (``sys/policies/acl``)."""
    with translate_errors("list ACL policies"):
        names = client.sys.list_acl_policies()["data"]["keys"]
    ours = [name for name in names if name.startswith(layout.policy_prefix)]

    def read(name: str) -> str:
        with translate_errors(f"read ACL policy {name}"):
            return str(client.sys.read_acl_policy(name)["data"]["policy"])

    return dict(zip(ours, _each(read, ours), strict=True))


def _each(work: Callable[[str], T], items: list[str]) -> list[T]:
    """``work`` over ``items`` on :data:`VAULT_CONCURRENCY` threads (one request each:
    10,000 ACL policies one after the other spend most of their time waiting), in
    order; the first error is raised once every started request has ended."""
    if len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(VAULT_CONCURRENCY, thread_name_prefix="policy-sync") as pool:
        return list(pool.map(work, items))


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
    kind: Literal["secret", "grant", "vault-policy", "policy-store"]
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
    write_parts: list[Part] = field(default_factory=list)
    """Parts the new index names that the stored one does not (written first)."""
    index_doc: dict[str, Any] | None = None  # None: unchanged
    index_cas: int = 0
    """The index version the plan was made against (0: none yet)."""
    drop_parts: list[str] = field(default_factory=list)
    """Parts only the old index names, and with ``--prune`` old parts no index names
    (deleted once the new index is written)."""
    drop_legacy: list[str] = field(default_factory=list)
    """Single-entry documents left from before parts (deleted after the index)."""
    put_policies: dict[str, str] = field(default_factory=dict)
    delete_policies: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (
            self.index_doc is not None
            or self.drop_parts
            or self.drop_legacy
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
    client: hvac.Client,
    layout: VaultLayout,
    files: PolicySet,
    *,
    prune: bool = False,
    part_bytes: int = PART_BYTES,
    orphan_grace: timedelta = ORPHAN_GRACE,
) -> PolicyPlan:
    """Compare the files with Vault. Reads the stored policy (index and parts, or the
    single-entry documents) and every ACL policy with the grant prefix; writes nothing.
    ``part_bytes`` bounds each part written (tests make it small). With ``prune``, parts
    no index names (left by an apply that stopped, or lost a check-and-set race) are
    removed too once older than ``orphan_grace``."""
    _require_mount(client, layout)
    try:
        stored, _ = read_stored(client, layout)
        current = parse_stored(stored, layout)
    except InvalidRequestError:
        if not prune:
            raise
        # The way out of an unreadable store: the files replace it whole (its parts
        # are left behind, unreferenced).
        stored, current = _unreadable(client, layout), PolicySet()
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

    _plan_storage(client, result, stored, split_parts(desired, part_bytes))
    if prune:
        keep = set(stored.parts) | {p.name for p in split_parts(desired, part_bytes)}
        orphans = _orphan_parts(client, layout, keep, orphan_grace)
        result.drop_parts = sorted(set(result.drop_parts) | set(orphans))
        result.changes.extend(Change("remove", "policy-store", f"part {n}") for n in orphans)
    if result.index_doc is not None and not any(
        c.kind in ("secret", "grant") and c.action != "keep" for c in result.changes
    ):
        # Same secrets and grants, other parts: team descriptions or the storage layout.
        what = "(single-entry documents -> parts)" if stored.index_version == 0 else "(teams)"
        result.changes.append(Change("change", "policy-store", what))

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


def _orphan_parts(
    client: hvac.Client, layout: VaultLayout, keep: set[str], grace: timedelta
) -> list[str]:
    """Parts in ``{mount}/metadata/policies/parts/`` (LIST) that are not in ``keep`` and
    were created more than ``grace`` ago (metadata read each). Younger ones may belong to
    an apply still writing its parts before its index: they are left alone."""
    mount = layout.config_mount
    try:
        with translate_errors(f"list {mount}/{layout.parts_path}"):
            listed = client.secrets.kv.v2.list_secrets(path=layout.parts_path, mount_point=mount)
    except NotFoundError:
        return []
    names = [str(n) for n in listed["data"]["keys"] if not str(n).endswith("/")]
    cutoff = datetime.now(UTC) - grace
    old = []
    for name in sorted(set(names) - keep):
        with translate_errors(f"read the metadata of {mount}/{layout.part_path(name)}"):
            meta = client.secrets.kv.v2.read_secret_metadata(
                path=layout.part_path(name), mount_point=mount
            )
        created = str(meta["data"].get("created_time") or "")
        try:
            when = datetime.strptime(created[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        except ValueError:
            continue
        if when <= cutoff:
            old.append(name)
    return old


def _unreadable(client: hvac.Client, layout: VaultLayout) -> StoredPolicy:
    """A store that cannot be read, as far as replacing it needs: the index version
    (for check-and-set) and which single-entry documents exist."""
    index = read_document(client, layout.config_mount, layout.index_path)
    legacy = tuple(
        read_document(client, layout.config_mount, path).version
        for path in (layout.catalog_path, layout.grants_path)
    )
    return StoredPolicy(
        {},
        {},
        index_version=index.version if index.data is not None else 0,
        legacy=(legacy[0], legacy[1]),
        index_cas=index.version,
    )


def _plan_storage(
    client: hvac.Client, result: PolicyPlan, stored: StoredPolicy, parts: list[Part]
) -> None:
    """The part writes, the index and the deletions that turn ``stored`` into
    ``parts``. An empty policy over an empty store writes nothing."""
    layout = result.layout
    names = tuple(p.name for p in parts)
    have = set(stored.parts)
    if stored.index_version:
        # Left over when an apply stopped after writing the index, or written by an
        # older podbroker after the upgrade: nobody reads them while the index exists.
        result.drop_legacy = [
            path
            for path in (layout.catalog_path, layout.grants_path)
            if read_document(client, layout.config_mount, path).version
        ]
    else:
        legacy = zip((layout.catalog_path, layout.grants_path), stored.legacy, strict=True)
        result.drop_legacy = [path for path, version in legacy if version]
    if names == stored.parts and (stored.index_version or not parts):
        return
    result.write_parts = [p for p in parts if p.name not in have]
    result.index_doc = {"format": INDEX_FORMAT, "parts": "\n".join(names)}
    result.index_cas = stored.index_cas
    result.drop_parts = sorted(have - set(names))


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
    then the new parts, then the index with check-and-set (the moment the new policy
    takes effect, all at once), then delete what the old index named, the single-entry
    documents of before parts, and pruned ACL policies."""
    layout = plan_.layout
    mount = layout.config_mount

    def put(name: str) -> None:
        with translate_errors(f"write ACL policy {name}"):
            client.sys.create_or_update_acl_policy(name=name, policy=plan_.put_policies[name])
        log.info("wrote Vault ACL policy %s", name)

    _each(put, list(plan_.put_policies))
    for part in plan_.write_parts:
        path = layout.part_path(part.name)
        with translate_errors(f"write {mount}/{path}"):
            client.secrets.kv.v2.create_or_update_secret(
                path=path, secret={"body": part.body}, mount_point=mount
            )
    if plan_.write_parts:
        log.info("wrote %d policy parts in %s/%s", len(plan_.write_parts), mount, layout.parts_path)
    if plan_.index_doc is not None:
        try:
            with translate_errors(f"write {mount}/{layout.index_path}"):
                client.secrets.kv.v2.create_or_update_secret(
                    path=layout.index_path,
                    secret=plan_.index_doc,
                    cas=plan_.index_cas,
                    mount_point=mount,
                )
        except InvalidRequestError as exc:
            # Vault's own text (kept off the translated reason) tells a CAS miss apart.
            if "check-and-set" in str(exc.__cause__):
                raise ConflictError(
                    f"{mount}/{layout.index_path} changed since the plan was made; plan again"
                ) from exc
            raise
        log.info("wrote %s/%s", mount, layout.index_path)
    stale = [layout.part_path(n) for n in plan_.drop_parts] + list(plan_.drop_legacy)
    for path in stale:
        with translate_errors(f"delete {mount}/{path}"):
            client.secrets.kv.v2.delete_metadata_and_all_versions(path=path, mount_point=mount)
    if stale:
        log.info("deleted %d superseded policy entries in %s/", len(stale), mount)
    for name in plan_.delete_policies:
        with translate_errors(f"delete ACL policy {name}"):
            client.sys.delete_acl_policy(name)
        log.info("deleted Vault ACL policy %s", name)


def export_policy(client: hvac.Client, layout: VaultLayout) -> PolicySet:
    """The policy Vault currently holds (for ``policies export``)."""
    _require_mount(client, layout)
    return parse_stored(read_stored(client, layout)[0], layout)
