"""OpenBao is a real server: KV v2 round trip and a narrow policy enforced by Vault."""

from __future__ import annotations

import hvac
import pytest
from hvac.exceptions import Forbidden

from podbroker_devstack.openbao import OpenBao


def test_kv_v2_write_then_read(vault_root: hvac.Client, unique: str) -> None:
    vault_root.secrets.kv.v2.create_or_update_secret(
        path=f"smoke/{unique}", secret={"password": f"pw-{unique}"}, mount_point="secret"
    )
    read = vault_root.secrets.kv.v2.read_secret_version(
        path=f"smoke/{unique}", mount_point="secret", raise_on_deleted_version=True
    )
    assert read["data"]["data"] == {"password": f"pw-{unique}"}
    assert read["data"]["metadata"]["version"] == 1


def test_child_token_under_narrow_policy_is_denied_outside_it(
    vault: OpenBao,
    vault_root: hvac.Client,
    unique: str,
) -> None:
    for name in ("allowed", "other"):
        vault_root.secrets.kv.v2.create_or_update_secret(
            path=f"smoke/{unique}/{name}", secret={"k": name}, mount_point="secret"
        )
    vault_root.sys.create_or_update_policy(
        name=f"smoke-{unique}",
        policy=f'path "secret/data/smoke/{unique}/allowed" {{ capabilities = ["read"] }}',
    )
    child = vault_root.auth.token.create(policies=[f"smoke-{unique}"], ttl="60s")
    narrow = hvac.Client(url=vault.url, token=child["auth"]["client_token"])

    allowed = narrow.secrets.kv.v2.read_secret_version(
        path=f"smoke/{unique}/allowed", mount_point="secret", raise_on_deleted_version=True
    )
    assert allowed["data"]["data"] == {"k": "allowed"}
    with pytest.raises(Forbidden):
        narrow.secrets.kv.v2.read_secret_version(
            path=f"smoke/{unique}/other", mount_point="secret", raise_on_deleted_version=True
        )
