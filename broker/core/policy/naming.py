"""Names podbroker uses inside Vault: the one definition of each, shared by the policy
model, Vault bootstrap, ``policies apply`` and the broker.

These are defaults: tests and multi-tenant setups pass their own mount, prefix and role
through ``broker.vault.layout.VaultLayout`` and the settings.
"""

from __future__ import annotations

from typing import Final

CONFIG_MOUNT: Final = "podbroker"
"""KV v2 mount holding the catalog and grants documents."""
CATALOG_PATH: Final = "policies/catalog"
"""Single-entry layout (before parts; read when no index exists): ``{"secrets": {...}}``."""
GRANTS_PATH: Final = "policies/grants"
"""Single-entry layout (before parts; read when no index exists): ``{"teams": {...}}``."""
POLICY_INDEX_PATH: Final = "policies/index"
"""KV entry in the config mount naming the parts of the stored policy, written last."""
POLICY_PARTS_PATH: Final = "policies/parts"
"""Folder of the stored policy's parts (catalog slices and team slices, content-named)."""
BROKER_POLICY: Final = "podbroker-broker"
"""The broker's own ACL policy."""
TOKEN_ROLE: Final = "podbroker-launch"
"""Token role the broker mints child tokens through."""
GRANT_POLICY_PREFIX: Final = "podbroker-grant-"
"""Prefix of the per-grant ACL policies (``apply --prune`` owns every policy with it)."""
KUBERNETES_AUTH_ROLE: Final = "podbroker-broker"
"""Role of Vault's Kubernetes auth method that the broker logs in with."""


def grant_full_id(team: str, grant_id: str) -> str:
    """``analytics`` + ``warehouse-etl`` -> ``analytics/warehouse-etl``."""
    return f"{team}/{grant_id}"


def grant_policy_name(full_id: str, prefix: str = GRANT_POLICY_PREFIX) -> str:
    """``analytics/warehouse-etl`` -> ``podbroker-grant-analytics.warehouse-etl`` (team
    and grant ids contain no dots, so the name is unambiguous)."""
    team, _, grant_id = full_id.partition("/")
    return f"{prefix}{team}.{grant_id}"
