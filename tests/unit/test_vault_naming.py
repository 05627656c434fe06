"""Each name podbroker uses inside Vault is defined once, in broker.core.policy.naming:
no other module of the product spells one of those values out."""

from __future__ import annotations

import ast
from pathlib import Path

from broker.core.policy import naming
from broker.vault import names
from broker.vault.layout import VaultLayout

REPO = Path(__file__).resolve().parents[2]
NAMING_FILE = Path(naming.__file__).resolve()
# "podbroker" is also the product's name (CLI, token audience), so CONFIG_MOUNT's value
# cannot be told apart from other uses; every other value is specific to Vault.
CHECKED = {
    name: value
    for name, value in vars(naming).items()
    if name.isupper() and isinstance(value, str) and name != "CONFIG_MOUNT"
}


def string_literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_naming_values_are_spelled_out_only_in_naming() -> None:
    assert set(CHECKED) >= {"GRANT_POLICY_PREFIX", "TOKEN_ROLE", "BROKER_POLICY", "GRANTS_PATH"}
    offenders = []
    for package in ("broker", "airflow_plugin"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path.resolve() == NAMING_FILE:
                continue
            literals = string_literals(path)
            offenders += [
                f"{path.relative_to(REPO)}: {name}"
                for name, value in CHECKED.items()
                if value in literals
            ]
    assert offenders == []


def test_vault_adapter_uses_the_core_definitions() -> None:
    for name in names.__all__:
        assert getattr(names, name) is getattr(naming, name)
    layout = VaultLayout()
    assert layout.policy_prefix is naming.GRANT_POLICY_PREFIX
    assert layout.config_mount is naming.CONFIG_MOUNT
