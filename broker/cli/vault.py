"""`podbroker vault ...`: prepare Vault for the broker (operator token required).

Exit codes: 0 ok, 2 usage, 3 Vault unreachable/refused/conflicting. Tokens are never
printed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from broker.errors import BrokerError
from broker.vault import names
from broker.vault.bootstrap import (
    DEFAULT_CHILD_TOKEN_MAX_USES,
    DEFAULT_DYNAMIC_MOUNTS,
    BootstrapOptions,
    KubernetesAuthOptions,
    bootstrap,
)
from broker.vault.client import VaultAuth, VaultSession
from broker.vault.layout import VaultLayout

app = typer.Typer(name="vault", help="Prepare Vault/OpenBao for podbroker.", no_args_is_help=True)

EXIT_VAULT = 3

VaultAddr = Annotated[
    str, typer.Option("--vault-addr", envvar="VAULT_ADDR", help="Vault URL (or VAULT_ADDR).")
]
VaultToken = Annotated[
    str,
    typer.Option(
        "--vault-token",
        envvar="VAULT_TOKEN",
        help="Operator token (or VAULT_TOKEN); never printed.",
        show_default=False,
    ),
]
VaultCa = Annotated[
    str | None,
    typer.Option("--vault-ca-file", envvar="VAULT_CACERT", help="CA bundle for Vault's TLS."),
]
ConfigMount = Annotated[
    str, typer.Option("--config-mount", help="KV v2 mount for the podbroker policy.")
]
PolicyPrefix = Annotated[
    str, typer.Option("--policy-prefix", help="Name prefix of per-grant ACL policies.")
]


def connect(addr: str, token: str, ca_file: str | None) -> VaultSession:
    """Token login for operator commands; failures exit with code 3."""
    if not addr or not token:
        typer.echo("error: give --vault-addr/--vault-token or VAULT_ADDR/VAULT_TOKEN", err=True)
        raise typer.Exit(2)
    try:
        return VaultSession.connect(addr, VaultAuth.token(token), ca_file=ca_file)
    except BrokerError as exc:
        fail(exc)


def fail(exc: BrokerError) -> NoReturn:
    typer.echo(f"error: {exc.reason}", err=True)
    raise typer.Exit(EXIT_VAULT)


@app.command("bootstrap")
def bootstrap_command(
    vault_addr: VaultAddr = "",
    vault_token: VaultToken = "",
    vault_ca_file: VaultCa = None,
    config_mount: ConfigMount = names.CONFIG_MOUNT,
    policy_prefix: PolicyPrefix = names.GRANT_POLICY_PREFIX,
    token_role: Annotated[str, typer.Option(help="Token role for child tokens.")] = (
        names.TOKEN_ROLE
    ),
    broker_policy: Annotated[str, typer.Option(help="The broker's ACL policy name.")] = (
        names.BROKER_POLICY
    ),
    child_token_max_ttl: Annotated[
        int, typer.Option(min=60, help="Child token max TTL (s); bounds dynamic leases.")
    ] = 8 * 3600,
    child_token_max_uses: Annotated[
        int,
        typer.Option(
            min=2, help="Child token use cap (role token_num_uses); bounds secrets per launch."
        ),
    ] = DEFAULT_CHILD_TOKEN_MAX_USES,
    child_token_bound_cidr: Annotated[
        list[str] | None,
        typer.Option(help="Network child tokens may be used from (repeat); default anywhere."),
    ] = None,
    dynamic_mount: Annotated[
        list[str] | None,
        typer.Option(
            help="Dynamic secrets engine mount whose leases the broker may renew/revoke "
            "(repeat; default: database). Mounts of the stored catalog are added."
        ),
    ] = None,
    kubernetes_host: Annotated[
        str | None,
        typer.Option(help="Configure the kubernetes auth method with this API server URL."),
    ] = None,
    kubernetes_ca_file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="API server CA (PEM).")
    ] = None,
    token_reviewer_jwt_file: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="JWT Vault uses for TokenReview."),
    ] = None,
    kubernetes_mount: Annotated[str, typer.Option(help="Kubernetes auth mount.")] = "kubernetes",
    service_account: Annotated[
        str | None, typer.Option(help="Broker ServiceAccount allowed to log in.")
    ] = None,
    namespace: Annotated[str | None, typer.Option(help="Namespace of that ServiceAccount.")] = None,
    audience: Annotated[str | None, typer.Option(help="Required token audience.")] = None,
) -> None:
    """Idempotently create the config mount, the broker policy, the token role and, when
    asked, the Kubernetes auth method/role. An existing policy or role is upgraded in
    place and each change is printed; a second run reports no changes."""
    k8s: KubernetesAuthOptions | None = None
    if (service_account is None) != (namespace is None):
        typer.echo("error: --service-account and --namespace go together", err=True)
        raise typer.Exit(2)
    if kubernetes_host is not None and service_account is None:
        typer.echo("error: --kubernetes-host needs --service-account/--namespace", err=True)
        raise typer.Exit(2)
    if service_account is not None and namespace is not None:
        k8s = KubernetesAuthOptions(
            service_account=service_account,
            namespace=namespace,
            audience=audience,
            mount=kubernetes_mount,
            configure_method=kubernetes_host is not None,
            kubernetes_host=kubernetes_host,
            kubernetes_ca_pem=kubernetes_ca_file.read_text() if kubernetes_ca_file else None,
            token_reviewer_jwt=(
                token_reviewer_jwt_file.read_text().strip() if token_reviewer_jwt_file else None
            ),
        )
    options = BootstrapOptions(
        layout=VaultLayout(
            config_mount=config_mount,
            policy_prefix=policy_prefix,
            token_role=token_role,
            broker_policy=broker_policy,
        ),
        child_token_max_ttl=child_token_max_ttl,
        child_token_max_uses=child_token_max_uses,
        child_token_bound_cidrs=tuple(child_token_bound_cidr or ()),
        dynamic_mounts=tuple(dynamic_mount or DEFAULT_DYNAMIC_MOUNTS),
        kubernetes=k8s,
    )
    session = connect(vault_addr, vault_token, vault_ca_file)
    try:
        changes = bootstrap(session.hvac_client, options)
    except BrokerError as exc:
        fail(exc)
    for change in changes:
        typer.echo(f"changed: {change}")
    if not changes:
        typer.echo("Vault already bootstrapped: no changes")
