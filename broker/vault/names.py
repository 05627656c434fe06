"""Names podbroker uses inside Vault: defined once in :mod:`broker.core.policy.naming`,
imported here for the Vault adapter and its callers."""

from broker.core.policy.naming import (
    BROKER_POLICY,
    CATALOG_PATH,
    CONFIG_MOUNT,
    GRANT_POLICY_PREFIX,
    GRANTS_PATH,
    KUBERNETES_AUTH_ROLE,
    POLICY_INDEX_PATH,
    POLICY_PARTS_PATH,
    TOKEN_ROLE,
)

__all__ = [
    "BROKER_POLICY",
    "CATALOG_PATH",
    "CONFIG_MOUNT",
    "GRANTS_PATH",
    "GRANT_POLICY_PREFIX",
    "KUBERNETES_AUTH_ROLE",
    "POLICY_INDEX_PATH",
    "POLICY_PARTS_PATH",
    "TOKEN_ROLE",
]
