"""Helpers for the policy/Vault integration tests: a per-test layout (own config mount,
grant-policy prefix, token role and broker policy) in the shared OpenBao, a KV mount
with planted values, and a broker session holding only the broker policy."""

from __future__ import annotations

from dataclasses import dataclass

import hvac

from broker.core.policy import PolicySet
from broker.vault.bootstrap import BootstrapOptions, await_kv_ready, bootstrap
from broker.vault.client import VaultAuth, VaultSession
from broker.vault.layout import VaultLayout
from broker.vault.policy_store import apply_plan, plan
from podbroker_devstack.openbao import OpenBao


def layout_for(unique: str) -> VaultLayout:
    return VaultLayout(
        config_mount=f"pb-{unique}",
        policy_prefix=f"pb{unique}-grant-",
        token_role=f"pb-launch-{unique}",
        broker_policy=f"pb-broker-{unique}",
    )


@dataclass
class PolicyEnv:
    vault: OpenBao
    root: hvac.Client
    layout: VaultLayout
    kv_mount: str
    broker_token: str

    def session(self, timeout: float = 5.0) -> VaultSession:
        return VaultSession.connect(
            self.vault.url, VaultAuth.token(self.broker_token), timeout=timeout
        )

    def broker_settings(self) -> dict[str, object]:
        """The ``vault`` settings of a broker that runs on this layout with its token."""
        return {
            "auth": {"method": "token", "token": self.broker_token},
            "config_mount": self.layout.config_mount,
            "grant_policy_prefix": self.layout.policy_prefix,
            "token_role": self.layout.token_role,
        }

    def apply(self, policy: PolicySet, *, prune: bool = False) -> None:
        apply_plan(self.root, plan(self.root, self.layout, policy, prune=prune))


def make_env(vault: OpenBao, root: hvac.Client, unique: str) -> PolicyEnv:
    layout = layout_for(unique)
    bootstrap(root, BootstrapOptions(layout=layout))
    kv_mount = f"kv-{unique}"
    root.sys.enable_secrets_engine("kv", path=kv_mount, options={"version": "2"})
    await_kv_ready(root, kv_mount)  # a new KV v2 mount refuses writes for a moment
    token = root.auth.token.create(policies=[layout.broker_policy], ttl="1h")["auth"][
        "client_token"
    ]
    return PolicyEnv(vault, root, layout, kv_mount, token)
