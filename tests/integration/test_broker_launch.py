"""The broker on the real stack: launches with env and file secrets, cleanup, denials,
hardening, idempotency, kill, and secrecy of values."""

from __future__ import annotations

import base64
import hashlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from broker.audit.store import open_audit_store
from broker.core.audit_events import EventKind
from podbroker_devstack.broker_env import BrokerHandle
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION
from tests.helpers import eventually

pytestmark = pytest.mark.stack


def body(
    dag_id: str,
    task_id: str = "load",
    *,
    secrets: list[Any] | None = None,
    run_seconds: int = 2,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "task": {
            "dag_id": dag_id,
            "task_id": task_id,
            "run_id": f"manual__{uuid.uuid4().hex}",
            "try_number": 1,
        },
        "container": {"image": "python:3.12-slim", "command": ["python", "-c", "print(1)"]},
        "secrets": secrets or [],
        "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: f"{run_seconds}s"}},
        **extra,
    }


def digests(values: list[str]) -> list[str]:
    return sorted(hashlib.sha256(v.encode()).hexdigest()[:12] for v in values)


def kinds_of(broker: BrokerHandle, launch_id: str) -> list[EventKind]:
    store = open_audit_store(broker.audit_url, create=False)
    with store:
        return [e.kind for e in store.events() if e.launch_id == launch_id]


def post(broker: BrokerHandle, payload: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{broker.url}/v1/launches", json=payload, headers=broker.headers(), timeout=30
    )


def secret_exists(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def pods_of(core: client.CoreV1Api, namespace: str, dag_label: str) -> list[Any]:
    return list(core.list_namespaced_pod(namespace, label_selector=f"dag_id={dag_label}").items)


def test_launch_with_env_and_file_secrets_then_cleanup(
    broker: BrokerHandle,
    kube_api: client.ApiClient,
) -> None:
    core = client.CoreV1Api(kube_api)
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    response = post(
        broker,
        body(
            dag_id,
            run_seconds=4,
            secrets=[
                {"name": "warehouse-readonly", "delivery": {"type": "env", "prefix": "WH_"}},
                {"name": "warehouse-loader", "delivery": {"type": "env", "prefix": "LOADER_"}},
            ],
        ),
    )
    assert response.status_code == 201, response.text
    view = response.json()
    assert view["created"] is True
    namespace, pod_name = view["namespace"], view["pod_name"]
    secret_name = f"podbroker-{view['launch_id']}"

    secret = core.read_namespaced_secret(secret_name, namespace)
    assert secret.immutable is True
    assert secret.metadata.owner_references[0].name == pod_name
    decoded = [base64.b64decode(v).decode() for v in secret.data.values()]
    planted = broker.planted
    expected = [
        *planted["analytics/warehouse-readonly"].values(),
        *planted["analytics/warehouse-loader"].values(),
    ]
    # Exactly the granted keys; compared by digest so a failure never prints a value.
    assert digests(decoded) == digests(expected)
    assert not any(v in str(secret.metadata) for v in broker.planted_values())

    pod = core.read_namespaced_pod(pod_name, namespace)
    refs = {e.value_from.secret_key_ref.name for e in pod.spec.containers[0].env if e.value_from}
    assert refs == {secret_name}
    env_names = {e.name for e in pod.spec.containers[0].env}
    assert {"WH_HOST", "WH_USERNAME", "WH_PASSWORD", "LOADER_PASSWORD"} <= env_names
    assert pod.spec.automount_service_account_token is False

    assert eventually(
        lambda: core.read_namespaced_pod(pod_name, namespace).status.phase == "Succeeded"
    )
    assert eventually(lambda: not secret_exists(core, namespace, secret_name), timeout=15), (
        "the Secret outlived its pod"
    )
    status = httpx.get(
        f"{broker.url}/v1/launches/{view['launch_id']}", headers=broker.headers(), timeout=10
    ).json()
    assert status["phase"] == "Succeeded"
    assert status["exit_code"] == 0


def test_file_delivery_mounts_read_only_files(
    broker: BrokerHandle,
    kube_api: client.ApiClient,
) -> None:
    core = client.CoreV1Api(kube_api)
    response = post(
        broker,
        body(
            f"analytics_reports_{uuid.uuid4().hex[:6]}",
            "render",
            secrets=[
                {
                    "name": "tableau-token",
                    "delivery": {"type": "file", "mount_path": "/var/run/tableau"},
                }
            ],
        ),
    )
    assert response.status_code == 201, response.text
    view = response.json()
    pod = core.read_namespaced_pod(view["pod_name"], view["namespace"])
    (volume,) = pod.spec.volumes
    assert volume.secret.secret_name == f"podbroker-{view['launch_id']}"
    assert volume.secret.default_mode == 0o400
    (mount,) = pod.spec.containers[0].volume_mounts
    assert mount.mount_path == "/var/run/tableau/token"
    assert mount.read_only is True


def test_denied_request_gets_403_and_creates_nothing(
    broker: BrokerHandle,
    kube_api: client.ApiClient,
) -> None:
    core = client.CoreV1Api(kube_api)
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    response = post(broker, body(dag_id, secrets=["payments-api"]))
    assert response.status_code == 403, response.text
    error = response.json()
    assert error["error"] == "denied"
    assert error["denied_secrets"] == ["payments-api"]
    assert error["retryable"] is False
    assert pods_of(core, broker.namespace, dag_id) == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"hostNetwork": True},
        {"volumes": [{"name": "root", "hostPath": {"path": "/"}}]},
        {"containers": [{"securityContext": {"privileged": True}}]},
        {"envFrom": [{"secretRef": {"name": "someone-elses"}}]},
    ],
)
def test_pod_spec_escalations_get_422_and_create_nothing(
    broker: BrokerHandle,
    kube_api: client.ApiClient,
    overrides: dict[str, Any],
) -> None:
    core = client.CoreV1Api(kube_api)
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    response = post(broker, body(dag_id, pod_overrides=overrides))
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_request"
    assert pods_of(core, broker.namespace, dag_id) == []


def test_service_account_outside_allow_list_is_422(broker: BrokerHandle) -> None:
    response = post(broker, body("analytics_etl_x", service_account="podbroker"))
    assert response.status_code == 422
    assert "service_account" in response.json()["reason"]


def test_unauthenticated_and_wrong_audience_callers_get_401(broker: BrokerHandle) -> None:
    payload = body("analytics_etl_x")
    assert httpx.post(f"{broker.url}/v1/launches", json=payload, timeout=10).status_code == 401
    wrong = broker.kube.mint_token("airflow", "airflow-worker", audiences=["not-podbroker"])
    response = httpx.post(
        f"{broker.url}/v1/launches",
        json=payload,
        timeout=10,
        headers={"Authorization": f"Bearer {wrong}"},
    )
    assert response.status_code == 401


def test_service_account_token_of_a_worker_can_launch(
    broker: BrokerHandle,
    kube_api: client.ApiClient,
) -> None:
    token = broker.kube.mint_token("airflow", "airflow-worker", audiences=["podbroker"])
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    response = httpx.post(
        f"{broker.url}/v1/launches",
        json=body(dag_id),
        timeout=30,
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 201, response.text
    pod = client.CoreV1Api(kube_api).read_namespaced_pod(
        response.json()["pod_name"], broker.namespace
    )
    assert (
        pod.metadata.annotations["podbroker.dev/caller"]
        == "system:serviceaccount:airflow:airflow-worker"
    )


def test_concurrent_duplicate_requests_make_one_pod(
    broker: BrokerHandle,
    kube_api: client.ApiClient,
) -> None:
    core = client.CoreV1Api(kube_api)
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    payload = body(dag_id, secrets=["warehouse-readonly"], run_seconds=10)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(broker, payload), range(8)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 7 + [201], [r.text for r in responses]
    assert len({r.json()["launch_id"] for r in responses}) == 1
    assert len(pods_of(core, broker.namespace, dag_id)) == 1
    launch_id = responses[0].json()["launch_id"]
    resolved_before = kinds_of(broker, launch_id).count(EventKind.SECRETS_RESOLVED)
    again = post(broker, payload)
    assert again.status_code == 200
    assert again.json()["created"] is False
    # A later retry of the same try reads nothing from Vault: it reattaches.
    after = kinds_of(broker, launch_id)
    assert after.count(EventKind.SECRETS_RESOLVED) == resolved_before
    assert after[-1] == EventKind.LAUNCH_REATTACHED


def test_kill_deletes_pod_and_secret(broker: BrokerHandle, kube_api: client.ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    view = post(broker, body(dag_id, secrets=["warehouse-readonly"], run_seconds=120)).json()
    secret_name = f"podbroker-{view['launch_id']}"
    assert secret_exists(core, broker.namespace, secret_name)
    killed = httpx.delete(
        f"{broker.url}/v1/launches/{view['launch_id']}", headers=broker.headers(), timeout=30
    )
    assert killed.status_code == 200, killed.text
    assert killed.json()["phase"] == "Deleted"
    assert not secret_exists(core, broker.namespace, secret_name)
    assert eventually(lambda: pods_of(core, broker.namespace, dag_id) == [])
    gone = httpx.get(
        f"{broker.url}/v1/launches/{view['launch_id']}", headers=broker.headers(), timeout=10
    )
    assert gone.status_code == 404


def test_logs_are_streamed_from_the_pod(broker: BrokerHandle) -> None:
    view = post(broker, body(f"analytics_etl_{uuid.uuid4().hex[:6]}", run_seconds=3)).json()
    url = f"{broker.url}/v1/launches/{view['launch_id']}/logs"

    def has_logs() -> bool:
        response = httpx.get(url, headers=broker.headers(), timeout=10)
        return response.status_code == 200 and "podbroker-demo: done" in response.text

    assert eventually(has_logs, timeout=20)
    with httpx.stream(
        "GET", url, params={"follow": "true"}, headers=broker.headers(), timeout=30
    ) as stream:
        lines = [line for line in stream.iter_lines() if line]
    assert lines[:3] == [
        "podbroker-demo: connecting to the warehouse",
        "podbroker-demo: loaded 1200 rows",
        "podbroker-demo: done",
    ]


def test_openapi_and_health_endpoints(broker: BrokerHandle) -> None:
    spec = httpx.get(f"{broker.url}/openapi.json", timeout=10).json()
    assert "/v1/launches" in spec["paths"]
    assert httpx.get(f"{broker.url}/healthz", timeout=10).text == "ok"
    assert httpx.get(f"{broker.url}/readyz", timeout=10).json() == {
        "vault": "ok",
        "kubernetes": "ok",
        "audit": "ok",
    }
    metrics = httpx.get(f"{broker.url}/metrics", timeout=10).text
    assert "podbroker_launches_total" in metrics
    assert "podbroker_launch_seconds_bucket" in metrics


def test_a_caller_sees_and_kills_only_launches_of_its_dags(broker: BrokerHandle) -> None:
    other = post(broker, body(f"ml_score_{uuid.uuid4().hex[:6]}", "score", run_seconds=30))
    assert other.status_code == 201, other.text
    url = f"{broker.url}/v1/launches/{other.json()['launch_id']}"
    limited = {"Authorization": f"Bearer {broker.etl_token}"}
    for method, suffix in (("GET", ""), ("GET", "/logs"), ("DELETE", "")):
        response = httpx.request(method, url + suffix, headers=limited, timeout=10)
        assert response.status_code == 403, (method, suffix, response.text)
    denied = httpx.post(
        f"{broker.url}/v1/launches",
        headers=limited,
        timeout=10,
        json=body(f"ml_score_{uuid.uuid4().hex[:6]}", "score"),
    )
    assert denied.status_code == 403
    own = httpx.post(
        f"{broker.url}/v1/launches",
        headers=limited,
        timeout=30,
        json=body(f"analytics_etl_{uuid.uuid4().hex[:6]}"),
    )
    assert own.status_code == 201, own.text
    assert (
        httpx.get(
            f"{broker.url}/v1/launches/{own.json()['launch_id']}", headers=limited, timeout=10
        ).status_code
        == 200
    )
