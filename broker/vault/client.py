"""The broker's Vault session: login (token, AppRole, Kubernetes), token renewal, and the
one place hvac/requests exceptions become :mod:`broker.errors`.

Every Vault call the broker makes goes through :meth:`VaultSession.call` (or
:func:`translate_errors`), so timeouts are bounded and nothing from hvac leaks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import hvac
import hvac.exceptions
import requests
import requests.adapters

from broker.core.secret_value import SecretValue
from broker.errors import (
    BrokerError,
    DeniedError,
    InvalidRequestError,
    NotFoundError,
    VaultUnavailableError,
)
from broker.metrics import VAULT_REQUESTS

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"

# (path part, operation) in the order they are tried: the metric's label values.
_OPERATIONS: tuple[tuple[str, str], ...] = (
    ("/v1/auth/token/create", "token_create"),
    ("/v1/auth/token/revoke-accessor", "token_revoke"),
    ("/v1/auth/token/renew-self", "token_renew_self"),
    ("/v1/auth/token/lookup-self", "token_lookup_self"),
    ("/v1/auth/token/renew", "token_renew"),  # a recorded child token extended to its TTL
    ("/v1/sys/leases/renew", "lease_renew"),
    ("/v1/sys/leases/revoke", "lease_revoke"),
    ("/login", "login"),
    ("/data/", "kv_read"),
    ("/creds/", "creds_read"),
)


def vault_operation(path: str) -> str:
    """The operation a Vault request path stands for (a bounded label, never the path)."""
    for part, operation in _OPERATIONS:
        if part in path:
            return operation
    return "other"


def _count_request(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    """requests response hook: one count per HTTP request sent to Vault."""
    VAULT_REQUESTS.labels(vault_operation(response.request.path_url or "")).inc()


@dataclass(frozen=True)
class VaultAuth:
    """How the broker logs in. Build with :meth:`token`, :meth:`approle` or
    :meth:`kubernetes`; credentials are held as :class:`SecretValue` (masked repr)."""

    method: Literal["token", "approle", "kubernetes"]
    token_value: SecretValue | None = None
    role_id: str | None = None
    secret_id: SecretValue | None = None
    role: str | None = None
    jwt_path: Path | None = None
    mount: str = ""

    @classmethod
    def token(cls, token: str) -> VaultAuth:
        """A ready token (dev, or injected by an agent)."""
        return cls(method="token", token_value=SecretValue(token))

    @classmethod
    def approle(cls, role_id: str, secret_id: str, mount: str = "approle") -> VaultAuth:
        """``POST auth/{mount}/login`` with role_id and secret_id."""
        return cls(method="approle", role_id=role_id, secret_id=SecretValue(secret_id), mount=mount)

    @classmethod
    def kubernetes(
        cls,
        role: str,
        jwt_path: Path | str = DEFAULT_SERVICE_ACCOUNT_TOKEN,
        mount: str = "kubernetes",
    ) -> VaultAuth:
        """``POST auth/{mount}/login`` with the ServiceAccount token read from
        ``jwt_path`` at each login (projected tokens rotate)."""
        return cls(method="kubernetes", role=role, jwt_path=Path(jwt_path), mount=mount)


def _status(exc: hvac.exceptions.VaultError) -> str:
    return str(getattr(exc, "status_code", None) or "?")


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Map hvac/requests exceptions raised while doing ``what`` (e.g. ``"read secret
    orders-db"``) to broker errors. Vault's own error strings name paths and causes,
    never secret values."""
    try:
        yield
    except BrokerError:
        raise
    except hvac.exceptions.Forbidden as exc:
        raise DeniedError(f"Vault refused to {what}: permission denied") from exc
    except hvac.exceptions.InvalidPath as exc:
        raise NotFoundError(f"Vault has nothing to {what} (404)") from exc
    except hvac.exceptions.Unauthorized as exc:
        raise VaultUnavailableError(
            f"Vault rejected the broker's credentials while trying to {what}"
        ) from exc
    except hvac.exceptions.VaultDown as exc:
        raise VaultUnavailableError(f"Vault is sealed or in maintenance ({what})") from exc
    except hvac.exceptions.RateLimitExceeded as exc:
        raise VaultUnavailableError(f"Vault rate limit while trying to {what}") from exc
    except (
        hvac.exceptions.InternalServerError,
        hvac.exceptions.BadGateway,
        hvac.exceptions.UnexpectedError,
    ) as exc:
        # Vault's error text can quote rendered statements (a database plugin's, with the
        # generated password): it stays in Vault's own audit log, not in ours.
        raise VaultUnavailableError(f"Vault failed to {what} (HTTP {_status(exc)})") from exc
    except hvac.exceptions.InvalidRequest as exc:
        raise InvalidRequestError(f"Vault refused to {what} as invalid (HTTP 400)") from exc
    except hvac.exceptions.VaultError as exc:
        raise VaultUnavailableError(f"Vault error while trying to {what}") from exc
    except requests.Timeout as exc:
        raise VaultUnavailableError(f"Vault did not answer in time ({what})") from exc
    except requests.RequestException as exc:
        raise VaultUnavailableError(f"Vault is unreachable ({what})") from exc


@dataclass
class _TokenState:
    expires_at: float | None = None  # monotonic; None: no expiry (root/periodic-less)
    ttl: int = 0
    renewable: bool = False


VAULT_CONNECTIONS = 64


@dataclass
class VaultSession:
    """A logged-in connection to Vault. Thread-safe: token renewal and re-login happen
    under a lock, and :meth:`call` renews when less than a third of the TTL is left."""

    url: str
    auth: VaultAuth
    ca_file: str | None = None
    timeout: float = 5.0
    renew_fraction: float = 1 / 3
    _client: hvac.Client = field(init=False, repr=False)
    _http: requests.Session = field(default_factory=requests.Session, init=False, repr=False)
    _state: _TokenState = field(default_factory=_TokenState, init=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._http.hooks["response"].append(_count_request)
        # requests keeps 10 connections per host; a burst's concurrent reads past that
        # opened (TLS) connections only to throw them away.
        pooled = requests.adapters.HTTPAdapter(pool_maxsize=VAULT_CONNECTIONS)
        self._http.mount("https://", pooled)
        self._http.mount("http://", pooled)

    @classmethod
    def connect(
        cls, url: str, auth: VaultAuth, ca_file: str | None = None, timeout: float = 5.0
    ) -> VaultSession:
        """Log in (``auth/token/lookup-self`` for a token, ``auth/{mount}/login`` for
        AppRole/Kubernetes). Raises :class:`VaultUnavailableError` when Vault is down,
        sealed, slow, or refuses the credentials."""
        session = cls(url=url.rstrip("/"), auth=auth, ca_file=ca_file, timeout=timeout)
        session._client = session.new_client()
        session.login()
        return session

    def new_client(self, token: str | None = None) -> hvac.Client:
        """A bare hvac client for this server with the same TLS and timeout (used for
        child tokens too). All clients share one HTTP connection pool, so a launch's
        reads reuse open (TLS) connections; the token travels per request, not in the
        pool, and the pool is closed only with the session."""
        verify: bool | str = self.ca_file if self.ca_file else True
        # hvac takes TLS trust from a given session over its own argument: set it there.
        self._http.verify = verify
        return hvac.Client(
            url=self.url, token=token, verify=verify, timeout=self.timeout, session=self._http
        )

    @property
    def hvac_client(self) -> hvac.Client:
        """The underlying client (adapter-internal: only broker.vault uses it)."""
        return self._client

    def login(self) -> None:
        """Obtain a fresh token with the configured method and record its TTL. A refused
        login is the broker's own misconfiguration, not the caller's fault: it raises
        :class:`VaultUnavailableError` (retryable), never Denied/InvalidRequest."""
        try:
            self._login()
        except (DeniedError, InvalidRequestError, NotFoundError) as exc:
            raise VaultUnavailableError(
                f"Vault refused the broker's {self.auth.method} login: {exc.reason}"
            ) from exc

    def _login(self) -> None:
        with self._lock, translate_errors(f"log in ({self.auth.method})"):
            auth = self.auth
            if auth.method == "token":
                assert auth.token_value is not None
                self._client.token = auth.token_value.reveal()
            elif auth.method == "approle":
                assert auth.role_id is not None and auth.secret_id is not None
                self._client.auth.approle.login(
                    role_id=auth.role_id, secret_id=auth.secret_id.reveal(), mount_point=auth.mount
                )
            else:
                assert auth.role is not None and auth.jwt_path is not None
                try:
                    jwt = auth.jwt_path.read_text().strip()
                except OSError as exc:
                    raise VaultUnavailableError(
                        f"cannot read the ServiceAccount token at {auth.jwt_path}"
                    ) from exc
                self._client.auth.kubernetes.login(role=auth.role, jwt=jwt, mount_point=auth.mount)
            self._refresh_state()
        log.info(
            "logged in to Vault at %s with %s (ttl %ss)", self.url, auth.method, self._state.ttl
        )

    def _refresh_state(self) -> None:
        data = self._client.auth.token.lookup_self()["data"]
        ttl = int(data.get("ttl") or 0)
        self._state = _TokenState(
            expires_at=time.monotonic() + ttl if ttl > 0 else None,
            ttl=ttl,
            renewable=bool(data.get("renewable")),
        )

    @property
    def token_ttl_remaining(self) -> float | None:
        """Seconds left on the broker's token (``None``: it does not expire)."""
        expires = self._state.expires_at
        return None if expires is None else max(0.0, expires - time.monotonic())

    def ensure_token(self) -> None:
        """Renew (``auth/token/renew-self``) when the token is near expiry; log in again
        when it cannot be renewed and the method allows it."""
        remaining = self.token_ttl_remaining
        if remaining is None or remaining > self._state.ttl * self.renew_fraction:
            return
        with self._lock:
            remaining = self.token_ttl_remaining
            if remaining is None or remaining > self._state.ttl * self.renew_fraction:
                return  # another thread renewed meanwhile
            self.renew()

    def renew(self) -> None:
        """Renew now, or re-login if renewal is impossible (AppRole/Kubernetes)."""
        with self._lock:
            if self._state.renewable:
                try:
                    with translate_errors("renew the broker token"):
                        self._client.auth.token.renew_self()
                        self._refresh_state()
                    log.info("renewed the broker's Vault token (ttl %ss)", self._state.ttl)
                    return
                except BrokerError:
                    if self.auth.method == "token":
                        raise
                    log.warning("token renewal failed; logging in again")
            if self.auth.method != "token":
                self.login()

    def call(self, what: str, fn: Callable[[hvac.Client], T]) -> T:
        """Run ``fn(client)`` with the broker's token, renewing first when needed, with
        errors translated (``what`` names the operation for messages).

        A 403 on the broker's OWN token is not a policy denial of the caller: the token
        was revoked or expired early (rotation, restore). Log in again once and retry;
        if Vault still refuses, it is the broker that is unavailable (retryable 503),
        never a 403 that would fail tasks for good."""
        self.ensure_token()
        try:
            with translate_errors(what):
                return fn(self._client)
        except (DeniedError, VaultUnavailableError) as first:
            if not isinstance(
                first.__cause__, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized
            ):
                raise
            log.warning(
                "Vault refused the broker's token while trying to %s; logging in again", what
            )
        try:
            with self._lock:
                self.login()
            with translate_errors(what):
                return fn(self._client)
        except DeniedError as exc:
            raise VaultUnavailableError(
                f"Vault refuses the broker's own token while trying to {what}: check the "
                "broker's Vault login and policy"
            ) from exc

    def ping(self) -> None:
        """``auth/token/lookup-self``: Vault reachable, unsealed, and our token valid."""
        self.call("check the broker token", lambda c: c.auth.token.lookup_self())

    def read(self, path: str, what: str) -> dict[str, Any] | None:
        """GET ``path`` with the broker token; ``None`` when Vault has nothing there."""
        result: Any = self.call(what, lambda c: c.read(path))
        return result if isinstance(result, dict) else None
