"""GET /v1/audit/launches on the real stack (issue 16 item 10): one task try's secrets,
requested, decided, delivered, removed and revoked, with names only, scoped like the
report."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from podbroker_devstack.broker_env import BrokerHandle
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION

pytestmark = pytest.mark.stack


def audit_of(broker: BrokerHandle, token: str, **params: Any) -> httpx.Response:
    return httpx.get(
        f"{broker.url}/v1/audit/launches",
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def test_one_task_try_from_request_to_revocation(broker: BrokerHandle) -> None:
    dag_id = f"analytics_etl_audit_{uuid.uuid4().hex[:6]}"
    task = {"dag_id": dag_id, "task_id": "extract_orders", "run_id": "manual__a1", "try_number": 1}
    launched = httpx.post(
        f"{broker.url}/v1/launches",
        json={
            "task": task,
            "container": {"image": "python:3.12-slim"},
            "secrets": ["warehouse-readonly", "orders-db"],
            "namespace": broker.namespace,
            "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "300s"}},
        },
        headers=broker.headers(),
        timeout=30,
    )
    assert launched.status_code == 201, launched.text
    launch_id = launched.json()["launch_id"]
    killed = httpx.delete(
        f"{broker.url}/v1/launches/{launch_id}",
        params={"reason": "on_kill"},
        headers=broker.headers(),
        timeout=30,
    )
    assert killed.status_code == 200, killed.text
    denied = httpx.post(
        f"{broker.url}/v1/launches",
        json={
            "task": {**task, "try_number": 2},
            "container": {"image": "python:3.12-slim"},
            "secrets": ["payments-api"],
            "namespace": broker.namespace,
        },
        headers=broker.headers(),
        timeout=30,
    )
    assert denied.status_code == 403, denied.text

    response = audit_of(broker, broker.token, **task)
    assert response.status_code == 200, response.text
    [launch] = response.json()["launches"]
    assert launch["launch_id"] == launch_id and launch["allowed"] is True
    fates = {f["secret"]: f for f in launch["secrets"]}
    assert set(fates) == {"warehouse-readonly", "orders-db"}
    assert fates["orders-db"]["grants"] == ["analytics/orders-readonly"]
    for fate in fates.values():
        assert fate["decision"] == "granted"
        assert fate["delivered"] and fate["removed"], fate
    assert fates["orders-db"]["dynamic"] and fates["orders-db"]["revoked"]
    assert launch["findings"] == []
    kinds = [e["kind"] for e in launch["events"]]
    assert kinds[:2] == ["launch_requested", "decision"]
    assert {"launch_killed", "secret_deleted", "leases_revoked"} <= set(kinds)
    # Names only: no values, no lease ids, no token accessors.
    assert not [v for v in broker.planted_values() if v in response.text]
    assert "database/creds" not in response.text and "accessor" not in response.text

    instance = {k: v for k, v in task.items() if k != "try_number"}
    every_try = audit_of(broker, broker.token, **instance)
    assert [x["try_number"] for x in every_try.json()["launches"]] == [1, 2]
    second = every_try.json()["launches"][1]
    assert second["allowed"] is False
    assert [(f["secret"], f["decision"]) for f in second["secrets"]] == [("payments-api", "denied")]


def test_scoped_like_the_report(broker: BrokerHandle) -> None:
    task = {"dag_id": "ml_score_other", "run_id": "r", "task_id": "t"}
    # The etl token reads analytics_etl_* only.
    assert audit_of(broker, broker.etl_token, **task).status_code == 403
    own = {**task, "dag_id": "analytics_etl_nothing_yet"}
    response = audit_of(broker, broker.etl_token, **own)
    assert response.status_code == 200, response.text
    assert response.json()["launches"] == []
    assert audit_of(broker, "not-a-token", **own).status_code == 401
    assert audit_of(broker, broker.token, **{**own, "map_index": "x"}).status_code == 422
    assert audit_of(broker, broker.token, **{**own, "dag_id": "a/b"}).status_code == 422


def test_launches_come_in_pages_and_bad_paging_is_a_422(broker: BrokerHandle) -> None:
    dag_id = f"analytics_etl_pages_{uuid.uuid4().hex[:6]}"
    task = {"dag_id": dag_id, "task_id": "load", "run_id": "manual__p1"}
    for try_number in (1, 2, 3):  # denied launches: recorded, nothing created
        denied = httpx.post(
            f"{broker.url}/v1/launches",
            json={
                "task": {**task, "try_number": try_number},
                "container": {"image": "python:3.12-slim"},
                "secrets": ["payments-api"],
                "namespace": broker.namespace,
            },
            headers=broker.headers(),
            timeout=30,
        )
        assert denied.status_code == 403, denied.text

    first = audit_of(broker, broker.token, **task, limit=2)
    assert first.status_code == 200, first.text
    assert [x["try_number"] for x in first.json()["launches"]] == [1, 2]
    cursor = first.json()["next_cursor"]
    assert cursor
    rest = audit_of(broker, broker.token, **task, limit=2, cursor=cursor)
    assert [x["try_number"] for x in rest.json()["launches"]] == [3]
    assert rest.json()["next_cursor"] is None
    # The default page holds them all; a later `since` none of them.
    assert len(audit_of(broker, broker.token, **task).json()["launches"]) == 3
    later = audit_of(broker, broker.token, **task, since="2999-01-01T00:00:00Z")
    assert later.status_code == 200 and later.json()["launches"] == []

    for field, bad in (
        ("limit", 0),
        ("limit", 101),
        ("limit", "x"),
        ("cursor", "-1"),
        ("cursor", "abc"),
        ("since", "yesterday"),
    ):
        refused = audit_of(broker, broker.token, **task, **{field: bad})
        assert refused.status_code == 422, (field, bad, refused.text)
        assert field in refused.json()["reason"], refused.text
