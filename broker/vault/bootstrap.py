"""``podbroker vault bootstrap``: idempotently prepare Vault for the broker.

Creates (or corrects) the KV v2 config mount, the broker's own ACL policy, the token role
child tokens are minted through, and optionally the Kubernetes auth method and the
broker's login role. Run with an operator token, never the broker's.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import hvac

from broker.errors import BrokerError, ConflictError, InvalidRequestError, NotFoundError
from broker.vault import names
from broker.vault.client import translate_errors
from broker.vault.layout import VaultLayout
from broker.vault.policy_store import read_stored

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KubernetesAuthOptions:
    """The Kubernetes auth method: ``configure_method`` writes ``auth/{mount}/config``
    (host, CA, token reviewer JWT); the role binds the broker's ServiceAccount."""

    service_account: str
    namespace: str
    audience: str | None = None
    mount: str = "kubernetes"
    role: str = names.KUBERNETES_AUTH_ROLE
    token_ttl: int = 3600
    configure_method: bool = False
    kubernetes_host: str | None = None
    kubernetes_ca_pem: str | None = None
    token_reviewer_jwt: str | None = field(default=None, repr=False)


DEFAULT_DYNAMIC_MOUNTS: tuple[str, ...] = ("database",)
DEFAULT_CHILD_TOKEN_MAX_USES = 100
"""Cap on a child token's uses (the token role's ``token_num_uses``). A launch asks for
one use per secret read plus one when it holds leases, so this bounds the secrets of one
launch too; Vault lowers a larger request to the cap."""


@dataclass(frozen=True)
class BootstrapOptions:
    layout: VaultLayout = field(default_factory=VaultLayout)
    child_token_max_ttl: int = 8 * 3600
    """Hard upper bound (explicit max TTL) of child tokens. Token roles have no default
    TTL: the broker asks for ~60 s per launch (longer only for dynamic credentials,
    which cannot outlive their token)."""
    child_token_max_uses: int = DEFAULT_CHILD_TOKEN_MAX_USES
    child_token_bound_cidrs: tuple[str, ...] = ()
    """When given, child tokens work only from these networks (the broker's pods)."""
    dynamic_mounts: tuple[str, ...] = DEFAULT_DYNAMIC_MOUNTS
    """Mounts of dynamic secrets engines whose leases the broker may renew and revoke.
    The mounts of the catalog already stored in Vault are added to these."""
    kubernetes: KubernetesAuthOptions | None = None


KV_UPGRADE_SECONDS = 15.0


def await_kv_ready(client: hvac.Client, mount: str, timeout: float = KV_UPGRADE_SECONDS) -> None:
    """A KV v2 mount just enabled (or a server just started) upgrades its storage for a
    moment and refuses every request meanwhile ("Upgrading from non-versioned to
    versioned data"): wait, bounded, until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with translate_errors(f"read {mount}/config"):
                client.read(f"{mount}/config")
            return
        except BrokerError as exc:
            upgrading = "upgrading" in str(exc.__cause__ or "").lower()
            if not upgrading or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def broker_policy_rules(
    layout: VaultLayout, dynamic_mounts: Sequence[str] = DEFAULT_DYNAMIC_MOUNTS
) -> list[tuple[str, list[str]]]:
    """The broker's ACL rules as (path, capabilities).

    - read the stored policy: its index and parts (no listing, no metadata), and the
      two documents of the single-entry layout stores written before parts still use;
      mint tokens through its token role only;
      look up / renew itself; extend a child token it has just minted and recorded
      (``auth/token/renew``, token in the body: only the broker ever holds one);
    - renew and revoke leases only of the dynamic engines' credentials
      (``sys/leases/{renew,revoke}/{mount}/creds/*``): the path form of these endpoints
      names the lease in the URL, so the ACL can scope it (the body form,
      ``sys/leases/revoke``, cannot be scoped and is not granted);
    - ``auth/token/revoke-accessor``, which Vault cannot scope to a token role. It stays
      because a child token's accessor is the only handle that survives a broker restart
      (the token itself is never stored). The policy grants neither listing accessors
      nor looking them up, so the broker can only revoke tokens whose accessor it
      recorded, and revoking gives no access to anything.

    No path of any team secret: secrets are read with child tokens only. Lease lookup is
    not granted: ``sys/leases/lookup`` takes the lease in its body (unscopable) and the
    broker does not need it."""
    rules: list[tuple[str, list[str]]] = [
        (layout.kv_data_path(layout.index_path), ["read"]),
        (layout.kv_data_path(layout.part_path("*")), ["read"]),
        # The single-entry layout of before parts, read while no index exists.
        (layout.kv_data_path(layout.catalog_path), ["read"]),
        (layout.kv_data_path(layout.grants_path), ["read"]),
        (f"auth/token/create/{layout.token_role}", ["update"]),
        ("auth/token/lookup-self", ["read"]),
        ("auth/token/renew-self", ["update"]),
        # Extends a just-recorded child token (the token is in the body; only the broker
        # ever holds one, and it cannot pass the token's explicit max TTL).
        ("auth/token/renew", ["update"]),
        ("auth/token/revoke-accessor", ["update"]),
    ]
    for mount in sorted(set(dynamic_mounts)):
        rules.append((f"sys/leases/renew/{mount}/creds/*", ["update"]))
        rules.append((f"sys/leases/revoke/{mount}/creds/*", ["update"]))
    return rules


def broker_policy_hcl(
    layout: VaultLayout, dynamic_mounts: Sequence[str] = DEFAULT_DYNAMIC_MOUNTS
) -> str:
    """The broker's ACL policy (HCL) from :func:`broker_policy_rules`."""
    body = "\n".join(
        f'path "{path}" {{\n  capabilities = {_hcl_list(caps)}\n}}'
        for path, caps in broker_policy_rules(layout, dynamic_mounts)
    )
    return f"# podbroker broker policy (generated by `podbroker vault bootstrap`)\n{body}\n"


_HCL_RULE = re.compile(r'path\s+"([^"]+)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]\s*\}')


def _hcl_rules(hcl: str) -> dict[str, tuple[str, ...]]:
    """path -> capabilities of a policy in the form this module writes (enough to show
    an operator what an upgrade changes; anything else counts as one opaque rule)."""
    return {
        path: tuple(sorted(re.findall(r'"([^"]+)"', caps))) for path, caps in _HCL_RULE.findall(hcl)
    }


def _policy_change(name: str, current: str | None, wanted: str) -> str:
    if current is None:
        return f"wrote ACL policy {name}"
    have, want = _hcl_rules(current), _hcl_rules(wanted)
    removed = sorted(p for p in have if have[p] != want.get(p))
    added = sorted(p for p in want if want[p] != have.get(p))
    parts = [f"-{p}" for p in removed] + [f"+{p}" for p in added]
    return f"updated ACL policy {name}" + (f" ({', '.join(parts)})" if parts else "")


def _hcl_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def catalog_dynamic_mounts(client: hvac.Client, layout: VaultLayout) -> set[str]:
    """Mounts of the dynamic secrets in the catalog stored in Vault (its index and
    parts, or the single-entry catalog document); empty when none is stored yet."""
    try:
        entries = read_stored(client, layout)[0].catalog
    except InvalidRequestError as exc:
        log.warning("the stored catalog is unreadable (%s): no dynamic mounts from it", exc.reason)
        return set()
    return {
        str(entry["mount"])
        for entry in entries.values()
        if isinstance(entry, dict) and entry.get("type") == "database" and entry.get("mount")
    }


def _differs(current: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    if current is None:
        return True
    for key, value in wanted.items():
        have = current.get(key)
        if isinstance(value, list):
            if sorted(map(_bare_cidr, have or [])) != sorted(map(_bare_cidr, value)):
                return True
        elif have != value:
            return True
    return False


def _bare_cidr(item: object) -> str:
    # Vault stores a single-host CIDR without its suffix ("10.0.0.1/32" -> "10.0.0.1").
    text = str(item)
    return text.removesuffix("/32").removesuffix("/128")


def _read(client: hvac.Client, path: str) -> dict[str, Any] | None:
    try:
        with translate_errors(f"read {path}"):
            response = client.read(path)
    except NotFoundError:
        return None
    if not isinstance(response, dict):
        return None
    data = response.get("data")
    return data if isinstance(data, dict) else None


def bootstrap(client: hvac.Client, options: BootstrapOptions) -> list[str]:
    """Make Vault match ``options``; returns what changed (empty on a second run).
    Touches ``sys/mounts``, ``sys/policies/acl``, ``auth/token/roles``, and with
    Kubernetes options ``sys/auth`` and ``auth/{mount}/config|role``."""
    layout = options.layout
    changes: list[str] = []

    with translate_errors("list secrets engines"):
        mounts = client.sys.list_mounted_secrets_engines()
    entry = mounts.get("data", mounts).get(f"{layout.config_mount}/")
    if entry is None:
        with translate_errors(f"enable KV v2 at {layout.config_mount}/"):
            client.sys.enable_secrets_engine(
                "kv",
                path=layout.config_mount,
                options={"version": "2"},
                description="podbroker policy catalog and grants",
            )
        changes.append(f"enabled KV v2 secrets engine at {layout.config_mount}/")
        await_kv_ready(client, layout.config_mount)
    elif entry.get("type") != "kv" or str((entry.get("options") or {}).get("version")) != "2":
        raise ConflictError(f"{layout.config_mount}/ exists and is not a KV version 2 mount")

    mounts = set(options.dynamic_mounts) | catalog_dynamic_mounts(client, layout)
    hcl = broker_policy_hcl(layout, sorted(mounts))
    current_policy = _read(client, f"sys/policies/acl/{layout.broker_policy}")
    current_hcl = None if current_policy is None else str(current_policy.get("policy") or "")
    if current_hcl != hcl:
        with translate_errors(f"write ACL policy {layout.broker_policy}"):
            client.sys.create_or_update_acl_policy(name=layout.broker_policy, policy=hcl)
        changes.append(_policy_change(layout.broker_policy, current_hcl, hcl))

    role_path = f"auth/token/roles/{layout.token_role}"
    wanted_role: dict[str, Any] = {
        "allowed_policies_glob": [f"{layout.policy_prefix}*"],
        "disallowed_policies": ["root", layout.broker_policy],
        # Orphans: a child token (and its dynamic leases) must not die with the broker's
        # own login token, which a restart or re-login replaces within its TTL.
        "orphan": True,
        # Renewable so a service token can be minted short-lived and extended (by the
        # broker, up to its explicit max TTL) once durably recorded; see SecretResolver.
        "renewable": True,
        # Service tokens by default; a KV-only launch asks for a batch token (not
        # persisted: no Vault storage write per launch).
        "token_type": "default-service",
        "token_explicit_max_ttl": options.child_token_max_ttl,
        "token_no_default_policy": True,
        "token_num_uses": options.child_token_max_uses,
        "token_bound_cidrs": list(options.child_token_bound_cidrs),
    }
    if _differs(_read(client, role_path), wanted_role):
        with translate_errors(f"write token role {layout.token_role}"):
            client.write_data(role_path, data=wanted_role)
        changes.append(f"wrote token role {layout.token_role}")

    if options.kubernetes is not None:
        changes += _bootstrap_kubernetes(client, options.kubernetes, layout)
    for change in changes:
        log.info("bootstrap: %s", change)
    return changes


def _bootstrap_kubernetes(
    client: hvac.Client, k8s: KubernetesAuthOptions, layout: VaultLayout
) -> list[str]:
    changes: list[str] = []
    if k8s.configure_method:
        with translate_errors("list auth methods"):
            methods = client.sys.list_auth_methods()
        table = methods.get("data", methods)
        if f"{k8s.mount}/" not in table:
            with translate_errors(f"enable kubernetes auth at {k8s.mount}/"):
                client.sys.enable_auth_method("kubernetes", path=k8s.mount)
            changes.append(f"enabled kubernetes auth at auth/{k8s.mount}/")
        if not k8s.kubernetes_host:
            raise ConflictError("configuring the kubernetes auth method needs --kubernetes-host")
        wanted: dict[str, Any] = {"kubernetes_host": k8s.kubernetes_host}
        if k8s.kubernetes_ca_pem:
            wanted["kubernetes_ca_cert"] = k8s.kubernetes_ca_pem
        current = _read(client, f"auth/{k8s.mount}/config")
        # The reviewer JWT is never read back, so giving one always rewrites the config.
        if k8s.token_reviewer_jwt or _differs(current, wanted):
            data = dict(wanted)
            if k8s.token_reviewer_jwt:
                data["token_reviewer_jwt"] = k8s.token_reviewer_jwt
            with translate_errors(f"configure auth/{k8s.mount}"):
                client.write_data(f"auth/{k8s.mount}/config", data=data)
            changes.append(f"configured auth/{k8s.mount}/config ({k8s.kubernetes_host})")
    role: dict[str, Any] = {
        "bound_service_account_names": [k8s.service_account],
        "bound_service_account_namespaces": [k8s.namespace],
        "token_policies": [layout.broker_policy],
        # Vault's default policy would add body-form sys/leases/renew and lookup (any
        # lease) back; the broker needs nothing from it.
        "token_no_default_policy": True,
        "token_ttl": k8s.token_ttl,
    }
    if k8s.audience:
        role["audience"] = k8s.audience
    role_path = f"auth/{k8s.mount}/role/{k8s.role}"
    if _differs(_read(client, role_path), role):
        with translate_errors(f"write {role_path}"):
            client.write_data(role_path, data=role)
        changes.append(
            f"wrote kubernetes auth role {k8s.role} for {k8s.namespace}/{k8s.service_account}"
        )
    return changes
