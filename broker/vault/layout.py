"""Where podbroker keeps its things inside Vault, as one value (defaults from
:mod:`broker.core.policy.naming`).

Tests pass their own layout (unique mount, prefix and role) so they can share one
OpenBao without clashing."""

from __future__ import annotations

from dataclasses import dataclass

from broker.core.policy import naming


@dataclass(frozen=True)
class VaultLayout:
    config_mount: str = naming.CONFIG_MOUNT
    """KV v2 mount holding the stored policy (index and parts)."""
    policy_prefix: str = naming.GRANT_POLICY_PREFIX
    """Prefix of the per-grant ACL policies (``apply --prune`` owns every policy with it)."""
    token_role: str = naming.TOKEN_ROLE
    """Token role the broker mints child tokens through."""
    broker_policy: str = naming.BROKER_POLICY
    """The broker's own ACL policy."""
    catalog_path: str = naming.CATALOG_PATH
    """Single-entry layout's catalog document (read only when no index exists)."""
    grants_path: str = naming.GRANTS_PATH
    """Single-entry layout's grants document (read only when no index exists)."""
    index_path: str = naming.POLICY_INDEX_PATH
    """The index of the stored policy's parts (written last by ``policies apply``)."""
    parts_path: str = naming.POLICY_PARTS_PATH
    """Folder of the parts the index names."""

    def part_path(self, name: str) -> str:
        return f"{self.parts_path}/{name}"

    def kv_data_path(self, path: str) -> str:
        return f"{self.config_mount}/data/{path}"
