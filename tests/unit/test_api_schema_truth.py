"""The launch request's JSON schema (what /openapi.json publishes) and its model agree:
a body one refuses, the other refuses too (schemathesis found these disagreements on
the real broker: valid per the schema, refused with 422)."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from broker.core.api_models import LaunchRequest

SCHEMA = LaunchRequest.model_json_schema()


def body(**parts: Any) -> dict[str, Any]:
    return {
        "task": {"dag_id": "d", "task_id": "t", "run_id": "r"},
        "container": {"image": "python:3.12-slim"},
        **parts,
    }


def secret(**delivery: Any) -> dict[str, Any]:
    return body(secrets=[{"name": "db", "delivery": delivery}])


def volume(**sources: Any) -> dict[str, Any]:
    return body(volumes=[{"name": "v", **sources}])


def schema_accepts(value: dict[str, Any]) -> bool:
    return jsonschema.Draft202012Validator(SCHEMA).is_valid(value)


def model_accepts(value: dict[str, Any]) -> bool:
    try:
        LaunchRequest.model_validate(value)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (secret(prefix="DB_"), True),
        (secret(prefix=""), True),
        (secret(prefix="1DB"), False),  # no variable starts with a digit
        (secret(prefix="DB-"), False),
        (secret(prefix="ÅB"), False),
        (secret(mapping={"password": "PW"}), True),
        (secret(prefix="DB_", mapping={"password": "PW"}), False),  # one style only
        (secret(prefix=None, mapping={"password": "PW"}), True),
        (secret(type="file", mount_path="/run/secrets/db"), True),
        (secret(type="file", mount_path="/run/.db/..x/.../"), True),
        (secret(type="file", mount_path="/run/../etc"), False),
        (secret(type="file", mount_path="/.."), False),
        (volume(empty_dir={}), True),
        (volume(empty_dir={}, config_map=None), True),
        (volume(), False),  # a volume of nothing
        (volume(empty_dir=None), False),
        (volume(empty_dir={}, config_map={"name": "c"}), False),  # two sources
    ],
)
def test_schema_and_model_agree(value: dict[str, Any], valid: bool) -> None:
    assert (schema_accepts(value), model_accepts(value)) == (valid, valid)
