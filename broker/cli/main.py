"""The `podbroker` command. Each area adds its own sub-app here with one add_typer line."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="podbroker",
    help="Secrets-brokering pod launcher for Airflow on Kubernetes with Vault/OpenBao.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secret values
)

# Sub-apps (one line each, keep sorted):
from broker.cli.audit import audit_app  # noqa: E402

app.add_typer(audit_app, name="audit")

from broker.cli.server import gc, serve  # noqa: E402

app.command()(serve)
app.command()(gc)

from broker.cli.policies import app as policies_app  # noqa: E402

app.add_typer(policies_app, name="policies")
from broker.cli.check_dags import register as register_check_dags  # noqa: E402

register_check_dags(policies_app)

from broker.cli.vault import app as vault_app  # noqa: E402

app.add_typer(vault_app, name="vault")
