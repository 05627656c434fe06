"""Vault's database secrets engine on the real PostgreSQL, for the tests that need
dynamic credentials: mount one, and check a login, a lease or a child token."""

from __future__ import annotations

import hvac
import psycopg
from hvac.exceptions import InvalidRequest

from broker.audit.store import open_audit_store
from broker.core.audit_events import EventKind
from podbroker_devstack.postgres import Postgres


def database_mount(
    root: hvac.Client,
    postgres: Postgres,
    mount: str,
    *,
    role: str = "ro",
    default_ttl: str = "1h",
    max_ttl: str | None = None,
) -> None:
    """A database secrets engine at ``mount`` whose ``role`` issues PostgreSQL logins."""
    root.sys.enable_secrets_engine("database", path=mount)
    root.write_data(
        f"{mount}/config/pg",
        data={
            "plugin_name": "postgresql-database-plugin",
            "allowed_roles": "*",
            "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@{postgres.host}:"
            f"{postgres.port}/postgres",
            "username": postgres.superuser,
            "password": postgres.password,
        },
    )
    ttls = {"default_ttl": default_ttl, **({"max_ttl": max_ttl} if max_ttl else {})}
    root.write_data(
        f"{mount}/roles/{role}",
        data={
            "db_name": "pg",
            "creation_statements": [
                "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
                "VALID UNTIL '{{expiration}}';"
            ],
            **ttls,
        },
    )


def can_login(postgres: Postgres, username: str, password: str) -> bool:
    try:
        with psycopg.connect(
            host=postgres.host,
            port=postgres.port,
            user=username,
            password=password,
            dbname="postgres",
            connect_timeout=5,
        ) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def lease_alive(root: hvac.Client, lease_id: str) -> bool:
    try:
        root.sys.read_lease(lease_id)
    except InvalidRequest:
        return False
    return True


def token_alive(root: hvac.Client, accessor: str) -> bool:
    try:
        root.auth.token.lookup_accessor(accessor)
    except InvalidRequest:
        return False
    return True


def issued_to(audit_url: str, launch_id: str) -> tuple[list[str], str | None]:
    """The lease ids and child token accessor that a broker's audit trail says Vault
    issued to ``launch_id`` (its ``secrets_resolved`` event)."""
    with open_audit_store(audit_url, create=False) as store:
        for event in store.events():
            if event.kind == EventKind.SECRETS_RESOLVED and event.launch_id == launch_id:
                secrets = event.details.get("secrets") or []
                leases = [str(s["lease_id"]) for s in secrets if s.get("lease_id")]
                return leases, event.details.get("token_accessor")
    return [], None
