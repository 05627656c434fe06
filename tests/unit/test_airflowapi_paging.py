"""The broker's Airflow REST API client reads every page of the batched task-instance
list (the reconciler's question) and says when the answer was cut short. The pure
paging logic runs here against an in-memory transport (httpx.MockTransport) that pages
like Airflow's ``POST /api/v2/dags/~/dagRuns/~/taskInstances/list``;
tests/e2e/test_task_verification.py runs it against the real Airflow API server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.airflowapi.client import LIST_PATH, AirflowCredential, AirflowTaskInstances
from broker.core.models import TaskIdentity
from broker.errors import AirflowUnavailableError


def ti(index: int) -> dict[str, Any]:
    return {
        "id": f"0199a3c2-0000-7000-8000-{index:012d}",
        "dag_id": "etl",
        "dag_run_id": "manual__1",
        "task_id": "load",
        "map_index": index,
        "try_number": 1,
        "state": "running",
        "hostname": f"worker-{index}",
    }


class FakeAirflow:
    """Pages like Airflow's batch list: ordered by ``order_by``, sliced by offset and
    limit (capped at ``max_page`` as Airflow's own limits may), with total_entries."""

    def __init__(self, count: int, *, max_page: int = 10_000) -> None:
        self.rows = [ti(i) for i in range(count)]
        self.max_page = max_page
        self.bodies: list[dict[str, Any]] = []
        self.fail_on_page: int | None = None
        self.on_page: Any = None
        self.empty_after_first = False

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            return httpx.Response(201, json={"access_token": "jwt"})
        assert request.url.path == LIST_PATH
        assert request.headers["Authorization"] == "Bearer jwt"
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.fail_on_page == len(self.bodies):
            return httpx.Response(500, json={"detail": "boom"})
        if self.on_page is not None:
            self.on_page(len(self.bodies))
        rows = sorted(self.rows, key=lambda r: str(r[body.get("order_by") or "map_index"]))
        offset, limit = body.get("page_offset", 0), min(body["page_limit"], self.max_page)
        if self.empty_after_first and offset:
            limit = 0  # fewer rows than total_entries promised
        return httpx.Response(
            200,
            json={"task_instances": rows[offset : offset + limit], "total_entries": len(rows)},
        )


def client(airflow: FakeAirflow, tmp_path: Path, **kwargs: Any) -> AirflowTaskInstances:
    password = tmp_path / "password"
    password.write_text("pw")
    return AirflowTaskInstances(
        "http://airflow.test",
        AirflowCredential("password", username="podbroker", password_file=password),
        transport=httpx.MockTransport(airflow.handle),
        **kwargs,
    )


TASKS = [TaskIdentity(dag_id="etl", task_id="load", run_id="manual__1", map_index=4)]


def test_every_page_is_read_until_total_entries_is_covered(tmp_path: Path) -> None:
    airflow = FakeAirflow(5)
    batch = client(airflow, tmp_path, page_size=2).get_many(TASKS)
    assert batch.complete
    assert sorted(r.map_index for r in batch.records) == [0, 1, 2, 3, 4]
    assert [b["page_offset"] for b in airflow.bodies] == [0, 2, 4]
    assert {b["page_limit"] for b in airflow.bodies} == {2}
    assert {b["order_by"] for b in airflow.bodies} == {"id"}  # pages must not overlap


def test_a_server_capping_the_page_size_is_followed_by_what_it_sent(tmp_path: Path) -> None:
    airflow = FakeAirflow(7, max_page=3)
    batch = client(airflow, tmp_path, page_size=1000).get_many(TASKS)
    assert batch.complete and len(batch.records) == 7
    assert [b["page_offset"] for b in airflow.bodies] == [0, 3, 6]


def test_a_spent_budget_returns_what_was_read_marked_incomplete(tmp_path: Path) -> None:
    now = [0.0]
    airflow = FakeAirflow(9)
    airflow.on_page = lambda page: now.__setitem__(0, now[0] + 10)  # each page: 10 s
    broker = client(airflow, tmp_path, page_size=2, list_budget_seconds=25, clock=lambda: now[0])
    batch = broker.get_many(TASKS)
    assert not batch.complete
    assert sorted(r.map_index for r in batch.records) == [0, 1, 2, 3, 4, 5]
    assert len(airflow.bodies) == 3  # the third page ended past the budget


def test_a_list_changing_while_paged_is_incomplete(tmp_path: Path) -> None:
    airflow = FakeAirflow(4)

    def delete_first(page: int) -> None:
        if page == 2:
            del airflow.rows[0]  # rows shift back: one would be skipped

    airflow.on_page = delete_first
    batch = client(airflow, tmp_path, page_size=2).get_many(TASKS)
    assert not batch.complete


def test_a_short_page_is_incomplete(tmp_path: Path) -> None:
    airflow = FakeAirflow(3)
    airflow.empty_after_first = True
    batch = client(airflow, tmp_path, page_size=2).get_many(TASKS)
    assert not batch.complete and len(batch.records) == 2


def test_a_failed_page_fails_the_whole_question(tmp_path: Path) -> None:
    airflow = FakeAirflow(5)
    airflow.fail_on_page = 2
    with pytest.raises(AirflowUnavailableError, match="HTTP 500"):
        client(airflow, tmp_path, page_size=2).get_many(TASKS)


def test_no_launches_no_call(tmp_path: Path) -> None:
    airflow = FakeAirflow(1)
    batch = client(airflow, tmp_path).get_many([])
    assert batch.complete and batch.records == () and airflow.bodies == []
