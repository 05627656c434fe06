"""The "Secret usage" page asks the broker only for the DAGs the user may read
(issue 12, item 4); Airflow's auth is replaced by dependency overrides here, the real
thing runs in tests/e2e/test_airflow_plugin_ui.py."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient

from airflow_plugin import plugin


class FakeClient:
    def __init__(self, calls: list[dict[str, Any]]) -> None:
        self.calls = calls

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def audit_report(self, **kwargs: Any) -> str:
        self.calls.append(kwargs)
        return "<h1>Secret usage report</h1>"


def page(
    monkeypatch: pytest.MonkeyPatch, readable: Sequence[str], query: str = ""
) -> tuple[str, list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    class FakeHook:
        def __init__(self, conn_id: str) -> None:
            pass

        def get_conn(self) -> FakeClient:
            return FakeClient(calls)

    monkeypatch.setattr(plugin, "BrokerHook", FakeHook)
    app = plugin.create_app()
    for dependency in app.router.dependencies:  # the PLUGINS view check
        app.dependency_overrides[dependency.dependency] = lambda: None  # type: ignore[index]
    app.dependency_overrides[plugin.readable_dag_ids] = lambda: frozenset(readable)
    response = TestClient(app).get(f"{plugin.REPORT_PATH}{query}")
    assert response.status_code == 200, response.text
    return response.text, calls


def test_report_is_limited_to_readable_dags(monkeypatch: pytest.MonkeyPatch) -> None:
    text, calls = page(monkeypatch, ["b", "a"], "?dag=a")
    assert "Secret usage report" in text
    (call,) = calls
    # No window given: the last 7 days (the report's cost grows with its window).
    since = dt.datetime.fromisoformat(call.pop("since"))
    assert dt.timedelta(days=7) - (dt.datetime.now(dt.UTC) - since) < dt.timedelta(minutes=5)
    assert call == {"fmt": "html", "dag": "a", "dag_ids": ["a", "b"]}


def test_a_user_who_may_read_no_dag_sees_an_empty_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text, calls = page(monkeypatch, [])
    assert calls == []
    assert "No DAG you may read" in text


def test_since_all_asks_for_the_whole_trail(monkeypatch: pytest.MonkeyPatch) -> None:
    _, calls = page(monkeypatch, ["a"], "?since=all")
    assert calls[0]["since"] is None
