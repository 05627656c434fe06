"""``podbroker audit``: verify the chain, report secret usage, export, make keys."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from broker.errors import BrokerError

audit_app = typer.Typer(
    help="Tamper-evident audit trail: verify, report, export, keygen.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

StoreOpt = Annotated[
    str,
    typer.Option(
        "--store",
        envvar="PODBROKER_AUDIT_STORE",
        help="sqlite:///path/audit.db or postgresql+psycopg://...",
    ),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def parse_when(value: str | None, now: datetime | None = None) -> datetime | None:
    """ISO 8601 (naive means UTC) or a relative age: ``7d``, ``12h``, ``30m``."""
    if value is None:
        return None
    now = now or datetime.now(UTC)
    units = {"d": "days", "h": "hours", "m": "minutes", "w": "weeks"}
    if value[-1:] in units and value[:-1].isdigit():
        return now - timedelta(**{units[value[-1]]: int(value[:-1])})
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{value!r}: use ISO 8601 (2026-01-31T00:00Z) or 7d/12h") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@audit_app.command()
def keygen(
    path: Annotated[Path, typer.Argument(help="private key file to write (0600)")],
    overwrite: bool = False,
) -> None:
    """Make an Ed25519 signing key (PATH) and its public key (PATH.pub)."""
    from broker.audit.keys import generate_signing_key, key_id, public_path

    try:
        key = generate_signing_key(path, overwrite=overwrite)
    except BrokerError as exc:
        raise _fail(exc.reason) from None
    typer.echo(
        f"wrote {path} (private, 0600) and {public_path(path)} (public); "
        f"key id {key_id(key.public_key())}"
    )


@audit_app.command()
def verify(
    store: StoreOpt,
    public_key: Annotated[
        list[Path],
        typer.Option("--public-key", help="PEM public (or private) key; repeat for rotated keys"),
    ],
    anchor: Annotated[
        Path | None,
        typer.Option(
            help="file holding the head seen by the last verify (kept outside the store): "
            "fails if the chain was truncated or rolled back since; updated when OK"
        ),
    ] = None,
) -> None:
    """Walk the chain; exit 1 and name the first broken position if it was tampered with."""
    from broker.audit.anchor import Anchor, check_anchor
    from broker.audit.keys import load_public_key
    from broker.audit.store import open_audit_store

    problem: str | None = None
    try:
        keys = [load_public_key(p) for p in public_key]
        previous = Anchor.read(anchor) if anchor is not None else None
        with open_audit_store(store, create=False) as audit:
            result = audit.verify(keys)
            if result.ok and previous is not None:
                problem = check_anchor(audit, result, previous)
    except BrokerError as exc:
        raise _fail(exc.reason) from None
    typer.echo(result.summary())
    if not result.ok:
        raise typer.Exit(1)
    if problem is not None:
        typer.echo(f"audit chain CONTRADICTS the anchor {anchor}: {problem}")
        raise typer.Exit(1)
    if anchor is not None:
        Anchor(result.last_position, result.last_hash).write(anchor)
        typer.echo(f"anchor {anchor} now at position {result.last_position}")


@audit_app.command()
def report(
    store: StoreOpt,
    since: Annotated[str | None, typer.Option(help="window start: ISO 8601 or 7d/12h")] = None,
    until: Annotated[str | None, typer.Option(help="window end (exclusive)")] = None,
    team: str | None = None,
    dag: Annotated[str | None, typer.Option(help="DAG id or glob")] = None,
    task: Annotated[str | None, typer.Option(help="task id or glob")] = None,
    secret: Annotated[str | None, typer.Option(help="secret name or glob")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, json, csv or html")] = "table",
    output: Annotated[Path | None, typer.Option(help="write here instead of stdout")] = None,
    policies: Annotated[
        Path | None,
        typer.Option(help="policy folder: grants listed there but unused are proposed for removal"),
    ] = None,
    policy_url_template: Annotated[
        str | None,
        typer.Option(help="HTML: link unused grants to URL with {team} and {grant} filled in"),
    ] = None,
) -> None:
    """Who used which secret, when, for what; denials; unused grants; first-time uses."""
    from broker.audit.render import FORMATS, render
    from broker.audit.reporting import build_report
    from broker.audit.store import open_audit_store
    from broker.cli.policy_folder import load_policy_dir
    from broker.core.report import ReportFilters, grant_refs_from_policy

    if fmt not in FORMATS:
        raise _fail(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    start, end = parse_when(since), parse_when(until)
    try:
        grants = grant_refs_from_policy(load_policy_dir(policies)) if policies is not None else []
        with open_audit_store(store, create=False) as audit:
            result = build_report(
                audit,
                grants,
                since=start,
                until=end,
                filters=ReportFilters(team=team, dag=dag, task=task, secret=secret),
            )
    except BrokerError as exc:
        raise _fail(exc.reason) from None
    text = render(result, fmt, policy_url_template=policy_url_template)
    if output is None:
        sys.stdout.write(text)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        typer.echo(f"wrote {fmt} report to {output}", err=True)


@audit_app.command()
def export(
    store: StoreOpt,
    from_position: Annotated[
        int | None, typer.Option("--from", help="first position (default: the cursor's, else 1)")
    ] = None,
    cursor: Annotated[
        Path | None,
        typer.Option(help="cursor file: resume after the last exported record, and update it"),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="append JSON lines to this file instead of stdout")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="at most this many records")] = None,
) -> None:
    """Write records as JSON lines (for a SIEM), resumable with --cursor."""
    from broker.audit.export import export_jsonl
    from broker.audit.store import open_audit_store

    try:
        with open_audit_store(store, create=False) as audit:
            if output is None:
                written, nxt = export_jsonl(
                    audit, sys.stdout, start=from_position, cursor=cursor, limit=limit
                )
            else:
                with open(output, "a") as out:
                    written, nxt = export_jsonl(
                        audit, out, start=from_position, cursor=cursor, limit=limit
                    )
    except BrokerError as exc:
        raise _fail(exc.reason) from None
    typer.echo(f"exported {written} records; next position {nxt}", err=True)
