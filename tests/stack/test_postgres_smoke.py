"""PostgreSQL is a real server: create a role, then log in as it."""

from __future__ import annotations

import psycopg
import pytest

from podbroker_devstack.postgres import Postgres


def test_create_role_and_log_in_as_it(postgres: Postgres, unique: str) -> None:
    role, password = f"smoke_{unique}", f"pw{unique}"
    with psycopg.connect(postgres.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    dsn = f"host={postgres.host} port={postgres.port} user={role} dbname=postgres"
    with psycopg.connect(f"{dsn} password={password}") as conn:
        row = conn.execute("SELECT current_user").fetchone()
    assert row == (role,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(f"{dsn} password=wrong-{password}")
