"""The task-instance "Secrets" view of the Airflow plugin (issue 16 item 10): what it
asks the broker for, how it reads Airflow's placeholders, and that a user who may not
read the DAG's task instances gets nothing. Airflow's auth is replaced by dependency
overrides here; the real API server runs in tests/e2e/test_airflow_plugin_ui.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from airflow.sdk.exceptions import AirflowNotFoundException
from fastapi.testclient import TestClient

from airflow_plugin import plugin
from broker.core import audit_events as ev
from broker.core.models import TaskIdentity
from broker.core.timeline import TaskTry, TaskTryAudit, task_try_audit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def sample_audit(task: TaskTry) -> TaskTryAudit:
    identity = TaskIdentity(dag_id=task.dag_id, task_id=task.task_id, run_id=task.run_id)
    events = [
        ev.launch_requested(
            launch_id="L1", caller="c", task=identity, secret_names=["<b>db</b>"], time=T0
        ),
        ev.decision(
            launch_id="L1",
            caller="c",
            task=identity,
            secret_names=["<b>db</b>"],
            allowed=False,
            denied=["<b>db</b>"],
            reasons=["no grant"],
            time=T0,
        ),
    ]
    return task_try_audit(events, task)


def page(
    monkeypatch: pytest.MonkeyPatch, query: str, *, readable: bool = True
) -> tuple[int, str, list[TaskTry]]:
    asked: list[TaskTry] = []

    class FakeClient:
        def __enter__(self) -> FakeClient:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def launch_audit(self, task: TaskTry) -> TaskTryAudit:
            asked.append(task)
            return sample_audit(task)

    class FakeHook:
        def __init__(self, conn_id: str) -> None:
            pass

        def get_conn(self) -> FakeClient:
            return FakeClient()

    monkeypatch.setattr(plugin, "BrokerHook", FakeHook)
    app = plugin.create_app()
    for dependency in app.router.dependencies:  # the PLUGINS view check
        app.dependency_overrides[dependency.dependency] = lambda: None  # type: ignore[index]
    app.dependency_overrides[plugin.may_read_task_instances] = lambda: readable
    response = TestClient(app).get(f"{plugin.TASK_INSTANCE_PATH}?{query}")
    return response.status_code, response.text, asked


def test_the_airflow_tab_placeholders_mean_every_try_of_an_unmapped_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    status, text, asked = page(
        monkeypatch, "dag_id=d&run_id=manual__1&task_id=t&map_index={MAP_INDEX}"
    )
    assert status == 200, text
    assert asked == [TaskTry(dag_id="d", run_id="manual__1", task_id="t")]
    assert "Secrets of d / manual__1 / t" in text
    assert "&lt;b&gt;db&lt;/b&gt;" in text and "<b>db</b>" not in text  # escaped
    assert "denied" in text and "no grant" in text


def test_the_extra_link_names_one_try(monkeypatch: pytest.MonkeyPatch) -> None:
    status, _, asked = page(monkeypatch, "dag_id=d&run_id=r&task_id=t&map_index=0&try_number=2")
    assert status == 200
    assert asked == [TaskTry(dag_id="d", run_id="r", task_id="t", map_index=0, try_number=2)]


def test_a_user_who_may_not_read_the_dag_gets_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    status, text, asked = page(monkeypatch, "dag_id=d&run_id=r&task_id=t", readable=False)
    assert status == 403 and asked == []
    assert "may not read" in text


def test_nonsense_numbers_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    status, _, asked = page(monkeypatch, "dag_id=d&run_id=r&task_id=t&try_number=x")
    assert status == 422 and asked == []


def test_the_view_is_a_task_instance_tab() -> None:
    views = {v["name"]: v for v in plugin.PodbrokerPlugin.external_views}
    tab = views["Secrets"]
    assert tab["destination"] == "task_instance"
    assert tab["href"].startswith(f"{plugin.URL_PREFIX}{plugin.TASK_INSTANCE_PATH}?")
    for placeholder in ("{DAG_ID}", "{RUN_ID}", "{TASK_ID}", "{MAP_INDEX}"):
        assert placeholder in tab["href"]


@pytest.mark.parametrize("path", [plugin.TASK_INSTANCE_PATH, plugin.REPORT_PATH])
def test_a_missing_connection_is_a_page_that_says_so(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    class NoConnection:
        def __init__(self, conn_id: str) -> None:
            raise AirflowNotFoundException(f"The conn_id `{conn_id}` isn't defined")

    monkeypatch.setattr(plugin, "BrokerHook", NoConnection)
    app = plugin.create_app()
    for dependency in app.router.dependencies:
        app.dependency_overrides[dependency.dependency] = lambda: None  # type: ignore[index]
    app.dependency_overrides[plugin.may_read_task_instances] = lambda: True
    app.dependency_overrides[plugin.readable_dag_ids] = lambda: frozenset({"d"})
    response = TestClient(app).get(f"{path}?dag_id=d&run_id=r&task_id=t")
    assert response.status_code == 502
    assert "no connection &#x27;podbroker_default&#x27;" in response.text
