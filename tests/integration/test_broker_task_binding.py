"""Secrets bound to their task instance and image, on the real broker (verification
off): images outside a grant are refused naming the secret; a grant that requires a
verified task fails closed without an Airflow API; a differing second launch of a try
is a 409; a newer try ends the earlier try's pod and revokes its database lease."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import hvac
import pytest
from hvac.exceptions import InvalidRequest
from kubernetes import client

from broker.audit.store import open_audit_store
from broker.core.audit_events import EventKind
from podbroker_devstack.broker_env import BrokerHandle
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION
from tests.helpers import eventually

pytestmark = pytest.mark.stack

PINNED = "ghcr.io/example/payments-sync@sha256:" + "ab" * 32
"""The one image policies/teams/payments.yaml lets receive payments-api."""


def body(
    dag_id: str,
    task_id: str = "load",
    *,
    run_id: str = "manual__1",
    try_number: int = 1,
    image: str = "python:3.12-slim",
    secrets: list[Any] | None = None,
) -> dict[str, Any]:
    return {
        "task": {
            "dag_id": dag_id,
            "task_id": task_id,
            "run_id": run_id,
            "try_number": try_number,
        },
        "container": {"image": image},
        "secrets": secrets or [],
        "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "300s"}},
    }


def post(broker: BrokerHandle, payload: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{broker.url}/v1/launches", json=payload, headers=broker.headers(), timeout=30
    )


def test_a_secret_reaches_only_the_images_its_grant_lists(broker: BrokerHandle) -> None:
    refused = post(broker, body("payments_provider_sync", secrets=["payments-api"]))
    assert refused.status_code == 403, refused.text
    error = refused.json()
    assert error["denied_secrets"] == ["payments-api"]
    assert f"allow only images {PINNED}" in error["reason"]


def test_a_grant_requiring_a_verified_task_fails_closed_without_airflow(
    broker: BrokerHandle,
) -> None:
    # The right image, but this broker has no Airflow API to confirm the task with.
    refused = post(broker, body("payments_provider_sync", image=PINNED, secrets=["payments-api"]))
    assert refused.status_code == 403, refused.text
    assert "no airflow.api_url" in refused.json()["reason"]


def test_a_differing_second_launch_is_409_an_identical_one_reattaches(
    broker: BrokerHandle, kube_api: client.ApiClient
) -> None:
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    first = post(broker, body(dag_id, secrets=["warehouse-readonly"]))
    assert first.status_code == 201, first.text
    same = post(broker, body(dag_id, secrets=["warehouse-readonly"]))
    assert same.status_code == 200 and same.json()["launch_id"] == first.json()["launch_id"]
    other = post(
        broker, body(dag_id, image="attacker/tools:latest", secrets=["warehouse-readonly"])
    )
    assert other.status_code == 409, other.text
    assert "different request" in other.json()["reason"]
    core = client.CoreV1Api(kube_api)
    pods = core.list_namespaced_pod(broker.namespace, label_selector=f"dag_id={dag_id}").items
    assert [p.spec.containers[0].image for p in pods] == ["python:3.12-slim"]


def test_a_newer_try_ends_the_earlier_tries_pod_and_lease(
    broker: BrokerHandle, kube_api: client.ApiClient, vault_root: hvac.Client
) -> None:
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(kube_api)
    first = post(broker, body(dag_id, "extract_orders", secrets=["orders-db"]))
    assert first.status_code == 201, first.text
    with open_audit_store(broker.audit_url, create=False) as store:
        resolved = [
            e
            for e in store.events()
            if e.kind == EventKind.SECRETS_RESOLVED and e.launch_id == first.json()["launch_id"]
        ]
    lease_id = resolved[-1].details["secrets"][0]["lease_id"]
    assert vault_root.sys.read_lease(lease_id)["data"]["id"] == lease_id

    second = post(broker, body(dag_id, "extract_orders", try_number=2, secrets=["orders-db"]))
    assert second.status_code == 201, second.text

    def first_pod_gone() -> bool:
        names = [
            p.metadata.name
            for p in core.list_namespaced_pod(
                broker.namespace, label_selector=f"dag_id={dag_id}"
            ).items
            if p.metadata.deletion_timestamp is None
        ]
        return names == [second.json()["pod_name"]]

    assert eventually(first_pod_gone, timeout=30), "the earlier try's pod kept running"

    def lease_gone() -> bool:
        try:
            vault_root.sys.read_lease(lease_id)
        except InvalidRequest:
            return True
        return False

    assert eventually(lease_gone, timeout=30), "the earlier try's lease is still alive"
    with open_audit_store(broker.audit_url, create=False) as store:
        killed = [
            e
            for e in store.events()
            if e.kind == EventKind.LAUNCH_KILLED and e.launch_id == first.json()["launch_id"]
        ]
    assert killed and killed[-1].details["reason"] == "superseded by try 2"
