"""`podbroker vault bootstrap` on the real OpenBao (and kube-apiserver for the Kubernetes
auth method): idempotent, least-privilege broker policy, token role limits."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import hvac
import pytest
from kubernetes import client
from typer.testing import CliRunner

from broker.cli.main import app
from broker.errors import ConflictError, VaultUnavailableError
from broker.vault import names
from broker.vault.bootstrap import DEFAULT_CHILD_TOKEN_MAX_USES, BootstrapOptions, bootstrap
from broker.vault.client import VaultAuth, VaultSession
from podbroker_devstack.broker_env import BrokerHandle
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from tests.helpers import eventually
from tests.integration.vault_database import database_mount, lease_alive
from tests.integration.vault_policy_env import layout_for

pytestmark = pytest.mark.stack


def capabilities(vault: OpenBao, token: str, path: str) -> list[str]:
    # Asked with the root token: the broker's token has no default policy, so not even
    # sys/capabilities-self.
    response = hvac.Client(url=vault.url, token=vault.root_token).write_data(
        "sys/capabilities", data={"token": token, "paths": [path]}
    )
    return sorted(response["data"][path])


def test_bootstrap_is_idempotent_and_least_privilege(
    vault: OpenBao, vault_root: hvac.Client, unique: str
) -> None:
    layout = layout_for(unique)
    options = BootstrapOptions(layout=layout, child_token_max_ttl=7200)
    first = bootstrap(vault_root, options)
    assert any("KV v2" in c for c in first) and any("token role" in c for c in first)
    assert bootstrap(vault_root, options) == []

    role = vault_root.read(f"auth/token/roles/{layout.token_role}")["data"]
    assert role["allowed_policies_glob"] == [f"{layout.policy_prefix}*"]
    # Renewable: a child token is minted for the mint grace and extended once recorded.
    assert role["orphan"] is True and role["renewable"] is True
    assert role["token_explicit_max_ttl"] == 7200 and role["token_no_default_policy"] is True
    assert role["token_num_uses"] == DEFAULT_CHILD_TOKEN_MAX_USES

    # As the broker logs in: its own policy and not Vault's default one (whose body-form
    # sys/leases/renew and sys/leases/lookup would widen it again).
    broker = vault_root.auth.token.create(
        policies=[layout.broker_policy], ttl="10m", no_default_policy=True
    )
    token = broker["auth"]["client_token"]
    config = layout.config_mount
    # The stored policy: index and parts, and the single-entry layout of before parts.
    assert capabilities(vault, token, f"{config}/data/{layout.index_path}") == ["read"]
    assert capabilities(vault, token, f"{config}/data/{layout.parts_path}/team-a-0f") == ["read"]
    assert capabilities(vault, token, f"{config}/data/{layout.grants_path}") == ["read"]
    assert capabilities(vault, token, f"{config}/data/{layout.catalog_path}") == ["read"]
    # ... and nothing more: no listing, metadata, writes or other entries of the mount.
    assert capabilities(vault, token, f"{config}/metadata/{layout.parts_path}/x") == ["deny"]
    assert capabilities(vault, token, f"{config}/metadata/{layout.parts_path}") == ["deny"]
    assert capabilities(vault, token, f"{config}/delete/{layout.index_path}") == ["deny"]
    assert capabilities(vault, token, f"{config}/data/policies/other") == ["deny"]
    assert capabilities(vault, token, f"{config}/data/other") == ["deny"]
    assert capabilities(vault, token, "secret/data/payments/provider-api") == ["deny"]
    assert capabilities(vault, token, "database/creds/orders-readonly") == ["deny"]
    assert capabilities(vault, token, f"auth/token/create/{layout.token_role}") == ["update"]
    assert capabilities(vault, token, "auth/token/create") == ["deny"]
    assert capabilities(vault, token, "auth/token/renew") == ["update"]
    assert capabilities(vault, token, "auth/token/renew-accessor") == ["deny"]
    # Leases: the path form, for the dynamic engines' credentials only.
    assert capabilities(vault, token, "sys/leases/revoke") == ["deny"]
    assert capabilities(vault, token, "sys/leases/renew") == ["deny"]
    assert capabilities(vault, token, "sys/leases/revoke-prefix/database") == ["deny"]
    assert capabilities(vault, token, "sys/leases/revoke/database/creds/r/abc") == ["update"]
    assert capabilities(vault, token, "sys/leases/renew/database/creds/r/abc") == ["update"]
    assert capabilities(vault, token, "sys/leases/revoke/other/creds/r/abc") == ["deny"]
    assert capabilities(vault, token, "sys/leases/revoke/auth/token/create/x") == ["deny"]
    assert capabilities(vault, token, "sys/leases/lookup") == ["deny"]
    assert capabilities(vault, token, "auth/token/accessors") == ["deny"]
    assert capabilities(vault, token, "auth/token/lookup-accessor") == ["deny"]
    assert capabilities(vault, token, f"sys/policies/acl/{layout.broker_policy}") == ["deny"]

    # A drifted role is put back.
    vault_root.write_data(f"auth/token/roles/{layout.token_role}", data={"orphan": False})
    assert bootstrap(vault_root, options) == [f"wrote token role {layout.token_role}"]


WIDE_POLICY = """# podbroker broker policy (generated by `podbroker vault bootstrap`)
path "{catalog}" {{
  capabilities = ["read"]
}}
path "auth/token/revoke-accessor" {{
  capabilities = ["update"]
}}
path "sys/leases/revoke" {{
  capabilities = ["update"]
}}
path "sys/leases/renew" {{
  capabilities = ["update"]
}}
"""


def test_bootstrap_upgrades_a_wide_policy_and_limits_child_tokens(
    vault: OpenBao, vault_root: hvac.Client, unique: str
) -> None:
    """An existing broker policy from an older bootstrap (any lease, body form) is
    narrowed in place, the change is shown, and the token role gets its use cap and
    bound CIDRs; then nothing changes."""
    layout = layout_for(unique)
    bootstrap(vault_root, BootstrapOptions(layout=layout))
    vault_root.sys.create_or_update_acl_policy(
        name=layout.broker_policy,
        policy=WIDE_POLICY.format(catalog=layout.kv_data_path(layout.catalog_path)),
    )
    options = BootstrapOptions(
        layout=layout,
        child_token_max_uses=5,
        child_token_bound_cidrs=("127.0.0.1/32", "10.0.0.0/8"),
        dynamic_mounts=("database", f"db-{unique}"),
    )
    changes = bootstrap(vault_root, options)
    policy_change = next(c for c in changes if "ACL policy" in c)
    assert policy_change.startswith(f"updated ACL policy {layout.broker_policy} (")
    for removed in ("-sys/leases/revoke", "-sys/leases/renew"):
        assert removed in policy_change
    for added in (
        "+sys/leases/revoke/database/creds/*",
        f"+sys/leases/renew/db-{unique}/creds/*",
        f"+auth/token/create/{layout.token_role}",
    ):
        assert added in policy_change
    assert f"wrote token role {layout.token_role}" in changes
    assert bootstrap(vault_root, options) == []

    role = vault_root.read(f"auth/token/roles/{layout.token_role}")["data"]
    assert role["token_num_uses"] == 5
    assert sorted(role["token_bound_cidrs"]) == ["10.0.0.0/8", "127.0.0.1"]
    # The role caps what a caller asks for.
    child = vault_root.auth.token.create(
        role_name=layout.token_role, policies=[f"{layout.policy_prefix}x"], num_uses=50
    )["auth"]
    assert vault_root.auth.token.lookup_accessor(child["accessor"])["data"]["num_uses"] == 5


def test_broker_policy_covers_the_stored_catalogs_dynamic_mounts(
    vault_root: hvac.Client, unique: str
) -> None:
    layout = layout_for(unique)
    bootstrap(vault_root, BootstrapOptions(layout=layout))
    vault_root.secrets.kv.v2.create_or_update_secret(
        path=layout.catalog_path,
        mount_point=layout.config_mount,
        secret={
            "secrets": {
                "orders": {"type": "database", "mount": f"pg-{unique}", "role": "ro"},
                "wh": {"type": "kv", "mount": "secret", "path": "x"},
            }
        },
    )
    changes = bootstrap(vault_root, BootstrapOptions(layout=layout))
    assert changes == [
        f"updated ACL policy {layout.broker_policy} (+sys/leases/renew/pg-{unique}/creds/*, "
        f"+sys/leases/revoke/pg-{unique}/creds/*)"
    ]


def test_bootstrap_refuses_a_non_kv_config_mount(vault_root: hvac.Client, unique: str) -> None:
    layout = layout_for(unique)
    vault_root.sys.enable_secrets_engine("kv", path=layout.config_mount, options={"version": "1"})
    with pytest.raises(ConflictError, match="KV version 2"):
        bootstrap(vault_root, BootstrapOptions(layout=layout))


def test_cli_bootstrap_with_kubernetes_auth_then_broker_logs_in(
    vault: OpenBao,
    vault_root: hvac.Client,
    kube: ControlPlane,
    kube_api: client.ApiClient,
    namespace: str,
    unique: str,
    tmp_path: Path,
) -> None:
    core = client.CoreV1Api(kube_api)
    for name in ("vault-reviewer", "podbroker", "intruder"):
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
        )
    client.RbacAuthorizationV1Api(kube_api).create_cluster_role_binding(
        client.V1ClusterRoleBinding(
            metadata=client.V1ObjectMeta(name=f"vault-reviewer-{unique}"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io",
                kind="ClusterRole",
                name="system:auth-delegator",
            ),
            subjects=[
                client.RbacV1Subject(
                    kind="ServiceAccount", name="vault-reviewer", namespace=namespace
                )
            ],
        )
    )
    reviewer = tmp_path / "reviewer.jwt"
    reviewer.write_text(kube.mint_token(namespace, "vault-reviewer"))
    layout = layout_for(unique)
    mount = f"k8s-{unique}"
    args = [
        "vault",
        "bootstrap",
        "--config-mount",
        layout.config_mount,
        "--policy-prefix",
        layout.policy_prefix,
        "--token-role",
        layout.token_role,
        "--broker-policy",
        layout.broker_policy,
        "--kubernetes-host",
        kube.server,
        "--kubernetes-ca-file",
        str(kube.ca_cert),
        "--token-reviewer-jwt-file",
        str(reviewer),
        "--kubernetes-mount",
        mount,
        "--service-account",
        "podbroker",
        "--namespace",
        namespace,
        "--audience",
        "vault",
    ]
    env = {"VAULT_ADDR": vault.url, "VAULT_TOKEN": vault.root_token}
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert f"enabled kubernetes auth at auth/{mount}/" in result.output
    assert vault.root_token not in result.output
    assert reviewer.read_text() not in result.output

    jwt = tmp_path / "token"
    jwt.write_text(kube.mint_token(namespace, "podbroker", audiences=["vault"]))
    session = VaultSession.connect(
        vault.url, VaultAuth.kubernetes("podbroker-broker", jwt, mount=mount)
    )
    session.ping()
    info = session.hvac_client.auth.token.lookup_self()["data"]
    assert info["policies"] == [layout.broker_policy]  # not Vault's default policy
    assert info["meta"]["service_account_name"] == "podbroker"

    jwt.write_text(kube.mint_token(namespace, "intruder", audiences=["vault"]))
    with pytest.raises(
        VaultUnavailableError, match="refused the broker's kubernetes login"
    ) as refused:
        VaultSession.connect(vault.url, VaultAuth.kubernetes("podbroker-broker", jwt, mount=mount))
    assert jwt.read_text() not in str(refused.value)

    # Idempotent apart from the reviewer JWT (write-only in Vault, so given -> rewritten).
    again = CliRunner().invoke(
        app, [a for a in args if a not in ("--token-reviewer-jwt-file", str(reviewer))], env=env
    )
    assert again.exit_code == 0, again.output
    assert "no changes" in again.output


def test_the_running_brokers_token_cannot_touch_unrelated_leases_but_revokes_its_own(
    broker: BrokerHandle, postgres: Postgres, vault_root: hvac.Client, unique: str
) -> None:
    """On the real stack: the broker's own policy (written by the stack's bootstrap)
    refuses an unrelated engine's lease in either form and any team secret; a launch with
    a dynamic secret still has its lease revoked when it is killed."""
    other = f"other-{unique}"
    database_mount(vault_root, postgres, other)
    unrelated = vault_root.read(f"{other}/creds/ro")["lease_id"]
    login_role = vault_root.read(f"auth/kubernetes/role/{names.KUBERNETES_AUTH_ROLE}")["data"]
    assert login_role["token_no_default_policy"] is True
    token = vault_root.auth.token.create(
        policies=[names.BROKER_POLICY], ttl="10m", no_default_policy=True
    )["auth"]["client_token"]
    as_broker = hvac.Client(url=broker.vault.url, token=token)
    with pytest.raises(hvac.exceptions.Forbidden):
        as_broker.adapter.put(f"/v1/sys/leases/revoke/{unrelated}")
    with pytest.raises(hvac.exceptions.Forbidden):
        as_broker.sys.revoke_lease(unrelated)
    with pytest.raises(hvac.exceptions.Forbidden):
        as_broker.sys.renew_lease(unrelated, increment=5)
    with pytest.raises(hvac.exceptions.Forbidden):
        as_broker.sys.read_lease(unrelated)
    with pytest.raises(hvac.exceptions.Forbidden):
        as_broker.sys.revoke_prefix(f"{other}/")
    with pytest.raises(hvac.exceptions.Forbidden):
        as_broker.secrets.kv.v2.read_secret_version(
            path="payments/provider-api", mount_point="secret", raise_on_deleted_version=False
        )
    with pytest.raises(hvac.exceptions.Forbidden):
        as_broker.read("database/creds/orders-readonly")
    assert lease_alive(vault_root, unrelated)
    vault_root.sys.revoke_lease(unrelated)

    response = httpx.post(
        f"{broker.url}/v1/launches",
        headers=broker.headers(),
        timeout=30,
        json={
            "task": {
                "dag_id": "analytics_etl_scoped",
                "task_id": "extract_orders",
                "run_id": uuid.uuid4().hex,
            },
            "container": {"image": "python:3.12-slim"},
            "secrets": ["orders-db"],
            "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "300s"}},
        },
    )
    assert response.status_code == 201, response.text
    view = response.json()
    with broker.kube.api_client() as api:
        secret = client.CoreV1Api(api).read_namespaced_secret(
            f"podbroker-{view['launch_id']}", broker.namespace
        )
    (lease_id,) = secret.metadata.annotations["podbroker.dev/lease-ids"].split(",")
    assert lease_alive(vault_root, lease_id)
    # Capped by the broker through the path-form renewal (the grant's max_lease_ttl).
    assert vault_root.sys.read_lease(lease_id)["data"]["ttl"] <= 3600
    killed = httpx.delete(
        f"{broker.url}/v1/launches/{view['launch_id']}", headers=broker.headers(), timeout=30
    )
    assert killed.status_code == 200, killed.text
    assert eventually(lambda: not lease_alive(vault_root, lease_id), timeout=15), (
        "the killed launch's lease survived"
    )
