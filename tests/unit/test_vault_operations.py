"""The operation label of podbroker_vault_requests_total: a bounded name per Vault path,
so the Vault-load benchmark can tell the steps of a launch apart."""

from __future__ import annotations

import pytest

from broker.vault.client import vault_operation


@pytest.mark.parametrize(
    ("path", "operation"),
    [
        ("/v1/auth/token/create/podbroker-launch", "token_create"),
        ("/v1/auth/token/renew", "token_renew"),
        ("/v1/auth/token/renew-self", "token_renew_self"),
        ("/v1/auth/token/revoke-accessor", "token_revoke"),
        ("/v1/secret/data/team/app?version=2", "kv_read"),
        ("/v1/database/creds/orders-readonly", "creds_read"),
        ("/v1/sys/leases/revoke/database/creds/x/abc", "lease_revoke"),
        ("/v1/sys/leases/renew/database/creds/x/abc", "lease_renew"),
        ("/v1/auth/kubernetes/login", "login"),
        ("/v1/sys/health", "other"),
    ],
)
def test_each_step_of_a_launch_has_its_operation(path: str, operation: str) -> None:
    assert vault_operation(path) == operation
