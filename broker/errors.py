"""One error tree for the whole broker. Adapters translate hvac, kubernetes and
SQLAlchemy exceptions into these (``raise ... from exc``) and nothing else leaks.

Permanent errors mean "do not retry, the request itself is wrong or forbidden";
temporary ones mean "a dependency is down, retry later". Messages never carry secret
values: they name secrets, paths and components only."""

from __future__ import annotations

from collections.abc import Sequence


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""

    http_status = 500
    retryable = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PermanentError(BrokerError):
    """Retrying the same request will fail the same way."""


class InvalidRequestError(PermanentError):
    """The request or a policy file is malformed (HTTP 422)."""

    http_status = 422


class AuthenticationError(PermanentError):
    """The caller could not be authenticated (HTTP 401)."""

    http_status = 401


class DeniedError(PermanentError):
    """Need-to-know policy (or Vault itself) refused; ``denied`` names the secrets."""

    http_status = 403

    def __init__(self, reason: str, denied: Sequence[str] = ()) -> None:
        super().__init__(reason)
        self.denied = list(denied)


class NotFoundError(PermanentError):
    """An unknown secret name, launch id or missing Vault path/key (HTTP 404)."""

    http_status = 404


class ConflictError(PermanentError):
    """The request clashes with existing state (HTTP 409)."""

    http_status = 409


class TemporaryError(BrokerError):
    """A dependency is unavailable; safe to retry after ``retry_after`` seconds."""

    http_status = 503
    retryable = True

    def __init__(self, reason: str, *, component: str, retry_after: int = 5) -> None:
        super().__init__(reason)
        self.component = component
        self.retry_after = retry_after


class VaultUnavailableError(TemporaryError):
    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason, component="vault", retry_after=retry_after)


class KubernetesUnavailableError(TemporaryError):
    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason, component="kubernetes", retry_after=retry_after)


class AuditUnavailableError(TemporaryError):
    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason, component="audit", retry_after=retry_after)


class AirflowUnavailableError(TemporaryError):
    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason, component="airflow", retry_after=retry_after)
