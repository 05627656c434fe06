"""Values never leave the per-pod Secret; workers cannot read Secrets; the broker's own
identity is confined to its task namespaces; the audit trail of real launches verifies
and feeds the usage report."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from broker.audit.keys import load_public_key, public_path
from broker.audit.store import open_audit_store
from broker.core.audit_events import EventKind
from podbroker_devstack.broker_env import (
    AIRFLOW_NAMESPACE,
    BROKER_SERVICE_ACCOUNT,
    SYSTEM_NAMESPACE,
    WORKER_SERVICE_ACCOUNT,
    BrokerHandle,
)
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION

pytestmark = pytest.mark.stack


def launch(broker: BrokerHandle, dag_id: str, task_id: str, secrets: list[Any]) -> httpx.Response:
    return httpx.post(
        f"{broker.url}/v1/launches",
        headers=broker.headers(),
        timeout=30,
        json={
            "task": {"dag_id": dag_id, "task_id": task_id, "run_id": uuid.uuid4().hex},
            "container": {"image": "python:3.12-slim"},
            "secrets": secrets,
            "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "1s"}},
        },
    )


def access(api: client.ApiClient, user: str, verb: str, resource: str, namespace: str) -> bool:
    review = client.AuthorizationV1Api(api).create_subject_access_review(
        client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=user,
                groups=["system:serviceaccounts", "system:authenticated"],
                resource_attributes=client.V1ResourceAttributes(
                    namespace=namespace, verb=verb, resource=resource
                ),
            )
        )
    )
    return bool(review.status.allowed)


def test_planted_values_appear_nowhere_but_the_per_pod_secret(
    broker: BrokerHandle,
    kube_api: client.ApiClient,
) -> None:
    core = client.CoreV1Api(kube_api)
    responses = [
        launch(
            broker,
            f"analytics_etl_{uuid.uuid4().hex[:6]}",
            "load",
            ["warehouse-readonly", "warehouse-loader"],
        ),
        launch(
            broker,
            f"analytics_reports_{uuid.uuid4().hex[:6]}",
            "upload_pdf",
            [{"name": "s3-reports", "delivery": {"type": "file", "mount_path": "/s3"}}],
        ),
        launch(broker, f"analytics_etl_{uuid.uuid4().hex[:6]}", "load", ["payments-api"]),
    ]
    assert [r.status_code for r in responses] == [201, 201, 403]
    time.sleep(4)  # let the pods end so cleanup events and logs exist too
    texts = [r.text for r in responses]
    for view in (r.json() for r in responses[:2]):
        url = f"{broker.url}/v1/launches/{view['launch_id']}"
        texts.append(httpx.get(url, headers=broker.headers(), timeout=10).text)
        texts.append(httpx.get(f"{url}/logs", headers=broker.headers(), timeout=10).text)
    texts.append(
        httpx.get(
            f"{broker.url}/v1/audit/report",
            params={"format": "html"},
            headers=broker.headers(),
            timeout=30,
        ).text
    )
    texts.append(httpx.get(f"{broker.url}/metrics", timeout=10).text)
    texts.append(broker.log_path.read_text())
    namespace = broker.namespace
    texts += [
        json.dumps(client.ApiClient().sanitize_for_serialization(p.metadata))
        for p in core.list_namespaced_pod(namespace).items
    ]
    texts += [
        json.dumps(client.ApiClient().sanitize_for_serialization(s.metadata))
        for s in core.list_namespaced_secret(namespace).items
    ]
    texts += [f"{e.reason} {e.message}" for e in core.list_namespaced_event(namespace).items]
    store = open_audit_store(broker.audit_url, create=False)
    with store:
        texts += [json.dumps(r.to_json_dict()) for r in store.records()]
    planted = broker.planted_values()
    assert len(planted) >= 9
    leaks = [i for i, text in enumerate(texts) for value in planted if value in text]
    assert leaks == [], f"planted values found in outputs #{sorted(set(leaks))}"
    assert any("PLANTED-" not in t and "warehouse-readonly" in t for t in texts)


def test_worker_identity_cannot_read_secrets(
    broker: BrokerHandle,
    kube_api: client.ApiClient,
    tmp_path: Path,
) -> None:
    worker = f"system:serviceaccount:{AIRFLOW_NAMESPACE}:{WORKER_SERVICE_ACCOUNT}"
    for verb in ("get", "list", "watch"):
        for namespace in (broker.namespace, AIRFLOW_NAMESPACE, SYSTEM_NAMESPACE):
            assert not access(kube_api, worker, verb, "secrets", namespace), (verb, namespace)
    view = launch(
        broker, f"analytics_etl_{uuid.uuid4().hex[:6]}", "load", ["warehouse-readonly"]
    ).json()
    token = broker.kube.mint_token(AIRFLOW_NAMESPACE, WORKER_SERVICE_ACCOUNT)
    kubeconfig = broker.kube.user_kubeconfig(token, tmp_path / "worker.kubeconfig")
    with (
        config.new_client_from_config(config_file=str(kubeconfig)) as worker_api,
        pytest.raises(ApiException) as denied,
    ):
        client.CoreV1Api(worker_api).read_namespaced_secret(
            f"podbroker-{view['launch_id']}", broker.namespace
        )
    assert denied.value.status == 403


def test_broker_identity_is_confined_to_task_namespaces(
    broker: BrokerHandle,
    kube_api: client.ApiClient,
) -> None:
    broker_user = f"system:serviceaccount:{SYSTEM_NAMESPACE}:{BROKER_SERVICE_ACCOUNT}"
    assert access(kube_api, broker_user, "create", "secrets", broker.namespace)
    for namespace in ("default", AIRFLOW_NAMESPACE, SYSTEM_NAMESPACE, "kube-system"):
        for verb in ("create", "get", "list", "delete"):
            assert not access(kube_api, broker_user, verb, "secrets", namespace), (verb, namespace)


def test_real_launches_leave_a_verifiable_trail_and_a_report(
    broker: BrokerHandle,
) -> None:
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    assert launch(broker, dag_id, "load", ["warehouse-readonly"]).status_code == 201
    assert launch(broker, dag_id, "load2", ["payments-api"]).status_code == 403
    time.sleep(4)
    folder = broker.config_path.parent
    store = open_audit_store(f"sqlite:///{folder / 'audit.db'}", create=False)
    with store:
        result = store.verify(load_public_key(public_path(folder / "audit-signing.pem")))
        events = [e for e in store.events() if e.dag_id == dag_id]
    assert result.ok, result.summary()
    kinds = [e.kind for e in events if e.task_id == "load"]
    for expected in (
        EventKind.LAUNCH_REQUESTED,
        EventKind.DECISION,
        EventKind.POD_CREATED,
        EventKind.SECRETS_RESOLVED,
        EventKind.SECRET_CREATED,
        EventKind.POD_FINISHED,
        EventKind.SECRET_DELETED,
    ):
        assert expected in kinds, (expected, kinds)
    assert (
        kinds.index(EventKind.DECISION)
        < kinds.index(EventKind.SECRET_CREATED)
        < kinds.index(EventKind.SECRET_DELETED)
    )
    report = httpx.get(
        f"{broker.url}/v1/audit/report",
        params={"format": "json", "dag": dag_id},
        headers=broker.headers(),
        timeout=30,
    ).json()
    text = json.dumps(report)
    assert "warehouse-readonly" in text
    assert "payments-api" in text  # the denial is reported


def test_deleting_a_finished_launch_is_not_recorded_as_a_kill(broker: BrokerHandle) -> None:
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    finished = launch(broker, dag_id, "done", []).json()
    running = httpx.post(
        f"{broker.url}/v1/launches",
        headers=broker.headers(),
        timeout=30,
        json={
            "task": {"dag_id": dag_id, "task_id": "busy", "run_id": uuid.uuid4().hex},
            "container": {"image": "python:3.12-slim"},
            "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "300s"}},
        },
    ).json()
    status_url = f"{broker.url}/v1/launches/{finished['launch_id']}"
    deadline = time.monotonic() + 30
    while (
        httpx.get(status_url, headers=broker.headers(), timeout=10).json()["phase"] != "Succeeded"
        and time.monotonic() < deadline
    ):
        time.sleep(0.3)
    for view, reason in ((finished, "on_finish_action"), (running, "on_kill")):
        response = httpx.delete(
            f"{broker.url}/v1/launches/{view['launch_id']}",
            params={"reason": reason},
            headers=broker.headers(),
            timeout=30,
        )
        assert response.status_code == 200, response.text
    store = open_audit_store(broker.audit_url, create=False)
    with store:
        recorded = [
            (e.task_id, e.kind, e.details.get("reason"))
            for e in store.events()
            if e.dag_id == dag_id and e.kind in (EventKind.POD_DELETED, EventKind.LAUNCH_KILLED)
        ]
    assert sorted(recorded) == [
        ("busy", EventKind.LAUNCH_KILLED, "on_kill"),
        ("done", EventKind.POD_DELETED, "on_finish_action"),
    ]
    bad = httpx.delete(
        f"{broker.url}/v1/launches/x",
        params={"reason": "<script>"},
        headers=broker.headers(),
        timeout=10,
    )
    assert bad.status_code == 422
