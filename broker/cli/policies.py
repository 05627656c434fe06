"""`podbroker policies lint|plan|apply|export|propose`: need-to-know policies as code.

Exit codes: 0 ok, 1 policy-file errors, 2 usage, 3 Vault unreachable/refused/conflict.
Tokens are never printed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from broker.cli.policy_edits import propose, removals_from_report
from broker.cli.policy_folder import (
    lint_policy_dir,
    load_policy_dir,
    policy_files,
    write_policy_dir,
)
from broker.cli.vault import (
    ConfigMount,
    PolicyPrefix,
    VaultAddr,
    VaultCa,
    VaultToken,
    connect,
    fail,
)
from broker.core.policy import PolicyFileError
from broker.core.report import UsageReport
from broker.errors import BrokerError
from broker.vault import names
from broker.vault.client import VaultSession
from broker.vault.layout import VaultLayout
from broker.vault.policy_store import PolicyPlan, apply_plan, export_policy, plan

app = typer.Typer(
    name="policies",
    help="Lint, plan, apply and export need-to-know policies.",
    no_args_is_help=True,
)

PolicyDir = Annotated[
    Path,
    typer.Argument(
        exists=True, file_okay=False, dir_okay=True, help="Folder of policy YAML files."
    ),
]
Prune = Annotated[bool, typer.Option("--prune", help="Remove what the files no longer define.")]


@app.command("lint")
def lint_command(folder: PolicyDir) -> None:
    """Schema errors, unknown secret names, duplicates, over-broad grants (errors);
    unused catalog secrets and similar (warnings)."""
    issues = lint_policy_dir(folder)
    errors = [i for i in issues if i.severity == "error"]
    for issue in issues:
        typer.echo(f"{issue.severity}: {issue}")
    typer.echo(f"{len(errors)} error(s), {len(issues) - len(errors)} warning(s)")
    if errors:
        raise typer.Exit(1)


def _plan(
    folder: Path,
    prune: bool,
    addr: str,
    token: str,
    ca_file: str | None,
    mount: str,
    prefix: str,
) -> tuple[PolicyPlan, VaultSession]:
    try:
        files = load_policy_dir(folder)
    except PolicyFileError as exc:
        for issue in exc.issues:
            typer.echo(f"error: {issue}", err=True)
        raise typer.Exit(1) from exc
    session = connect(addr, token, ca_file)
    layout = VaultLayout(config_mount=mount, policy_prefix=prefix)
    try:
        return plan(session.hvac_client, layout, files, prune=prune), session
    except BrokerError as exc:
        fail(exc)


def _print_plan(result: PolicyPlan) -> None:
    for change in result.changes:
        typer.echo(str(change))
    if result.empty:
        typer.echo("no changes: Vault matches the files")


@app.command("plan")
def plan_command(
    folder: PolicyDir,
    prune: Prune = False,
    vault_addr: VaultAddr = "",
    vault_token: VaultToken = "",
    vault_ca_file: VaultCa = None,
    config_mount: ConfigMount = names.CONFIG_MOUNT,
    policy_prefix: PolicyPrefix = names.GRANT_POLICY_PREFIX,
) -> None:
    """Show what `apply` would change in Vault (+ add, ~ change, - remove, = kept)."""
    result, _ = _plan(
        folder, prune, vault_addr, vault_token, vault_ca_file, config_mount, policy_prefix
    )
    _print_plan(result)


@app.command("apply")
def apply_command(
    folder: PolicyDir,
    prune: Prune = False,
    vault_addr: VaultAddr = "",
    vault_token: VaultToken = "",
    vault_ca_file: VaultCa = None,
    config_mount: ConfigMount = names.CONFIG_MOUNT,
    policy_prefix: PolicyPrefix = names.GRANT_POLICY_PREFIX,
) -> None:
    """Make Vault match the files (idempotent; refuses when lint finds errors)."""
    result, session = _plan(
        folder, prune, vault_addr, vault_token, vault_ca_file, config_mount, policy_prefix
    )
    _print_plan(result)
    if result.empty:
        return
    try:
        apply_plan(session.hvac_client, result)
    except BrokerError as exc:
        fail(exc)
    typer.echo("applied")


@app.command("export")
def export_command(
    folder: Annotated[Path, typer.Argument(file_okay=False, help="Folder to write into.")],
    vault_addr: VaultAddr = "",
    vault_token: VaultToken = "",
    vault_ca_file: VaultCa = None,
    config_mount: ConfigMount = names.CONFIG_MOUNT,
    policy_prefix: PolicyPrefix = names.GRANT_POLICY_PREFIX,
) -> None:
    """Write Vault's current policy back as files (catalog.yaml, teams/<team>.yaml)."""
    session = connect(vault_addr, vault_token, vault_ca_file)
    layout = VaultLayout(config_mount=config_mount, policy_prefix=policy_prefix)
    try:
        policy = export_policy(session.hvac_client, layout)
    except BrokerError as exc:
        fail(exc)
    for path in write_policy_dir(policy, folder):
        typer.echo(f"wrote {path}")


@app.command("propose")
def propose_command(
    folder: PolicyDir,
    from_report: Annotated[
        Path,
        typer.Option(
            "--from-report",
            exists=True,
            dir_okay=False,
            help="A JSON report (podbroker audit report --format json).",
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the diff; write nothing.")
    ] = False,
) -> None:
    """Write the report's proposed removals (grants, or secrets of grants, unused in its
    window) into the policy files, keeping comments and layout, and print the unified
    diff. Review it, then `podbroker policies plan --prune` shows the same removals."""
    try:
        report = UsageReport.model_validate_json(from_report.read_bytes())
    except ValueError as exc:
        typer.echo(f"error: {from_report} is not a JSON usage report: {exc}", err=True)
        raise typer.Exit(2) from None
    removals = removals_from_report(report.unused_grants)
    if not removals:
        typer.echo("no proposed removals in the report")
        return
    result = propose(policy_files(folder), removals)
    for edit in result.edits:
        typer.echo(edit.diff(folder), nl=False)
    for missing in result.not_found:
        typer.echo(f"warning: {missing}: no such grant in {folder}", err=True)
    if not dry_run:
        for edit in result.edits:
            edit.path.write_text(edit.after, encoding="utf-8")
    applied = sum(len(e.applied) for e in result.edits)
    verb = "would apply" if dry_run else "applied"
    typer.echo(
        f"{verb} {applied} of {len(removals)} proposed removal(s) in {len(result.edits)} file(s) "
        f"(report window {report.window_start or '-'} .. {report.window_end or '-'})",
        err=True,
    )
