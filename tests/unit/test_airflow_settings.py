"""The podbroker connection -> BrokerConnectionSettings: URL forms, auth choice, token rotation,
and that the static token never shows in a repr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airflow_plugin.settings import (
    DEFAULT_TOKEN_FILE,
    ConnectionConfigError,
    settings_from_connection,
)


def test_host_with_scheme_and_static_token() -> None:
    s = settings_from_connection(
        host="http://127.0.0.1:8080/", port=None, password="dev-token-123", extra=None
    )
    assert s.base_url == "http://127.0.0.1:8080"
    assert s.auth_method == "static_token"
    assert s.bearer_token() == "dev-token-123"
    assert s.verify is True


def test_host_port_and_extra_from_uri_form() -> None:
    extra = json.dumps({"scheme": "http", "namespace": "jobs", "timeout": "5"})
    s = settings_from_connection(host="broker.local", port=9000, password=None, extra=extra)
    assert s.base_url == "http://broker.local:9000"
    assert s.auth_method == "service_account_token"
    assert s.token_file == DEFAULT_TOKEN_FILE
    assert s.namespace == "jobs"
    assert s.timeout == 5.0


def test_default_scheme_is_https_and_prefixed_extras_are_read(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    extra = {"extra__podbroker__ca_bundle": str(ca), "extra__podbroker__token_file": "/t/tok"}
    s = settings_from_connection(host="broker.svc", port=None, password=None, extra=extra)
    assert s.base_url == "https://broker.svc"
    assert s.verify == str(ca)
    assert s.token_file == Path("/t/tok")


def test_token_file_is_reread_on_every_call(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    s = settings_from_connection(
        host="https://b", port=None, password=None, extra={"token_file": str(token)}
    )
    assert s.bearer_token() == "first"
    token.write_text("rotated")
    assert s.bearer_token() == "rotated"


def test_missing_token_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    s = settings_from_connection(
        host="https://b", port=None, password=None, extra={"token_file": str(missing)}
    )
    with pytest.raises(ConnectionConfigError, match="cannot read the ServiceAccount token file"):
        s.bearer_token()


def test_static_token_never_in_repr() -> None:
    s = settings_from_connection(
        host="https://b", port=None, password="planted-static-Zq81", extra=None
    )
    assert "planted-static-Zq81" not in repr(s)
    assert "planted-static-Zq81" not in str(s)


@pytest.mark.parametrize(
    ("host", "password", "extra", "message"),
    [
        (None, None, None, "needs a host"),
        ("b", None, {"auth_method": "static_token"}, "needs the connection password"),
        ("b", None, {"auth_method": "kerberos"}, "auth_method must be"),
        ("b", None, {"scheme": "ftp"}, "scheme must be http or https"),
        ("b", None, "{not json", "not JSON"),
        ("b", None, {"timeout": "soon"}, "timeout must be a number"),
        ("b", None, {"timeout": 0}, "timeout must be positive"),
    ],
)
def test_bad_connections_are_rejected(
    host: str | None, password: str | None, extra: object, message: str
) -> None:
    with pytest.raises(ConnectionConfigError, match=message):
        settings_from_connection(host=host, port=None, password=password, extra=extra)  # type: ignore[arg-type]
