"""The broker HTTP client: what it sends (bearer token read per call, secret names only)
and how every HTTP outcome maps onto the broker error tree. httpx.MockTransport stands
in for the broker here only; tests/e2e runs the real one."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from airflow_plugin.client import BrokerClient
from airflow_plugin.settings import BrokerConnectionSettings, settings_from_connection
from broker.core.api_models import ContainerSpec, LaunchRequest
from broker.core.models import SecretRequest, TaskIdentity
from broker.core.timeline import TaskTry
from broker.errors import (
    AuthenticationError,
    ConflictError,
    DeniedError,
    InvalidRequestError,
    NotFoundError,
    TemporaryError,
)

TASK = TaskIdentity(dag_id="d", task_id="t", run_id="r", try_number=1)


def view(phase: str = "Pending", created: bool = True) -> dict[str, object]:
    return {
        "launch_id": "L1",
        "task": TASK.model_dump(),
        "namespace": "jobs",
        "pod_name": "d-t-abc",
        "phase": phase,
        "created": created,
    }


def settings(tmp_path: Path, token: str = "tok-1") -> BrokerConnectionSettings:  # noqa: S107
    token_file = tmp_path / "token"
    token_file.write_text(token)
    return settings_from_connection(
        host="http://broker.test", port=None, password=None, extra={"token_file": str(token_file)}
    )


def request() -> LaunchRequest:
    return LaunchRequest(
        task=TASK,
        container=ContainerSpec(image="busybox", env={"MODE": "full"}),
        secrets=[SecretRequest(name="warehouse-loader")],
    )


def test_launch_posts_names_with_the_current_token(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(201, json=view())

    s = settings(tmp_path)
    with BrokerClient(s, transport=httpx.MockTransport(handler)) as client:
        result = client.launch(request())
        (tmp_path / "token").write_text("tok-2")  # kubelet rotated the projected token
        client.launch(request())
    assert result.launch_id == "L1"
    assert seen[0].method == "POST"
    assert seen[0].url.path == "/v1/launches"
    assert seen[0].headers["Authorization"] == "Bearer tok-1"
    assert seen[1].headers["Authorization"] == "Bearer tok-2"
    body = json.loads(seen[0].content)
    assert body["secrets"] == [
        {"name": "warehouse-loader", "delivery": {"type": "env", "prefix": None, "mapping": None}}
    ]
    assert body["task"]["dag_id"] == "d"


def error(status: int, **fields: object) -> httpx.Response:
    body = {"error": "x", "reason": "because", **fields}
    headers = {"Retry-After": "7"} if status == 503 else {}
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        (error(403, denied_secrets=["payments-api"]), DeniedError),
        (error(422), InvalidRequestError),
        (error(401), AuthenticationError),
        (error(404), NotFoundError),
        (error(409), ConflictError),
        (error(503, component="vault", retryable=True), TemporaryError),
        (httpx.Response(500, text="<html>bad gateway</html>"), TemporaryError),
    ],
)
def test_error_statuses_map_to_the_error_tree(
    tmp_path: Path, response: httpx.Response, kind: type[Exception]
) -> None:
    client = BrokerClient(settings(tmp_path), transport=httpx.MockTransport(lambda r: response))
    with client as c, pytest.raises(kind) as caught:
        c.get_launch("L1")
    assert "broker answered" in str(caught.value)


def test_denied_names_and_retry_after_are_kept(tmp_path: Path) -> None:
    denied = error(403, denied_secrets=["payments-api", "orders-db"])
    client = BrokerClient(settings(tmp_path), transport=httpx.MockTransport(lambda r: denied))
    with client as c, pytest.raises(DeniedError) as caught:
        c.launch(request())
    assert caught.value.denied == ["payments-api", "orders-db"]
    unavailable = error(503, component="vault")
    with (
        BrokerClient(settings(tmp_path), transport=httpx.MockTransport(lambda r: unavailable)) as c,
        pytest.raises(TemporaryError) as temp,
    ):
        c.launch(request())
    assert temp.value.component == "vault"
    assert temp.value.retry_after == 7


def test_connection_failure_is_temporary_and_hides_the_token(tmp_path: Path) -> None:
    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=req)

    s = settings(tmp_path, token="planted-token-Xy7")
    client = BrokerClient(s, transport=httpx.MockTransport(refuse))
    with client as c, pytest.raises(TemporaryError) as caught:
        c.get_launch("L1")
    assert caught.value.component == "broker"
    assert "planted-token-Xy7" not in str(caught.value)


def test_logs_stream_as_lines_with_parameters(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, text="one\ntwo\n", headers={"content-type": "text/plain"})

    with BrokerClient(settings(tmp_path), transport=httpx.MockTransport(handler)) as c:
        lines = list(c.iter_log_lines("L/1", follow=True, since_seconds=12, timestamps=True))
    assert lines == ["one", "two"]
    assert seen[0].url.raw_path.decode().startswith("/v1/launches/L%2F1/logs?")
    assert dict(seen[0].url.params) == {
        "follow": "true",
        "timestamps": "true",
        "since_seconds": "12",
    }


def test_log_stream_error_is_translated(tmp_path: Path) -> None:
    gone = error(404)
    client = BrokerClient(settings(tmp_path), transport=httpx.MockTransport(lambda r: gone))
    with client as c, pytest.raises(NotFoundError):
        list(c.iter_log_lines("L1", follow=False))


def test_audit_report_passes_filters(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, text="<h1>report</h1>")

    with BrokerClient(settings(tmp_path), transport=httpx.MockTransport(handler)) as c:
        assert c.audit_report(dag="analytics_etl_daily") == "<h1>report</h1>"
        with pytest.raises(InvalidRequestError, match="since"):
            c.audit_report(since="yesterday")
    assert len(seen) == 1
    assert (seen[0].method, seen[0].url.path) == ("POST", "/v1/audit/report")
    assert json.loads(seen[0].content) == {"format": "html", "dag": "analytics_etl_daily"}


def test_audit_report_sends_dag_ids_in_the_body_and_never_asks_for_none(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, text="<h1>report</h1>")

    with BrokerClient(settings(tmp_path), transport=httpx.MockTransport(handler)) as c:
        c.audit_report(dag_ids=["b_dag", "a_dag", "b_dag"])
        with pytest.raises(ValueError, match="no DAG ids"):
            c.audit_report(dag_ids=[])
    assert len(seen) == 1
    assert json.loads(seen[0].content) == {"format": "html", "dag_ids": ["a_dag", "b_dag"]}
    assert seen[0].headers["content-type"] == "application/json"


class _SilentAfter(httpx.SyncByteStream):
    """A followed log stream: some lines, then silence (the read times out)."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield b"2026-11-24T10:00:00Z a\n"
        raise httpx.ReadTimeout("idle")


def test_idle_follow_stream_ends_quietly_only_when_asked(tmp_path: Path) -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(200, stream=_SilentAfter()))
    with BrokerClient(settings(tmp_path), transport=transport) as c:
        lines = list(c.iter_log_lines("L1", follow=True, idle_timeout=1.0))
        assert lines == ["2026-11-24T10:00:00Z a"]
        with pytest.raises(TemporaryError):
            list(c.iter_log_lines("L1", follow=True))


def test_launch_audit_follows_the_brokers_pages(tmp_path: Path) -> None:
    """GET /v1/audit/launches is paginated: the task-instance view gets every page."""
    task = TaskTry(dag_id="etl", run_id="r1", task_id="load")
    pages = {
        None: (["L1", "L2"], "c1"),
        "c1": (["L3"], "c2"),
        "c2": (["L4"], None),
    }
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        seen.append(cursor)
        assert request.url.params["dag_id"] == "etl"
        ids, next_cursor = pages[cursor]
        body = {
            "task": task.model_dump(),
            "launches": [_timeline(i) for i in ids],
            "next_cursor": next_cursor,
        }
        return httpx.Response(200, json=body)

    with BrokerClient(settings(tmp_path), transport=httpx.MockTransport(handler)) as client:
        audit = client.launch_audit(task)
        assert [t.launch_id for t in audit.launches] == ["L1", "L2", "L3", "L4"]
        assert audit.next_cursor is None and seen == [None, "c1", "c2"]
        seen.clear()
        capped = client.launch_audit(task, max_pages=2)
        assert [t.launch_id for t in capped.launches] == ["L1", "L2", "L3"]
        assert capped.next_cursor == "c2"  # more remain


def _timeline(launch_id: str) -> dict[str, object]:
    return {
        "launch_id": launch_id,
        "try_number": 1,
        "caller": None,
        "image": None,
        "requested": None,
        "allowed": True,
        "reasons": [],
        "secrets": [],
        "findings": [],
        "events": [],
    }
