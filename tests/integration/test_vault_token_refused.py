"""The broker's own Vault token refused (revoked behind its back): a retryable 503 and a
fresh login, never a 403 that would fail every task for good."""

from __future__ import annotations

import time

import hvac
import pytest

from broker.errors import VaultUnavailableError
from broker.vault.bootstrap import BootstrapOptions, bootstrap
from broker.vault.client import VaultAuth, VaultSession
from broker.vault.layout import VaultLayout
from podbroker_devstack.openbao import OpenBao


def test_revoked_approle_token_logs_in_again(
    vault: OpenBao, vault_root: hvac.Client, unique: str
) -> None:
    mount = f"approle-{unique}"
    vault_root.sys.enable_auth_method("approle", path=mount)
    vault_root.auth.approle.create_or_update_approle(
        role_name="broker", token_policies=["default"], token_ttl="10m", mount_point=mount
    )
    role_id = vault_root.auth.approle.read_role_id("broker", mount_point=mount)["data"]["role_id"]
    secret_id = vault_root.auth.approle.generate_secret_id("broker", mount_point=mount)["data"][
        "secret_id"
    ]
    session = VaultSession.connect(vault.url, VaultAuth.approle(role_id, secret_id, mount=mount))
    first = session.hvac_client.token
    vault_root.auth.token.revoke(first)

    session.ping()  # refused once, logged in again, then answered
    assert session.hvac_client.token != first


def test_revoked_static_token_is_a_retryable_unavailability(
    vault: OpenBao,
    vault_root: hvac.Client,
) -> None:
    token = vault_root.auth.token.create(policies=["default"], ttl="10m")["auth"]["client_token"]
    session = VaultSession.connect(vault.url, VaultAuth.token(token))
    vault_root.auth.token.revoke(token)
    with pytest.raises(VaultUnavailableError) as refused:
        session.ping()
    assert refused.value.retryable is True
    assert refused.value.http_status == 503
    assert token not in str(refused.value)


def test_child_tokens_outlive_the_broker_login_that_minted_them(
    vault: OpenBao,
    vault_root: hvac.Client,
    unique: str,
) -> None:
    """A broker restart or re-login replaces its own token; the child tokens (and the
    dynamic leases under them) of running tasks must not be revoked with it."""
    layout = VaultLayout(
        config_mount=f"pb{unique}",
        policy_prefix=f"pb{unique}-grant-",
        token_role=f"pb{unique}-launch",
        broker_policy=f"pb{unique}-broker",
    )
    bootstrap(vault_root, BootstrapOptions(layout=layout))
    broker_token = vault_root.auth.token.create(
        policies=[layout.broker_policy], ttl="3s", renewable=False
    )["auth"]["client_token"]
    broker = hvac.Client(url=vault.url, token=broker_token)
    child = broker.auth.token.create(
        role_name=layout.token_role, ttl="60s", policies=[f"{layout.policy_prefix}x"]
    )["auth"]
    time.sleep(5)  # the broker's own token has expired by now
    with pytest.raises(hvac.exceptions.Forbidden):
        broker.auth.token.lookup_self()
    alive = vault_root.auth.token.lookup_accessor(child["accessor"])["data"]
    assert alive["orphan"] is True
    assert alive["ttl"] > 0
