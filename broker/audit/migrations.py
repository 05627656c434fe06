"""Versioned schema of the audit store (SQLite and PostgreSQL), applied in order.

A small table ``audit_schema`` holds the versions applied. Migrations run in one
transaction under a lock (PostgreSQL advisory lock, SQLite ``BEGIN IMMEDIATE``), so two
replicas starting together apply each exactly once. A database newer than this code is
refused rather than written to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from sqlalchemy import Connection, text

from broker.audit.chain import GENESIS_HASH

# An arbitrary constant naming podbroker's migration lock among advisory locks.
_PG_LOCK_KEY: Final = 0x706F6462  # "podb"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1(conn: Connection) -> None:
    big = "BIGINT" if conn.dialect.name == "postgresql" else "INTEGER"
    conn.execute(
        text(f"""
        CREATE TABLE audit_records (
            position {big} PRIMARY KEY,
            time VARCHAR(32) NOT NULL,
            kind VARCHAR(64) NOT NULL,
            launch_id VARCHAR(255),
            dag_id VARCHAR(255),
            event_json TEXT NOT NULL,
            prev_hash CHAR(64) NOT NULL,
            hash CHAR(64) NOT NULL,
            signature VARCHAR(128) NOT NULL,
            key_id VARCHAR(32) NOT NULL
        )""")
    )
    conn.execute(text("CREATE INDEX ix_audit_records_time ON audit_records (time)"))
    conn.execute(text("CREATE INDEX ix_audit_records_launch ON audit_records (launch_id)"))
    conn.execute(text("CREATE INDEX ix_audit_records_dag ON audit_records (dag_id)"))
    conn.execute(
        text(f"""
        CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY,
            position {big} NOT NULL,
            hash CHAR(64) NOT NULL,
            signature VARCHAR(128) NOT NULL,
            key_id VARCHAR(32) NOT NULL
        )""")
    )
    conn.execute(
        text(
            "INSERT INTO audit_head (id, position, hash, signature, key_id) "
            "VALUES (1, 0, :genesis, '', '')"
        ),
        {"genesis": GENESIS_HASH},
    )


def _v2(conn: Connection) -> None:
    conn.execute(
        text("""
        CREATE TABLE launch_holdings (
            launch_id VARCHAR(64) PRIMARY KEY,
            namespace VARCHAR(255) NOT NULL,
            lease_ids TEXT NOT NULL,
            token_accessor VARCHAR(128),
            created_at VARCHAR(40) NOT NULL,
            released_at VARCHAR(40)
        )""")
    )
    conn.execute(
        text("CREATE INDEX ix_launch_holdings_open ON launch_holdings (released_at, created_at)")
    )


def _v3(conn: Connection) -> None:
    # Times are epoch milliseconds: compared in SQL (due, claimed) by every replica.
    big = "BIGINT" if conn.dialect.name == "postgresql" else "INTEGER"
    conn.execute(
        text(f"""
        CREATE TABLE launch_leases (
            lease_id VARCHAR(512) PRIMARY KEY,
            launch_id VARCHAR(64) NOT NULL,
            secret_name VARCHAR(255) NOT NULL,
            grant_id VARCHAR(255) NOT NULL,
            ttl_seconds INTEGER NOT NULL,
            cap_at {big} NOT NULL,
            expires_at {big} NOT NULL,
            next_renewal_at {big},
            renewing_until {big},
            renewals INTEGER NOT NULL DEFAULT 0
        )""")
    )
    conn.execute(text("CREATE INDEX ix_launch_leases_due ON launch_leases (next_renewal_at)"))
    conn.execute(text("CREATE INDEX ix_launch_leases_launch ON launch_leases (launch_id)"))


def task_expressions(dialect: str) -> tuple[str, str, str, str]:
    """SQL for an event's (run_id, task_id, map_index, try_number), read from its stored
    JSON: the ``ix_audit_records_task`` index is built on the first three, and a query
    uses it only when it spells them exactly so. ``map_index`` is -1 when absent."""
    if dialect == "postgresql":
        field = "((event_json::json) ->> '{}')"
        return (
            field.format("run_id"),
            field.format("task_id"),
            f"COALESCE(({field.format('map_index')})::integer, -1)",
            f"(({field.format('try_number')})::integer)",
        )
    field = "json_extract(event_json, '$.{}')"
    return (
        field.format("run_id"),
        field.format("task_id"),
        f"COALESCE({field.format('map_index')}, -1)",
        field.format("try_number"),
    )


def _v4(conn: Connection) -> None:
    # An expression index, not new columns: rows appended by replicas still running the
    # previous version during a rolling upgrade are indexed too. Building it reads every
    # stored event once (no statement timeout for it).
    if conn.dialect.name == "postgresql":
        conn.execute(text("SET LOCAL statement_timeout = 0"))
    run, task, map_index, _ = task_expressions(conn.dialect.name)
    conn.execute(
        text(
            f"CREATE INDEX ix_audit_records_task ON audit_records "
            f"(dag_id, ({run}), ({task}), ({map_index}), position)"
        )
    )


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "audit_records, audit_head", _v1),
    Migration(2, "launch_holdings: what each launch holds in Vault", _v2),
    Migration(3, "launch_leases: renewal state of each dynamic lease", _v3),
    Migration(4, "ix_audit_records_task: the events of one task instance", _v4),
)
LATEST: Final = MIGRATIONS[-1].version


class SchemaError(Exception):
    """The database schema is missing, or newer than this code."""


def _has_table(conn: Connection, name: str) -> bool:
    if conn.dialect.name == "postgresql":
        found = conn.execute(text("SELECT to_regclass(:n)"), {"n": name}).scalar()
        return found is not None
    found = conn.execute(
        text("SELECT name FROM sqlite_master WHERE type='table' AND name=:n"), {"n": name}
    ).scalar()
    return found is not None


def current_version(conn: Connection) -> int:
    if not _has_table(conn, "audit_schema"):
        return 0
    return int(
        conn.execute(text("SELECT COALESCE(MAX(version), 0) FROM audit_schema")).scalar() or 0
    )


def check_version(conn: Connection) -> int:
    version = current_version(conn)
    if version > LATEST:
        raise SchemaError(
            f"audit schema version {version} is newer than this podbroker "
            f"(knows up to {LATEST}); upgrade podbroker"
        )
    return version


def migrate(conn: Connection) -> list[int]:
    """Apply pending migrations inside the caller's (locked) transaction; return them."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    if not _has_table(conn, "audit_schema"):
        conn.execute(
            text(
                "CREATE TABLE audit_schema (version INTEGER PRIMARY KEY, "
                "description VARCHAR(200) NOT NULL, applied_at VARCHAR(32) NOT NULL)"
            )
        )
    version = check_version(conn)
    applied = []
    for migration in MIGRATIONS:
        if migration.version <= version:
            continue
        migration.apply(conn)
        conn.execute(
            text("INSERT INTO audit_schema (version, description, applied_at) VALUES (:v, :d, :t)"),
            {
                "v": migration.version,
                "d": migration.description,
                "t": datetime.now(UTC).isoformat(),
            },
        )
        applied.append(migration.version)
    return applied
