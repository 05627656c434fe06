"""One error tree for the whole broker. Adapters translate hvac, kubernetes and
SQLAlchemy exceptions into these (``raise ... from exc``) and nothing else leaks.

Permanent errors mean "do not retry, the request itself is wrong or forbidden";
temporary ones mean "a dependency is down, retry later"; misconfiguration means "the
broker's operator must fix the broker" (not retryable for the caller either). Messages
never carry secret values: they name secrets, paths and components only.

The wire form of each leaf (HTTP status and the API's ``error`` code) lives in one table,
``WIRE``: the API writes it (:func:`status_for`, :func:`error_code`), the Airflow client
reads it back (:func:`error_for_status`) and the Kubernetes adapter maps the API server's
answers with :func:`error_for_api_server_status`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final


class BrokerError(Exception):
    """Root of every error the broker raises on purpose. Raise a leaf, never this: the
    leaf tells the caller what to do."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def http_status(self) -> int:
        return status_for(self)

    @property
    def retryable(self) -> bool:
        return isinstance(self, TemporaryError)


class PermanentError(BrokerError):
    """Retrying the same request will fail the same way."""


class InvalidRequestError(PermanentError):
    """The request or a policy file is malformed: fix it, do not retry (HTTP 422)."""


class ContentTooLargeError(InvalidRequestError):
    """The request body, or an object made from it, is too large: send less (HTTP 413)."""


class UnsupportedMediaTypeError(InvalidRequestError):
    """A request body must be ``application/json`` (HTTP 415)."""


class AuthenticationError(PermanentError):
    """The caller could not be authenticated: present a valid token (HTTP 401)."""


class DeniedError(PermanentError):
    """Need-to-know policy (or Vault itself) refused; ``denied`` names the secrets. Ask
    for a grant instead of retrying (HTTP 403)."""

    def __init__(self, reason: str, denied: Sequence[str] = ()) -> None:
        super().__init__(reason)
        self.denied = list(denied)


class NotFoundError(PermanentError):
    """An unknown secret name, launch id or missing Vault path/key (HTTP 404)."""


class ConflictError(PermanentError):
    """The request clashes with existing state: look at that state first (HTTP 409)."""


class MisconfiguredError(PermanentError):
    """The broker itself is set up wrong. Retrying does not help the caller; the broker's
    operator has to fix the broker (HTTP 500)."""


class ConfigurationError(MisconfiguredError):
    """The broker's settings are incomplete or inconsistent: fix the settings file (or
    its referenced files) and restart the broker."""


class ForbiddenByClusterError(MisconfiguredError):
    """The Kubernetes API server refused the broker itself (401/403): check the broker's
    RBAC (or the namespace's quota / admission rules named in the reason)."""


class TemporaryError(BrokerError):
    """A dependency is unavailable; safe to retry after ``retry_after`` seconds (HTTP 503)."""

    def __init__(self, reason: str, *, component: str, retry_after: int = 5) -> None:
        super().__init__(reason)
        self.component = component
        self.retry_after = retry_after


class VaultUnavailableError(TemporaryError):
    """Vault (OpenBao) did not answer or is sealed: retry later."""

    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason, component="vault", retry_after=retry_after)


class KubernetesUnavailableError(TemporaryError):
    """The Kubernetes API server did not answer (or answered 5xx/429): retry later."""

    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason, component="kubernetes", retry_after=retry_after)


class BrokerUnavailableError(TemporaryError):
    """Seen by the broker's clients: the broker did not answer, or failed unexpectedly
    (5xx, 429): retry later."""

    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason, component="broker", retry_after=retry_after)


class AuditUnavailableError(TemporaryError):
    """The audit store is unreachable; nothing is launched unaudited: retry later."""

    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason, component="audit", retry_after=retry_after)


class AirflowUnavailableError(TemporaryError):
    """Airflow's API could not confirm the task instance a launch names: retry later."""

    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason, component="airflow", retry_after=retry_after)


# Each error class's HTTP status and ``ErrorBody.error`` code. A class not listed takes
# its nearest listed base's; BrokerError itself (an unexpected failure) is 500 "internal".
WIRE: Final[Mapping[type[BrokerError], tuple[int, str]]] = {
    BrokerError: (500, "internal"),
    AuthenticationError: (401, "unauthenticated"),
    DeniedError: (403, "denied"),
    NotFoundError: (404, "not_found"),
    ConflictError: (409, "conflict"),
    InvalidRequestError: (422, "invalid_request"),
    ContentTooLargeError: (413, "too_large"),
    UnsupportedMediaTypeError: (415, "unsupported_media_type"),
    ConfigurationError: (500, "misconfigured"),
    ForbiddenByClusterError: (500, "forbidden_by_cluster"),
    TemporaryError: (503, "unavailable"),
}
# An unexpected failure ("internal") reads back as temporary: the broker may recover.
_BY_CODE: Final = {
    code: (kind, status) for kind, (status, code) in WIRE.items() if kind is not BrokerError
}
_BY_STATUS: Final = {status: kind for kind, (status, _) in WIRE.items() if status < 500}
# A 503 names the component that is down; these get their own leaf back.
_UnavailableLeaf = (
    type[VaultUnavailableError]
    | type[KubernetesUnavailableError]
    | type[AuditUnavailableError]
    | type[BrokerUnavailableError]
    | type[AirflowUnavailableError]
)
_UNAVAILABLE_BY_COMPONENT: Final[Mapping[str, _UnavailableLeaf]] = {
    "vault": VaultUnavailableError,
    "kubernetes": KubernetesUnavailableError,
    "audit": AuditUnavailableError,
    "broker": BrokerUnavailableError,
    "airflow": AirflowUnavailableError,
}


def _wire(exc: BrokerError) -> tuple[int, str]:
    for kind in type(exc).__mro__:
        if kind in WIRE:
            return WIRE[kind]
    raise AssertionError("unreachable: BrokerError is in WIRE")  # pragma: no cover


def status_for(exc: BrokerError) -> int:
    """The HTTP status the API answers ``exc`` with."""
    return _wire(exc)[0]


def error_code(exc: BrokerError) -> str:
    """The machine-readable ``error`` code of the API's ErrorBody for ``exc``."""
    return _wire(exc)[1]


def error_for_status(
    status: int,
    reason: str,
    *,
    code: str | None = None,
    denied: Sequence[str] = (),
    component: str | None = None,
    retry_after: int = 5,
) -> BrokerError:
    """The error an HTTP answer of the broker's API stands for (the inverse of
    :func:`status_for` / :func:`error_code`; never raises). ``code`` (the body's
    ``error``) tells apart the 500s; without a known one, 400 counts as invalid, 429 and
    other 5xx as temporarily unavailable (``component`` defaults to "broker"), and any
    other status as an invalid request."""
    kind = _kind_for(status, code)
    if issubclass(kind, TemporaryError):
        leaf = _UNAVAILABLE_BY_COMPONENT.get(component or "broker")
        if leaf is not None:
            return leaf(reason, retry_after=retry_after)
        return TemporaryError(reason, component=component or "broker", retry_after=retry_after)
    if issubclass(kind, DeniedError):
        return DeniedError(reason, denied)
    return kind(reason)


def _kind_for(status: int, code: str | None) -> type[BrokerError]:
    if code in _BY_CODE and _BY_CODE[code][1] == status:
        return _BY_CODE[code][0]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500 or status == 429:
        return TemporaryError
    return InvalidRequestError  # 400 and anything unexpected


def error_for_api_server_status(
    status: int, reason: str, *, forbidden_hint: str = "check the broker's RBAC"
) -> BrokerError:
    """The error a failed Kubernetes API server call stands for (never raises). 401/403
    refuse the broker itself (its RBAC, or an admission rule such as a quota: say which
    in ``forbidden_hint``); 400/404/409/422 and 413 (too large: it never fits) are the
    request's fault; anything else means the API server is unavailable."""
    if status in (401, 403):
        return ForbiddenByClusterError(f"{reason}: forbidden by the API server ({forbidden_hint})")
    if status in (400, 404, 409, 413, 422):
        return error_for_status(status, reason)
    return KubernetesUnavailableError(reason)
