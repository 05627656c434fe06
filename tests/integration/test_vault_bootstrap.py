"""`podbroker vault bootstrap` on the real OpenBao (and kube-apiserver for the Kubernetes
auth method): idempotent, least-privilege broker policy, token role limits."""

from __future__ import annotations

from pathlib import Path

import hvac
import pytest
from kubernetes import client
from typer.testing import CliRunner

from broker.cli.main import app
from broker.errors import ConflictError, VaultUnavailableError
from broker.vault.bootstrap import BootstrapOptions, bootstrap
from broker.vault.client import VaultAuth, VaultSession
from podbroker_devstack.kube import ControlPlane
from podbroker_devstack.openbao import OpenBao
from tests.integration.vault_policy_env import layout_for

pytestmark = pytest.mark.stack


def capabilities(vault: OpenBao, token: str, path: str) -> list[str]:
    response = hvac.Client(url=vault.url, token=token).write_data(
        "sys/capabilities-self", data={"paths": [path]}
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
    assert role["orphan"] is True and role["renewable"] is False
    assert role["token_explicit_max_ttl"] == 7200 and role["token_no_default_policy"] is True

    broker = vault_root.auth.token.create(policies=[layout.broker_policy], ttl="10m")
    token = broker["auth"]["client_token"]
    config = f"{layout.config_mount}/data/{layout.grants_path}"
    assert capabilities(vault, token, config) == ["read"]
    assert capabilities(vault, token, f"{layout.config_mount}/data/other") == ["deny"]
    assert capabilities(vault, token, "secret/data/payments/provider-api") == ["deny"]
    assert capabilities(vault, token, "database/creds/orders-readonly") == ["deny"]
    assert capabilities(vault, token, f"auth/token/create/{layout.token_role}") == ["update"]
    assert capabilities(vault, token, "auth/token/create") == ["deny"]
    assert capabilities(vault, token, "sys/leases/revoke") == ["update"]
    assert capabilities(vault, token, f"sys/policies/acl/{layout.broker_policy}") == ["deny"]

    # A drifted role is put back.
    vault_root.write_data(f"auth/token/roles/{layout.token_role}", data={"orphan": False})
    assert bootstrap(vault_root, options) == [f"wrote token role {layout.token_role}"]


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
    assert layout.broker_policy in info["policies"]
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
