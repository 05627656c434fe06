"""The broker's Vault session on the real OpenBao: token and AppRole login, renewal of
its own token near expiry, and a fresh login when renewal is impossible. (Kubernetes
login is in test_vault_bootstrap.py, against the real kube-apiserver.)"""

from __future__ import annotations

import logging
import threading

import hvac
import pytest

from broker.errors import VaultUnavailableError
from broker.vault.bootstrap import BootstrapOptions, bootstrap
from broker.vault.client import VaultAuth, VaultSession
from podbroker_devstack.openbao import OpenBao
from tests.integration.vault_policy_env import layout_for

pytestmark = pytest.mark.stack


def accessor(session: VaultSession) -> str:
    return str(session.hvac_client.auth.token.lookup_self()["data"]["accessor"])


def force_near_expiry(session: VaultSession) -> None:
    """Pretend most of the TTL has passed (no sleeping in tests)."""
    session._state.expires_at = 0.0  # monotonic time 0 is long past


def test_token_login_and_renewal(vault: OpenBao, vault_root: hvac.Client, unique: str) -> None:
    layout = layout_for(unique)
    bootstrap(vault_root, BootstrapOptions(layout=layout))
    token = vault_root.auth.token.create(policies=[layout.broker_policy], ttl="10m", renewable=True)
    session = VaultSession.connect(vault.url, VaultAuth.token(token["auth"]["client_token"]))
    session.ping()
    assert session.token_ttl_remaining is not None and session.token_ttl_remaining > 500
    before = vault_root.auth.token.lookup_accessor(token["auth"]["accessor"])["data"]
    assert before.get("last_renewal_time") in (None, 0)

    force_near_expiry(session)
    threads = [threading.Thread(target=session.ping) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = vault_root.auth.token.lookup_accessor(token["auth"]["accessor"])["data"]
    assert after["last_renewal_time"]  # renew-self happened
    assert session.token_ttl_remaining is not None and session.token_ttl_remaining > 500
    assert "hvs." not in repr(session) and token["auth"]["client_token"] not in repr(session)


def test_root_token_never_needs_renewal(vault: OpenBao) -> None:
    session = VaultSession.connect(vault.url, VaultAuth.token(vault.root_token))
    assert session.token_ttl_remaining is None
    session.ensure_token()
    session.ping()


def test_invalid_token_is_refused_without_echoing_it(vault: OpenBao) -> None:
    with pytest.raises(VaultUnavailableError) as caught:
        VaultSession.connect(vault.url, VaultAuth.token("s.PLANTED-not-a-token"))
    assert "PLANTED" not in str(caught.value)


def test_approle_login_renewal_and_relogin(
    vault: OpenBao, vault_root: hvac.Client, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    layout = layout_for(unique)
    bootstrap(vault_root, BootstrapOptions(layout=layout))
    mount = f"approle-{unique}"
    vault_root.sys.enable_auth_method("approle", path=mount)
    vault_root.write_data(
        f"auth/{mount}/role/broker",
        data={"token_policies": [layout.broker_policy], "token_ttl": "5m", "token_max_ttl": "1h"},
    )
    role_id = vault_root.read(f"auth/{mount}/role/broker/role-id")["data"]["role_id"]
    secret_id = vault_root.write_data(f"auth/{mount}/role/broker/secret-id")["data"]["secret_id"]

    session = VaultSession.connect(vault.url, VaultAuth.approle(role_id, secret_id, mount=mount))
    first = accessor(session)
    info = session.hvac_client.auth.token.lookup_self()["data"]
    assert layout.broker_policy in info["policies"]

    force_near_expiry(session)
    session.ping()
    assert accessor(session) == first  # renewed in place
    assert vault_root.auth.token.lookup_accessor(first)["data"]["last_renewal_time"]

    # The token is revoked behind the broker's back: renewal fails, it logs in again.
    vault_root.auth.token.revoke_accessor(first)
    force_near_expiry(session)
    session.ping()
    assert accessor(session) != first
    assert secret_id not in caplog.text and secret_id not in repr(session.auth)

    with pytest.raises(VaultUnavailableError, match="approle login"):
        VaultSession.connect(vault.url, VaultAuth.approle(role_id, "wrong-secret-id", mount=mount))
