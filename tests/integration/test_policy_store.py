"""`podbroker policies plan|apply|export` against the real OpenBao: readable plan,
idempotent apply, --prune, export round trip, refusal on lint errors, tokens never shown."""

from __future__ import annotations

import shutil
from pathlib import Path

import hvac
import pytest
from typer.testing import CliRunner, Result

from broker.cli.main import app
from broker.cli.policy_folder import load_policy_dir
from broker.core.policy import grant_acl_hcl
from broker.vault.bootstrap import BootstrapOptions, bootstrap
from podbroker_devstack.openbao import OpenBao
from tests.integration.vault_policy_env import layout_for

pytestmark = pytest.mark.stack

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"


class Cli:
    def __init__(self, vault: OpenBao, unique: str) -> None:
        self.layout = layout_for(unique)
        self.env = {"VAULT_ADDR": vault.url, "VAULT_TOKEN": vault.root_token}
        self.token = vault.root_token

    def __call__(self, *args: str) -> Result:
        scope = [
            "--config-mount",
            self.layout.config_mount,
            "--policy-prefix",
            self.layout.policy_prefix,
        ]
        result = CliRunner().invoke(app, ["policies", *args, *scope], env=self.env)
        assert self.token not in result.output
        return result


@pytest.fixture
def cli(vault: OpenBao, vault_root: hvac.Client, unique: str) -> Cli:
    c = Cli(vault, unique)
    bootstrap(vault_root, BootstrapOptions(layout=c.layout))
    return c


def kv_version(root: hvac.Client, mount: str, path: str) -> int:
    meta = root.secrets.kv.v2.read_secret_metadata(path, mount_point=mount)
    return int(meta["data"]["current_version"])


def test_plan_apply_idempotent_prune_and_export(
    cli: Cli, vault_root: hvac.Client, tmp_path: Path
) -> None:
    files = tmp_path / "policies"
    shutil.copytree(EXAMPLES, files)
    prefix = cli.layout.policy_prefix

    planned = cli("plan", str(files))
    assert planned.exit_code == 0, planned.output
    assert "+ secret orders-db: database database/creds/orders-readonly" in planned.output
    assert "+ grant analytics/warehouse-etl: dags=analytics_etl_*" in planned.output
    assert f"+ vault-policy {prefix}analytics.warehouse-etl" in planned.output
    assert not any(p.startswith(prefix) for p in vault_root.sys.list_acl_policies()["data"]["keys"])

    applied = cli("apply", str(files))
    assert applied.exit_code == 0, applied.output
    policies = {
        p for p in vault_root.sys.list_acl_policies()["data"]["keys"] if p.startswith(prefix)
    }
    assert len(policies) == 12
    loaded = load_policy_dir(files).with_prefix(prefix)
    etl = dict(loaded.grants())["analytics/warehouse-etl"]
    stored = vault_root.sys.read_acl_policy(f"{prefix}analytics.warehouse-etl")["data"]["policy"]
    assert stored == grant_acl_hcl(loaded, "analytics/warehouse-etl", etl)
    assert 'path "secret/data/analytics/warehouse-loader"' in stored

    version = kv_version(vault_root, cli.layout.config_mount, cli.layout.index_path)
    again = cli("apply", str(files))
    assert again.exit_code == 0 and "no changes" in again.output
    assert version == kv_version(vault_root, cli.layout.config_mount, cli.layout.index_path)

    # Drop a grant and change a secret: without --prune the grant is kept.
    team = files / "teams" / "ml-platform.yaml"
    text = team.read_text()
    team.write_text(
        text[: text.index("  - id: batch-scoring")] + text[text.index("  - id: alerts") :]
    )
    catalog = files / "catalog.yaml"
    catalog.write_text(
        catalog.read_text().replace("path: ml/model-registry", "path: ml/registry-v2")
    )
    kept = cli("plan", str(files))
    assert "~ secret model-registry: path: 'ml/model-registry' -> 'ml/registry-v2'" in kept.output
    assert "= grant ml-platform/batch-scoring (kept" in kept.output
    assert f"~ vault-policy {prefix}ml-platform.model-publish" in kept.output
    assert cli("apply", str(files)).exit_code == 0
    assert (
        f"{prefix}ml-platform.batch-scoring" in vault_root.sys.list_acl_policies()["data"]["keys"]
    )

    pruned = cli("apply", "--prune", str(files))
    assert pruned.exit_code == 0, pruned.output
    assert "- grant ml-platform/batch-scoring" in pruned.output
    assert f"- vault-policy {prefix}ml-platform.batch-scoring" in pruned.output
    names = vault_root.sys.list_acl_policies()["data"]["keys"]
    assert f"{prefix}ml-platform.batch-scoring" not in names
    assert "no changes" in cli("plan", "--prune", str(files)).output

    exported = cli("export", str(tmp_path / "exported"))
    assert exported.exit_code == 0, exported.output
    assert load_policy_dir(tmp_path / "exported") == load_policy_dir(files)


def test_apply_refuses_invalid_files_and_changes_nothing(
    cli: Cli, vault_root: hvac.Client, tmp_path: Path
) -> None:
    files = tmp_path / "policies"
    shutil.copytree(EXAMPLES, files)
    team = files / "teams" / "payments.yaml"
    team.write_text(team.read_text().replace("[payments-api]", "[payments-api, no-such-secret]"))
    result = cli("apply", str(files))
    assert result.exit_code == 1
    assert f"{team}:" in result.output and "no-such-secret" in result.output
    prefix = cli.layout.policy_prefix
    assert not any(p.startswith(prefix) for p in vault_root.sys.list_acl_policies()["data"]["keys"])
    with pytest.raises(hvac.exceptions.InvalidPath):
        vault_root.secrets.kv.v2.read_secret_version(
            cli.layout.index_path,
            mount_point=cli.layout.config_mount,
            raise_on_deleted_version=True,
        )


def test_vault_errors_and_missing_credentials(vault: OpenBao, unique: str) -> None:
    runner = CliRunner()
    no_token = runner.invoke(
        app, ["policies", "plan", str(EXAMPLES)], env={"VAULT_ADDR": vault.url, "VAULT_TOKEN": ""}
    )
    assert no_token.exit_code == 2
    bad = runner.invoke(
        app,
        ["policies", "plan", str(EXAMPLES), "--config-mount", f"nothing-{unique}"],
        env={"VAULT_ADDR": vault.url, "VAULT_TOKEN": vault.root_token},
    )
    assert bad.exit_code == 3
    assert "vault bootstrap" in bad.output
    wrong_token = runner.invoke(
        app,
        ["policies", "plan", str(EXAMPLES)],
        env={"VAULT_ADDR": vault.url, "VAULT_TOKEN": "not-a-token-PLANTED"},
    )
    assert wrong_token.exit_code == 3
    assert "not-a-token-PLANTED" not in wrong_token.output
