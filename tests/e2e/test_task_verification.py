"""Need-to-know per task instance on the real stack: a broker with
``airflow.verification: enforce`` asks Airflow's own API server (the `airflow_api`
fixture, over the database `airflow dags test` writes) about every launch. Only the
running task instance itself obtains secrets, in an image its grant lists; forged
identities (even one naming another DAG's live running task instance), an ended task
instance, a pod that is not the task's host and an image outside the grant get 403 and
nothing is created (no pod, no Secret, nothing in the holdings ledger, no lease); a
differing second launch of a running try is a 409; a task instance marked failed in
Airflow loses its pod and its database lease (checked in Vault), while a running one
whose record lies on a later page of Airflow's answer keeps its pod."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hvac
import pytest
from hvac.exceptions import InvalidPath, InvalidRequest
from kubernetes import client

from broker.audit.store import open_audit_store
from broker.core.audit_events import AuditEvent, EventKind
from podbroker_devstack.airflow_api import AirflowApi
from podbroker_devstack.broker_env import (
    AIRFLOW_NAMESPACE,
    TOKEN_AUDIENCE,
    WORKER_SERVICE_ACCOUNT,
    BrokerHandle,
)
from tests.e2e.test_airflow_broker import latest_ti, with_connection
from tests.helpers import eventually

pytestmark = [pytest.mark.stack, pytest.mark.airflow]

AIRFLOW = Path(sys.executable).parent / "airflow"
QUICK_DAG = "analytics_etl_verify_e2e_quick"
LONG_DAG = "analytics_etl_verify_e2e_long"
PAGED_DAG = "analytics_etl_verify_e2e_paged"
SYNC_DAG = "payments_provider_sync"
PINNED = "ghcr.io/example/payments-sync@sha256:" + "ab" * 32
"""The one image policies/teams/payments.yaml lets receive payments-api."""
ORDERS_LEASES = "database/creds/orders-readonly/"
RELEASE_FILE = "PODBROKER_E2E_RELEASE_FILE"  # the payments_provider_sync task waits for it


@pytest.fixture(scope="module")
def env(airflow_env: dict[str, str], verified_broker: BrokerHandle) -> dict[str, str]:
    return with_connection(airflow_env, verified_broker)


@pytest.fixture(scope="module")
def running_sync(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A genuine running task instance of payments_provider_sync (Airflow says
    running) that has launched nothing: its task waits for a release file."""
    release = tmp_path_factory.mktemp("sync") / "release"
    runner = subprocess.Popen(
        [str(AIRFLOW), "dags", "test", SYNC_DAG],
        env={**env, RELEASE_FILE: str(release)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:

        def running() -> bool:
            try:
                return latest_ti(env, SYNC_DAG)["state"] == "running"
            except AssertionError:  # no run yet
                return False

        assert eventually(running, timeout=180), "payments_provider_sync never ran"
        yield latest_ti(env, SYNC_DAG)
    finally:
        release.touch()
        try:
            runner.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGTERM)
            runner.wait(60)


@pytest.fixture
def core(verified_broker: BrokerHandle) -> Iterator[client.CoreV1Api]:
    with verified_broker.kube.api_client() as api:
        yield client.CoreV1Api(api)


def identity_of(ti: dict[str, Any], **changes: Any) -> dict[str, Any]:
    task = {
        "dag_id": ti["dag_id"],
        "task_id": ti["task_id"],
        "run_id": ti["run_id"],
        "try_number": ti["try_number"],
        "map_index": ti["map_index"],
        "ti_id": str(uuid.UUID(str(ti["id"]))),
    }
    task.update(changes)
    return task


def launch(
    broker: BrokerHandle,
    task: dict[str, Any],
    secrets: list[str],
    *,
    token: str | None = None,
    image: str = "python:3.12-slim",
    timeout: float = 30,
) -> httpx.Response:
    return httpx.post(
        f"{broker.url}/v1/launches",
        json={
            "task": task,
            "container": {"image": image},
            "secrets": secrets,
            "namespace": broker.namespace,
        },
        headers={"Authorization": f"Bearer {token or broker.token}"},
        timeout=timeout,
    )


def audit_events(broker: BrokerHandle) -> list[AuditEvent]:
    with open_audit_store(broker.audit_url, create=False) as store:
        return list(store.events())


def broker_pods(core: client.CoreV1Api, namespace: str, dag_id: str) -> list[client.V1Pod]:
    return core.list_namespaced_pod(namespace, label_selector=f"dag_id={dag_id}").items


def footprint(
    core: client.CoreV1Api, broker: BrokerHandle, vault_root: hvac.Client
) -> dict[str, set[str]]:
    """What launches leave behind: pods and Secrets in the broker's task namespace,
    launches in its holdings ledger, and database leases in Vault."""
    with sqlite3.connect(broker.audit_url.removeprefix("sqlite:///")) as db:
        held = {row[0] for row in db.execute("SELECT launch_id FROM launch_holdings")}
    try:
        leases = set(vault_root.sys.list_leases(ORDERS_LEASES)["data"]["keys"])
    except InvalidPath:  # none at all
        leases = set()
    namespace = broker.namespace
    return {
        "pods": {p.metadata.name for p in core.list_namespaced_pod(namespace).items},
        "secrets": {s.metadata.name for s in core.list_namespaced_secret(namespace).items},
        "holdings": held,
        "leases": leases,
    }


def created_since(before: dict[str, set[str]], after: dict[str, set[str]]) -> dict[str, set[str]]:
    """What is new (earlier launches may end meanwhile: only additions count)."""
    return {kind: after[kind] - before[kind] for kind in before if after[kind] - before[kind]}


def last_decision(broker: BrokerHandle, dag_id: str) -> AuditEvent:
    decisions = [
        e for e in audit_events(broker) if e.kind == EventKind.DECISION and e.dag_id == dag_id
    ]
    assert decisions, f"no decision recorded for {dag_id}"
    return decisions[-1]


def test_the_genuine_task_instance_gets_its_secrets(
    env: dict[str, str],
    verified_broker: BrokerHandle,
    core: client.CoreV1Api,
    vault_root: hvac.Client,
) -> None:
    run = subprocess.run(
        [str(AIRFLOW), "dags", "test", QUICK_DAG],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    ti = latest_ti(env, QUICK_DAG)
    assert ti["state"] == "success", (run.stdout + run.stderr)[-4000:]
    checks = [
        e.details["verification"]
        for e in audit_events(verified_broker)
        if e.kind == EventKind.DECISION and e.dag_id == QUICK_DAG
    ]
    assert checks and checks[-1] == {"verdict": "enforce", "ok": True, "reason": None}

    # The same identity after the task ended is no longer a running task instance.
    before = footprint(core, verified_broker, vault_root)
    late = launch(verified_broker, identity_of(ti), ["warehouse-readonly"])
    assert late.status_code == 403, late.text
    assert "not running" in late.json()["reason"]
    assert created_since(before, footprint(core, verified_broker, vault_root)) == {}


FORGERIES: dict[str, dict[str, Any]] = {
    "unknown-dag": {"dag_id": "analytics_etl_verify_e2e_never_ran"},
    "wrong-try": {"try_number": 7},
    "wrong-id": {"ti_id": "0199ffff-0000-7000-8000-000000000000"},
    "no-id": {"ti_id": None},
}


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("another-dag", "id does not match"),
        ("unknown-dag", "has no task instance"),
        ("wrong-try", "is not the current try"),
        ("wrong-id", "id does not match"),
        ("no-id", "no task instance id"),
    ],
)
def test_forged_identities_get_403_and_nothing_is_created(
    env: dict[str, str],
    verified_broker: BrokerHandle,
    running_sync: dict[str, Any],
    core: client.CoreV1Api,
    vault_root: hvac.Client,
    case: str,
    reason: str,
) -> None:
    own = latest_ti(env, QUICK_DAG)
    secrets, image = ["warehouse-readonly"], "python:3.12-slim"
    if case == "another-dag":
        # A live running task instance of another DAG, its own secret, the approved
        # image: only the task instance id (the caller's own) gives the claim away.
        forged = identity_of(running_sync, ti_id=identity_of(own)["ti_id"])
        secrets, image = ["payments-api"], PINNED
    else:
        forged = identity_of(own, **FORGERIES[case])
    before = footprint(core, verified_broker, vault_root)
    response = launch(verified_broker, forged, secrets, image=image)
    assert response.status_code == 403, response.text
    body = response.json()
    assert reason in body["reason"] and body["denied_secrets"] == secrets
    assert created_since(before, footprint(core, verified_broker, vault_root)) == {}
    assert last_decision(verified_broker, forged["dag_id"]).details["allowed"] is False


def test_an_image_outside_its_grant_gets_403_for_the_running_task_instance(
    verified_broker: BrokerHandle,
    running_sync: dict[str, Any],
    core: client.CoreV1Api,
    vault_root: hvac.Client,
) -> None:
    genuine = identity_of(running_sync)
    before = footprint(core, verified_broker, vault_root)
    # The approved repository by tag: not the digest the grant pins.
    tagged = launch(
        verified_broker, genuine, ["payments-api"], image="ghcr.io/example/payments-sync:latest"
    )
    assert tagged.status_code == 403, tagged.text
    body = tagged.json()
    assert body["denied_secrets"] == ["payments-api"]
    assert f"allow only images {PINNED}" in body["reason"]
    assert created_since(before, footprint(core, verified_broker, vault_root)) == {}
    decided = last_decision(verified_broker, SYNC_DAG).details
    # Airflow confirmed the task instance: the image alone was refused.
    assert decided["allowed"] is False
    assert decided["verification"] == {"verdict": "enforce", "ok": True, "reason": None}

    # The pinned digest, for the same running task instance, gets the secret.
    pinned = launch(verified_broker, genuine, ["payments-api"], image=PINNED)
    assert pinned.status_code == 201, pinned.text


def bound_worker_token(core: client.CoreV1Api, pod_name: str) -> str:
    """A worker ServiceAccount token bound to a pod of that name (what a projected
    token in that pod holds): TokenReview names the pod in its extras."""
    pod = core.create_namespaced_pod(
        AIRFLOW_NAMESPACE,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod_name},
            "spec": {
                "serviceAccountName": WORKER_SERVICE_ACCOUNT,
                "containers": [{"name": "w", "image": "python:3.12-slim"}],
            },
        },
    )
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=[TOKEN_AUDIENCE],
            expiration_seconds=600,
            bound_object_ref=client.V1BoundObjectReference(
                kind="Pod", api_version="v1", name=pod_name, uid=pod.metadata.uid
            ),
        )
    )
    token = core.create_namespaced_service_account_token(
        WORKER_SERVICE_ACCOUNT, AIRFLOW_NAMESPACE, request
    )
    return str(token.status.token)


def test_a_running_task_is_guarded_and_ended_with_its_task_instance(
    env: dict[str, str],
    verified_broker: BrokerHandle,
    airflow_api: AirflowApi,
    core: client.CoreV1Api,
    vault_root: hvac.Client,
) -> None:
    runner = subprocess.Popen(
        [str(AIRFLOW), "dags", "test", LONG_DAG],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert eventually(
            lambda: bool(broker_pods(core, verified_broker.namespace, LONG_DAG)), timeout=120
        ), "the long task's pod never appeared"
        ti = latest_ti(env, LONG_DAG)
        assert ti["state"] == "running"
        genuine = identity_of(ti)

        # A differing second launch of the running try is a conflict, never a reattach.
        other = launch(verified_broker, genuine, ["orders-db"], image="attacker/tools:latest")
        assert other.status_code == 409, other.text
        assert len(broker_pods(core, verified_broker.namespace, LONG_DAG)) == 1

        # A worker token bound to a pod that is not the task instance's host: refused.
        impostor = f"impostor-{uuid.uuid4().hex[:6]}"
        token = bound_worker_token(core, impostor)
        before = footprint(core, verified_broker, vault_root)
        refused = launch(verified_broker, genuine, ["orders-db"], token=token)
        assert refused.status_code == 403, refused.text
        assert "is not the host" in refused.json()["reason"]
        assert created_since(before, footprint(core, verified_broker, vault_root)) == {}
        core.delete_namespaced_pod(impostor, AIRFLOW_NAMESPACE)

        # The lease the genuine launch holds, as the audit trail recorded it.
        resolved = [
            e
            for e in audit_events(verified_broker)
            if e.kind == EventKind.SECRETS_RESOLVED and e.dag_id == LONG_DAG
        ]
        lease_id = resolved[-1].details["secrets"][0]["lease_id"]
        assert vault_root.sys.read_lease(lease_id)["data"]["id"] == lease_id

        # Airflow marks the task instance failed: the broker ends its pod and lease.
        admin = airflow_api.token("admin")
        patched = httpx.patch(
            f"{airflow_api.url}/api/v2/dags/{LONG_DAG}/dagRuns/{ti['run_id']}"
            f"/taskInstances/{ti['task_id']}",
            json={"new_state": "failed"},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        )
        assert patched.status_code == 200, patched.text
        assert eventually(
            lambda: not broker_pods(core, verified_broker.namespace, LONG_DAG), timeout=90
        ), "the pod of a failed task instance kept running"

        def lease_gone() -> bool:
            try:
                vault_root.sys.read_lease(lease_id)
            except InvalidRequest:
                return True
            return False

        assert eventually(lease_gone, timeout=30), "its database lease is still alive"
        killed = [
            e
            for e in audit_events(verified_broker)
            if e.kind == EventKind.LAUNCH_KILLED and e.dag_id == LONG_DAG
        ]
        assert killed and "task instance ended in Airflow" in killed[-1].details["reason"]
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGTERM)
        runner.wait(60)


def airflow_list_calls(broker: BrokerHandle) -> float:
    """How many times the broker's reconciler has asked Airflow for its running launches'
    task instances (one per sweep, however many pages), from the broker's /metrics."""
    metric = 'podbroker_airflow_call_seconds_count{operation="list_task_instances"}'
    for line in httpx.get(f"{broker.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(metric):
            return float(line.split()[-1])
    return 0.0


def test_a_running_launch_on_a_later_page_of_airflows_answer_keeps_its_pod(
    env: dict[str, str],
    verified_broker: BrokerHandle,
    airflow_api: AirflowApi,
    core: client.CoreV1Api,
) -> None:
    runner = subprocess.Popen(
        [str(AIRFLOW), "dags", "test", PAGED_DAG],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    namespace = verified_broker.namespace

    def long_pods() -> list[client.V1Pod]:
        return [
            p
            for p in broker_pods(core, namespace, PAGED_DAG)
            if p.metadata.labels.get("map_index") == "3"
            and p.status.phase == "Running"
            and p.metadata.deletion_timestamp is None
        ]

    try:
        assert eventually(lambda: bool(long_pods()), timeout=180), "map index 3 never ran"
        (pod,) = long_pods()
        run_id = latest_ti(env, PAGED_DAG)["run_id"]
        viewer = {"Authorization": f"Bearer {airflow_api.token('podbroker')}"}
        ti = httpx.get(
            f"{airflow_api.url}/api/v2/dags/{PAGED_DAG}/dagRuns/{run_id}/taskInstances/load_part/3",
            headers=viewer,
            timeout=30,
        ).json()
        assert ti["state"] == "running"

        # Airflow's answer to the broker's question, 2 per page: four task instances
        # (map indexes 0-3), the running one not on the first page.
        first_page = httpx.post(
            f"{airflow_api.url}/api/v2/dags/~/dagRuns/~/taskInstances/list",
            json={
                "dag_ids": [PAGED_DAG],
                "dag_run_ids": [run_id],
                "task_ids": ["load_part"],
                "order_by": "id",
                "page_limit": 2,
            },
            headers=viewer,
            timeout=30,
        ).json()
        assert first_page["total_entries"] == 4
        assert ti["id"] not in {t["id"] for t in first_page["task_instances"]}

        # Enough sweeps after the pod ran that a launch taken for "no longer exists"
        # would have been killed (grace 5 s, a sweep every 5 s; the fourth call comes
        # after the third sweep has finished acting).
        seen = airflow_list_calls(verified_broker)
        assert eventually(
            lambda: airflow_list_calls(verified_broker) >= seen + 4 or not long_pods(),
            timeout=120,
        ), "the reconciler stopped asking Airflow"
        killed = [
            e.details["reason"]
            for e in audit_events(verified_broker)
            if e.kind == EventKind.LAUNCH_KILLED and e.dag_id == PAGED_DAG
        ]
        assert killed == []
        assert [p.metadata.uid for p in long_pods()] == [pod.metadata.uid]

        # Its record on the later page is read: marked failed there, the pod is ended.
        admin = airflow_api.token("admin")
        patched = httpx.patch(
            f"{airflow_api.url}/api/v2/dags/{PAGED_DAG}/dagRuns/{run_id}/taskInstances/load_part/3",
            json={"new_state": "failed"},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        )
        assert patched.status_code == 200, patched.text
        assert eventually(lambda: not long_pods(), timeout=90), "the failed task kept its pod"
        killed = [
            e
            for e in audit_events(verified_broker)
            if e.kind == EventKind.LAUNCH_KILLED and e.dag_id == PAGED_DAG
        ]
        assert killed and killed[-1].details["reason"] == (
            "task instance ended in Airflow: its task instance is failed in Airflow"
        )
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGTERM)
        runner.wait(60)


def test_airflow_unreachable_is_a_retryable_503(
    verified_broker: BrokerHandle, airflow_api: AirflowApi
) -> None:
    task = {
        "dag_id": f"analytics_etl_verify_e2e_{uuid.uuid4().hex[:6]}",
        "task_id": "load",
        "run_id": "manual__x",
        "try_number": 1,
        "ti_id": str(uuid.uuid4()),
    }
    os.killpg(airflow_api.process.pid, signal.SIGSTOP)
    try:
        response = launch(verified_broker, task, ["warehouse-readonly"], timeout=60)
    finally:
        os.killpg(airflow_api.process.pid, signal.SIGCONT)
    assert response.status_code == 503, response.text
    assert response.json()["component"] == "airflow"
    assert int(response.headers["Retry-After"]) > 0
