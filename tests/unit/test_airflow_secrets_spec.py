"""``secrets=`` parsing: names, dicts, helper objects; bad input fails at parse time."""

from __future__ import annotations

import pytest

from airflow_plugin.secrets import env_secret, file_secret, parse_secrets
from broker.core.models import EnvDelivery, FileDelivery, SecretRequest


def test_names_dicts_and_helpers() -> None:
    parsed = parse_secrets(
        [
            "warehouse-loader",
            {"name": "s3-reports", "delivery": {"type": "env", "prefix": "S3_"}},
            env_secret("orders-db", mapping={"username": "PGUSER", "password": "PGPASSWORD"}),
            file_secret("tableau-token", mount_path="/var/run/secrets/tableau"),
        ]
    )
    assert [p.name for p in parsed] == [
        "warehouse-loader",
        "s3-reports",
        "orders-db",
        "tableau-token",
    ]
    assert parsed[0].delivery == EnvDelivery()
    assert parsed[1].delivery == EnvDelivery(prefix="S3_")
    assert parsed[2].delivery == EnvDelivery(
        mapping={"username": "PGUSER", "password": "PGPASSWORD"}
    )
    assert parsed[3].delivery == FileDelivery(mount_path="/var/run/secrets/tableau")
    assert parse_secrets(None) == ()
    assert parse_secrets([SecretRequest(name="x1")])[0].name == "x1"


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ("warehouse-loader", "must be a list"),
        (["Bad Name"], r"secrets\[0\] is invalid: name"),
        (
            ["ok", {"name": "x", "delivery": {"type": "file", "mount_path": "/a/../b"}}],
            r"secrets\[1\]",
        ),
        ([{"name": "x", "delivery": {"type": "env", "prefix": "1X"}}], "secrets\\[0\\]"),
        (["a1", "a1"], "named more than once: a1"),
        ([42], "expected a name"),
    ],
)
def test_bad_specs_name_the_entry(specs: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_secrets(specs)  # type: ignore[arg-type]
