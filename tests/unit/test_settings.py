"""Broker settings: errors name the file, position and field, never quote a value."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import InvalidRequestError
from broker.settings import load_settings


def test_broken_yaml_names_the_position_without_quoting_the_line(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text("vault:\n  auth:\n    token: PLANTED-token: x\n")
    with pytest.raises(InvalidRequestError) as error:
        load_settings(config)
    assert f"{config}:3:" in error.value.reason
    assert "PLANTED" not in error.value.reason
    assert error.value.__cause__ is None


def test_invalid_field_names_the_field_without_its_value(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text("auth:\n  static_tokens:\n    - {name: dev, sha256: PLANTED-not-a-digest}\n")
    with pytest.raises(InvalidRequestError, match=r"auth\.static_tokens\.0\.sha256") as error:
        load_settings(config)
    assert "PLANTED" not in error.value.reason
