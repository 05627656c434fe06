"""The one status <-> error table (broker.errors.WIRE): every leaf of the error tree goes
out through the API's error_response and comes back through the Airflow client's
error_from_response as the same class, with its denied names, component and Retry-After;
the Kubernetes adapter's mapping of API-server answers uses the same table."""

from __future__ import annotations

import httpx
import pytest

from airflow_plugin.client import error_from_response
from broker import errors
from broker.api.app import error_response
from broker.errors import (
    BrokerError,
    BrokerUnavailableError,
    ConfigurationError,
    ForbiddenByClusterError,
    InvalidRequestError,
    KubernetesUnavailableError,
    MisconfiguredError,
    NotFoundError,
    TemporaryError,
    error_code,
    error_for_api_server_status,
    error_for_status,
    status_for,
)


def _leaves(root: type[BrokerError]) -> list[type[BrokerError]]:
    """The tree's leaves in broker.errors, and the classes raised as they are although
    they have children (InvalidRequestError); other modules' subclasses, such as
    PolicyFileError, travel as their nearest base in the table."""
    children = [c for c in root.__subclasses__() if c.__module__ == errors.__name__]
    if not children:
        return [root]
    raised_as_is = [root] if root is InvalidRequestError else []
    return [*raised_as_is, *(leaf for child in children for leaf in _leaves(child))]


LEAVES = _leaves(BrokerError)


def _instance(kind: type[BrokerError]) -> BrokerError:
    if kind is errors.DeniedError:
        return errors.DeniedError("no grant", ["payments-api", "orders-db"])
    if issubclass(kind, TemporaryError):
        return kind("down for a moment", retry_after=9)  # type: ignore[call-arg]
    return kind("because")


def test_the_tree_has_the_leaves_the_callers_act_on() -> None:
    names = {kind.__name__ for kind in LEAVES}
    assert names == {
        "InvalidRequestError",
        "ContentTooLargeError",
        "UnsupportedMediaTypeError",
        "AuthenticationError",
        "DeniedError",
        "NotFoundError",
        "ConflictError",
        "ConfigurationError",
        "ForbiddenByClusterError",
        "VaultUnavailableError",
        "KubernetesUnavailableError",
        "AuditUnavailableError",
        "BrokerUnavailableError",
        "AirflowUnavailableError",
    }
    for kind in LEAVES:
        assert kind.__doc__, f"{kind.__name__} must say what the caller should do"


@pytest.mark.parametrize("kind", LEAVES, ids=lambda k: k.__name__)
def test_every_leaf_round_trips_through_the_api_and_the_client(kind: type[BrokerError]) -> None:
    sent = _instance(kind)
    answer = error_response(sent)
    assert answer.status_code == status_for(sent) == sent.http_status
    response = httpx.Response(
        answer.status_code, content=bytes(answer.body), headers=dict(answer.headers)
    )
    back = error_from_response(response, response.text)
    assert type(back) is kind
    assert back.reason == f"broker answered {answer.status_code}: {sent.reason}"
    assert back.retryable == sent.retryable
    if isinstance(sent, errors.DeniedError):
        assert isinstance(back, errors.DeniedError)
        assert back.denied == sent.denied
    if isinstance(sent, TemporaryError):
        assert isinstance(back, TemporaryError)
        assert (back.component, back.retry_after) == (sent.component, 9)


def test_codes_are_unique_per_leaf_and_statuses_are_http_errors() -> None:
    wire = [(status_for(_instance(k)), error_code(_instance(k))) for k in LEAVES]
    temporary = {w for k, w in zip(LEAVES, wire, strict=True) if issubclass(k, TemporaryError)}
    assert temporary == {(503, "unavailable")}  # the component tells them apart
    others = [w for k, w in zip(LEAVES, wire, strict=True) if not issubclass(k, TemporaryError)]
    assert len(set(others)) == len(others)
    assert all(400 <= status < 600 for status, _ in wire)


def test_misconfiguration_is_a_permanent_500() -> None:
    for exc in (ConfigurationError("x"), ForbiddenByClusterError("y")):
        assert isinstance(exc, MisconfiguredError)
        assert exc.http_status == 500
        assert not exc.retryable


def test_unexpected_answers_keep_their_old_meaning() -> None:
    # An unexpected failure (500 "internal", or not JSON at all) is worth a retry.
    assert BrokerError("boom").http_status == 500
    assert error_code(BrokerError("boom")) == "internal"
    internal = error_for_status(500, "boom", code="internal")
    assert type(internal) is BrokerUnavailableError
    assert internal.component == "broker"
    assert type(error_for_status(502, "gateway")) is BrokerUnavailableError
    assert type(error_for_status(429, "slow down")) is BrokerUnavailableError
    assert type(error_for_status(400, "bad")) is InvalidRequestError
    assert type(error_for_status(418, "teapot")) is InvalidRequestError
    # A code that does not fit the status is ignored: the status decides.
    assert type(error_for_status(404, "gone", code="misconfigured")) is NotFoundError
    unknown_component = error_for_status(503, "down", component="ldap", retry_after=3)
    assert type(unknown_component) is TemporaryError
    assert (unknown_component.component, unknown_component.retry_after) == ("ldap", 3)


@pytest.mark.parametrize("status", [401, 403])
def test_api_server_refusing_the_broker_says_check_its_rbac(status: int) -> None:
    exc = error_for_api_server_status(status, "create pod jobs/p: Forbidden (HTTP 403)")
    assert type(exc) is ForbiddenByClusterError
    assert "forbidden by the API server (check the broker's RBAC)" in exc.reason
    quota = error_for_api_server_status(status, "create pod", forbidden_hint="exceeded quota")
    assert quota.reason.endswith("(exceeded quota)")


def test_api_server_answers_map_like_the_api() -> None:
    assert type(error_for_api_server_status(404, "gone")) is NotFoundError
    assert type(error_for_api_server_status(409, "exists")) is errors.ConflictError
    assert type(error_for_api_server_status(422, "bad")) is InvalidRequestError
    assert type(error_for_api_server_status(400, "bad")) is InvalidRequestError
    for status in (0, 429, 500, 503, 504):
        exc = error_for_api_server_status(status, "unreachable")
        assert type(exc) is KubernetesUnavailableError
        assert exc.reason == "unreachable"


def test_too_large_for_the_api_server_is_the_requests_fault() -> None:
    exc = error_for_api_server_status(413, "create pod jobs/p: Request Entity Too Large")
    assert not exc.retryable and status_for(exc) == 413
