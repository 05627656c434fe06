"""Names podbroker uses inside Vault, shared by bootstrap, policy apply and the broker."""

from __future__ import annotations

from typing import Final

CONFIG_MOUNT: Final = "podbroker"  # KV v2 mount holding the catalog and grants
CATALOG_PATH: Final = "policies/catalog"  # one KV entry: {"secrets": {...}}
GRANTS_PATH: Final = "policies/grants"  # one KV entry: {"teams": {...}}
BROKER_POLICY: Final = "podbroker-broker"  # the broker's own ACL policy
TOKEN_ROLE: Final = "podbroker-launch"  # token role the broker mints child tokens through
GRANT_POLICY_PREFIX: Final = "podbroker-grant-"  # one ACL policy per grant
KUBERNETES_AUTH_ROLE: Final = "podbroker-broker"
