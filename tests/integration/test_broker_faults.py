"""Fail closed and leave nothing behind: Vault down, an API-server error after the pod
was created and Vault issued a dynamic login, and a broker killed between its two
creates. Each test runs its own broker
with its own OpenBao and task namespace, so stopping parts does not disturb others."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hvac
import pytest
from kubernetes import client

from broker.audit.store import open_audit_store
from broker.core.api_models import ContainerSpec, LaunchRequest
from broker.core.audit_events import AuditEvent, EventKind
from broker.core.models import SecretRequest, TaskIdentity
from broker.core.plan import PlanPolicy, build_plan
from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree
from tests.helpers import eventually
from tests.integration.vault_database import issued_to, lease_alive, token_alive

pytestmark = pytest.mark.stack

# The example catalog's orders-db: PostgreSQL logins under this lease prefix.
DYNAMIC_LEASES = "database/creds/orders-readonly"


@pytest.fixture
def own_broker(
    tmp_path: Path,
    kube: ControlPlane,
    own_vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
    unique: str,
) -> Iterator[BrokerHandle]:
    handle = start_broker(
        tmp_path / "broker", kube, own_vault, postgres, sources, task_namespace=f"tasks-{unique}"
    )
    yield handle
    handle.stop()


def audit_events(broker: BrokerHandle) -> list[AuditEvent]:
    store = open_audit_store(broker.audit_url, create=False)
    with store:
        return list(store.events())


def launch_body(dag_id: str, secrets: list[str], task_id: str = "load") -> dict[str, Any]:
    return {
        "task": {"dag_id": dag_id, "task_id": task_id, "run_id": "r1", "try_number": 1},
        "container": {"image": "python:3.12-slim"},
        "secrets": secrets,
        "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "30s"}},
    }


def broker_objects(core: client.CoreV1Api, namespace: str) -> tuple[list[str], list[str]]:
    selector = "podbroker.dev/managed-by=podbroker"
    pods = [
        p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector=selector).items
    ]
    secrets = [
        s.metadata.name
        for s in core.list_namespaced_secret(namespace, label_selector=selector).items
    ]
    return pods, secrets


def test_vault_down_gives_503_and_creates_nothing(
    own_broker: BrokerHandle,
    own_vault: OpenBao,
    kube_api: client.ApiClient,
) -> None:
    core = client.CoreV1Api(kube_api)
    ok = httpx.post(
        f"{own_broker.url}/v1/launches",
        headers=own_broker.headers(),
        timeout=30,
        json=launch_body("analytics_etl_before", ["warehouse-readonly"]),
    )
    assert ok.status_code == 201, ok.text
    before = broker_objects(core, own_broker.namespace)

    own_vault.stop()
    response = httpx.post(
        f"{own_broker.url}/v1/launches",
        headers=own_broker.headers(),
        timeout=60,
        json=launch_body("analytics_etl_during", ["warehouse-readonly"]),
    )
    assert response.status_code == 503, response.text
    error = response.json()
    assert error["retryable"] is True
    assert error["component"] == "vault"
    assert int(response.headers["Retry-After"]) > 0
    assert eventually(lambda: broker_objects(core, own_broker.namespace) == before, timeout=10)
    ready = httpx.get(f"{own_broker.url}/readyz", timeout=30)
    assert ready.status_code == 503


def test_api_server_error_after_the_pod_is_created_rolls_the_launch_back(
    own_broker: BrokerHandle,
    kube_api: client.ApiClient,
    own_vault: OpenBao,
) -> None:
    """The Secret create fails after Vault issued a dynamic login (a lease under a child
    token) and the pod exists: the pod goes, and Vault's own lookups show the lease and
    the token revoked."""
    core = client.CoreV1Api(kube_api)
    namespace = own_broker.namespace
    root = hvac.Client(url=own_vault.url, token=own_vault.root_token)
    # A real admission failure for the second object: no Secrets may be created here.
    core.create_namespaced_resource_quota(
        namespace,
        client.V1ResourceQuota(
            metadata=client.V1ObjectMeta(name="no-secrets"),
            spec=client.V1ResourceQuotaSpec(hard={"count/secrets": "0"}),
        ),
    )
    assert eventually(
        lambda: core.read_namespaced_resource_quota("no-secrets", namespace).status.hard is not None
    )

    response = httpx.post(
        f"{own_broker.url}/v1/launches",
        headers=own_broker.headers(),
        timeout=60,
        json=launch_body("analytics_etl_quota", ["orders-db"], task_id="extract_orders"),
    )
    assert response.status_code >= 400, response.text
    assert eventually(lambda: broker_objects(core, namespace) == ([], []), timeout=15), (
        "the pod created before the failing Secret create was not rolled back"
    )
    events = [
        e for e in audit_events(own_broker) if e.dag_id == "analytics_etl_quota" and e.launch_id
    ]
    kinds = [(e.kind, e.details.get("stage")) for e in events]
    assert (EventKind.POD_CREATED, None) in kinds
    assert (EventKind.LAUNCH_FAILED, "create_secret") in kinds
    leases, accessor = issued_to(own_broker.audit_url, events[0].launch_id or "")
    assert leases and accessor, "Vault issued nothing: the test did not reach the Secret create"
    assert not any(lease_alive(root, lease) for lease in leases)
    assert not token_alive(root, accessor)
    listed = root.list(f"sys/leases/lookup/{DYNAMIC_LEASES}") or {}
    assert not (listed.get("data") or {}).get("keys"), "a lease of the role is still alive"


def test_reconciler_removes_a_pod_left_without_its_secret(
    own_broker: BrokerHandle,
    kube_api: client.ApiClient,
) -> None:
    """The state a broker killed between its two creates leaves: the pod, no Secret."""
    core = client.CoreV1Api(kube_api)
    namespace = own_broker.namespace
    own_broker.stop()
    request = LaunchRequest(
        task=TaskIdentity(dag_id="analytics_etl_crash", task_id="load", run_id=uuid.uuid4().hex),
        container=ContainerSpec(image="python:3.12-slim"),
        secrets=[SecretRequest(name="warehouse-readonly")],
        scheduling={"annotations": {RUN_DURATION_ANNOTATION: "300s"}},  # type: ignore[arg-type]
    )
    plan = build_plan(
        request,
        PlanPolicy(namespaces=(namespace,), allowed_annotations=("kwok.podbroker.dev/*",)),
        "static:dev",
    )
    core.create_namespaced_pod(
        namespace,
        plan.pod_with_secret_refs({"warehouse-readonly": ["host", "username", "password"]}),
    )
    assert broker_objects(core, namespace)[0] == [plan.pod_name]

    own_broker.restart()  # the start-up sweep runs at once; grace is 5s in this stack
    assert eventually(lambda: broker_objects(core, namespace)[0] == [], timeout=40), (
        "the orphan pod survived the reconciler"
    )
    cleanups = [
        e.details for e in audit_events(own_broker) if e.kind == EventKind.RECONCILER_CLEANUP
    ]
    assert {
        "action": "delete pod without secret",
        "object": f"{namespace}/{plan.pod_name}",
    } in cleanups


def test_an_orphaned_secret_is_deleted_and_its_database_lease_revoked(
    own_broker: BrokerHandle,
    own_vault: OpenBao,
    kube_api: client.ApiClient,
) -> None:
    """A Secret whose pod vanished while no broker watched (its owner link gone, so the
    garbage collector keeps it): the sweep deletes it AND revokes the lease it names."""
    core = client.CoreV1Api(kube_api)
    namespace = own_broker.namespace
    response = httpx.post(
        f"{own_broker.url}/v1/launches",
        headers=own_broker.headers(),
        timeout=30,
        json={
            "task": {
                "dag_id": "analytics_etl_orphan",
                "task_id": "extract_orders",
                "run_id": uuid.uuid4().hex,
            },
            "container": {"image": "python:3.12-slim"},
            "secrets": ["orders-db"],
            "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "300s"}},
        },
    )
    assert response.status_code == 201, response.text
    view = response.json()
    secret_name = f"podbroker-{view['launch_id']}"
    lease_id = core.read_namespaced_secret(secret_name, namespace).metadata.annotations[
        "podbroker.dev/lease-ids"
    ]
    root = hvac.Client(url=own_vault.url, token=own_vault.root_token)
    assert root.sys.read_lease(lease_id)["data"]["id"] == lease_id

    own_broker.stop()
    core.patch_namespaced_secret(secret_name, namespace, {"metadata": {"ownerReferences": None}})
    core.delete_namespaced_pod(view["pod_name"], namespace, grace_period_seconds=0)
    assert eventually(lambda: broker_objects(core, namespace)[0] == [], timeout=30)
    assert broker_objects(core, namespace)[1] == [secret_name]

    own_broker.restart()  # start-up sweep; orphan grace is 5s in this stack

    def lease_revoked() -> bool:
        try:
            root.sys.read_lease(lease_id)
        except hvac.exceptions.InvalidRequest:
            return True
        return False

    assert eventually(lambda: broker_objects(core, namespace)[1] == [], timeout=40)
    assert eventually(lease_revoked, timeout=10), "the orphan's database lease survived"

    def revocations() -> list[dict[str, object]]:
        return [
            e.details
            for e in audit_events(own_broker)
            if e.kind == EventKind.LEASES_REVOKED and e.launch_id == view["launch_id"]
        ]

    # Recorded once revoked (revocation never waits for the audit store): wait for it.
    assert eventually(lambda: bool(revocations()), timeout=10)
    assert revocations()[-1]["revoked"] is True
