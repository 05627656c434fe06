"""Where podbroker keeps its things inside Vault, as one value (defaults from names.py).

Tests pass their own layout (unique mount, prefix and role) so they can share one
OpenBao without clashing."""

from __future__ import annotations

from dataclasses import dataclass

from broker.vault import names


@dataclass(frozen=True)
class VaultLayout:
    config_mount: str = names.CONFIG_MOUNT
    """KV v2 mount holding the catalog and grants documents."""
    policy_prefix: str = names.GRANT_POLICY_PREFIX
    """Prefix of the per-grant ACL policies (``apply --prune`` owns every policy with it)."""
    token_role: str = names.TOKEN_ROLE
    """Token role the broker mints child tokens through."""
    broker_policy: str = names.BROKER_POLICY
    """The broker's own ACL policy."""
    catalog_path: str = names.CATALOG_PATH
    grants_path: str = names.GRANTS_PATH

    def kv_data_path(self, path: str) -> str:
        return f"{self.config_mount}/data/{path}"
