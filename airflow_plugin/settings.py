"""How the Airflow side reaches the broker, read explicitly from an Airflow connection of
type ``podbroker``. Pure: no Airflow import, so it is testable with plain values."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

CONN_TYPE = "podbroker"
DEFAULT_CONN_ID = "podbroker_default"
# Where the Helm chart projects the worker's ServiceAccount token (audience: podbroker).
DEFAULT_TOKEN_FILE = Path("/var/run/secrets/podbroker/token")
DEFAULT_TIMEOUT = 30.0

EXTRA_AUTH_METHOD = "auth_method"
EXTRA_TOKEN_FILE = "token_file"
EXTRA_CA_BUNDLE = "ca_bundle"
EXTRA_NAMESPACE = "namespace"
EXTRA_TIMEOUT = "timeout"
EXTRA_SCHEME = "scheme"

AuthMethod = Literal["service_account_token", "static_token"]


class ConnectionConfigError(ValueError):
    """The ``podbroker`` connection is incomplete or contradictory."""


@dataclass(frozen=True)
class BrokerConnectionSettings:
    """Everything the HTTP client needs. ``static_token`` is repr-masked: it must never
    reach a log line."""

    base_url: str
    """Broker root URL, e.g. ``https://podbroker.podbroker.svc:8443``."""
    auth_method: AuthMethod
    """``service_account_token`` (in cluster) or ``static_token`` (development)."""
    token_file: Path
    """Projected ServiceAccount token, re-read on every request (kubelet rotates it)."""
    static_token: str | None
    """The connection password when ``auth_method`` is ``static_token``."""
    verify: str | bool
    """CA bundle path, or True for the system trust store."""
    namespace: str | None
    """Default pod namespace when the operator names none."""
    timeout: float
    """Seconds for connect/read of non-streaming calls."""

    def __repr__(self) -> str:
        token = "***" if self.static_token else None
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, "
            f"auth_method={self.auth_method!r}, "
            f"token_file={str(self.token_file)!r}, static_token={token!r}, "
            f"verify={self.verify!r}, namespace={self.namespace!r}, timeout={self.timeout!r})"
        )

    __str__ = __repr__

    def bearer_token(self) -> str:
        """The token for ``Authorization: Bearer``; reads the token file each time."""
        if self.auth_method == "static_token":
            if not self.static_token:
                raise ConnectionConfigError(
                    "auth_method static_token needs the connection password"
                )
            return self.static_token
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise ConnectionConfigError(
                f"cannot read the ServiceAccount token file {self.token_file}: {exc.strerror}"
            ) from exc
        if not token:
            raise ConnectionConfigError(f"the ServiceAccount token file {self.token_file} is empty")
        return token


def _extra_field(extra: Mapping[str, Any], name: str) -> Any:
    """Plain key first, then the ``extra__podbroker__`` form older UIs wrote."""
    value = extra.get(name)
    if value in (None, ""):
        value = extra.get(f"extra__{CONN_TYPE}__{name}")
    return None if value == "" else value


def settings_from_connection(
    *,
    host: str | None,
    port: int | None,
    password: str | None,
    extra: str | Mapping[str, Any] | None,
) -> BrokerConnectionSettings:
    """Build settings from a connection's fields. ``host`` may carry the scheme
    (``http://127.0.0.1:8080``); otherwise extra ``scheme`` (default https) is used."""
    if isinstance(extra, str):
        try:
            extra_map: Mapping[str, Any] = json.loads(extra) if extra.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConnectionConfigError(f"connection extra is not JSON: {exc.msg}") from exc
    else:
        extra_map = extra or {}
    if not isinstance(extra_map, Mapping):
        raise ConnectionConfigError("connection extra must be a JSON object")
    if not host:
        raise ConnectionConfigError("the podbroker connection needs a host (the broker URL)")
    if "://" in host:
        base_url = host.rstrip("/")
    else:
        scheme = _extra_field(extra_map, EXTRA_SCHEME) or "https"
        if scheme not in ("http", "https"):
            raise ConnectionConfigError(f"scheme must be http or https, not {scheme!r}")
        base_url = f"{scheme}://{host.rstrip('/')}"
    if port:
        base_url = f"{base_url}:{port}"

    method = _extra_field(extra_map, EXTRA_AUTH_METHOD)
    if method is None:
        method = "static_token" if password else "service_account_token"
    if method not in ("service_account_token", "static_token"):
        raise ConnectionConfigError(
            f"auth_method must be service_account_token or static_token, not {method!r}"
        )
    if method == "static_token" and not password:
        raise ConnectionConfigError("auth_method static_token needs the connection password")

    timeout_raw = _extra_field(extra_map, EXTRA_TIMEOUT)
    try:
        timeout = float(timeout_raw) if timeout_raw is not None else DEFAULT_TIMEOUT
    except (TypeError, ValueError) as exc:
        raise ConnectionConfigError(f"timeout must be a number, not {timeout_raw!r}") from exc
    if timeout <= 0:
        raise ConnectionConfigError("timeout must be positive")

    ca_bundle = _extra_field(extra_map, EXTRA_CA_BUNDLE)
    token_file = _extra_field(extra_map, EXTRA_TOKEN_FILE)
    return BrokerConnectionSettings(
        base_url=base_url,
        auth_method=method,
        token_file=Path(token_file) if token_file else DEFAULT_TOKEN_FILE,
        static_token=password if method == "static_token" else None,
        verify=str(ca_bundle) if ca_bundle else True,
        namespace=_extra_field(extra_map, EXTRA_NAMESPACE),
        timeout=timeout,
    )
