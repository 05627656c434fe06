"""Hung dependencies do not hang requests (issue 12, item 11): with the API server or the
audit database frozen (SIGSTOP), launch and status answer 503 with Retry-After within
seconds and /readyz says not ready; after SIGCONT the broker recovers. Input that can
never succeed (a pod too large for the API server) is a 4xx, never a retryable 503."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hvac
import psycopg
import pytest
from kubernetes import client

from broker.audit.store import open_audit_store
from broker.core.audit_events import EventKind
from broker.core.podmeta import LAUNCH_ID_LABEL
from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres, start_postgres
from podbroker_devstack.procs import ManagedProcess
from podbroker_devstack.sources import SourceTree
from tests.chaos.faults import frozen
from tests.helpers import eventually
from tests.integration.vault_database import issued_to, lease_alive, token_alive

pytestmark = pytest.mark.stack

# Kubernetes read timeout in this broker; the audit store's own deadline is 8 s.
KUBE_TIMEOUT = 3
PROMPT = 12.0
"""A 503 must come within this many seconds (a hung call used to take 40 s or more)."""


def apiserver(kube: ControlPlane) -> ManagedProcess:
    return next(p for p in kube.processes if p.name == "kube-apiserver")


@pytest.fixture(scope="module")
def orders_postgres(stack_folder: Path) -> Iterator[Postgres]:
    """The PostgreSQL behind the dynamic orders-db logins, apart from the audit database
    these tests freeze, as in production (Vault revokes a login on the team's database,
    not on the broker's; with one server frozen for both, no revocation could finish)."""
    # (the stack folder, which PostgreSQL's own user may enter)
    server = start_postgres(stack_folder / f"orders-postgres-{uuid.uuid4().hex[:6]}")
    yield server
    server.stop()


@pytest.fixture
def pg_broker(
    tmp_path: Path,
    kube: ControlPlane,
    own_vault: OpenBao,
    postgres: Postgres,
    orders_postgres: Postgres,
    sources: SourceTree,
    unique: str,
) -> Iterator[BrokerHandle]:
    """A broker of its own whose audit store is a PostgreSQL database of its own."""
    database = f"audit_hang_{unique}"
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    handle = start_broker(
        tmp_path / "broker",
        kube,
        own_vault,
        orders_postgres,
        sources,
        task_namespace=f"hang-{unique}",
        extra_settings={
            "audit": {"url": postgres.url(database)},
            "kubernetes": {"request_timeout_seconds": KUBE_TIMEOUT},
        },
    )
    yield handle
    handle.stop()


def launch_body(
    dag_id: str, *, wanted: str = "warehouse-readonly", task_id: str = "load", **container: Any
) -> dict[str, Any]:
    return {
        "task": {"dag_id": dag_id, "task_id": task_id, "run_id": uuid.uuid4().hex},
        "container": {"image": "python:3.12-slim", **container},
        "secrets": [wanted],
        "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "300s"}},
    }


def timed(
    method: str, url: str, broker: BrokerHandle, **kwargs: Any
) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.request(method, url, headers=broker.headers(), timeout=60, **kwargs)
    return response, time.monotonic() - started


def assert_prompt_503(response: httpx.Response, took: float, component: str) -> None:
    assert response.status_code == 503, response.text
    assert took < PROMPT, f"took {took:.1f}s"
    assert response.json()["retryable"] is True
    assert response.json()["component"] == component
    assert int(response.headers["Retry-After"]) > 0


def test_a_frozen_api_server_gives_prompt_503s_and_readyz_tells_the_truth(
    pg_broker: BrokerHandle, kube: ControlPlane
) -> None:
    first = httpx.post(
        f"{pg_broker.url}/v1/launches",
        headers=pg_broker.headers(),
        timeout=30,
        json=launch_body("analytics_etl_hang_k8s_a"),
    )
    assert first.status_code == 201, first.text
    launch_id = first.json()["launch_id"]

    with frozen(apiserver(kube)):
        launch, took = timed(
            "POST", f"{pg_broker.url}/v1/launches", pg_broker, json=launch_body("analytics_etl_b")
        )
        assert_prompt_503(launch, took, "kubernetes")
        status, took = timed("GET", f"{pg_broker.url}/v1/launches/{launch_id}", pg_broker)
        assert_prompt_503(status, took, "kubernetes")
        ready, took = timed("GET", f"{pg_broker.url}/readyz", pg_broker)
        assert ready.status_code == 503 and took < PROMPT

    assert eventually(
        lambda: httpx.get(f"{pg_broker.url}/readyz", timeout=30).status_code == 200, timeout=30
    )
    again = httpx.get(
        f"{pg_broker.url}/v1/launches/{launch_id}", headers=pg_broker.headers(), timeout=30
    )
    assert again.status_code == 200, again.text


def sweep_errors(broker: BrokerHandle) -> float:
    text = httpx.get(f"{broker.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("podbroker_sweep_errors_total "):
            return float(line.split()[1])
    return 0.0


def test_a_sweep_during_an_api_server_freeze_leaves_running_launches_their_leases(
    pg_broker: BrokerHandle, kube: ControlPlane, own_vault: OpenBao
) -> None:
    """A sweep that cannot list the pods must not take every launch for ended and
    revoke its holdings (make chaos found running pods left with revoked logins)."""
    root = hvac.Client(url=own_vault.url, token=own_vault.root_token)
    launched = httpx.post(
        f"{pg_broker.url}/v1/launches",
        headers=pg_broker.headers(),
        timeout=30,
        json=launch_body(
            "analytics_etl_sweep_frozen", wanted="orders-db", task_id="extract_orders"
        ),
    )
    assert launched.status_code == 201, launched.text
    leases, accessor = issued_to(pg_broker.audit_url, launched.json()["launch_id"])
    assert leases and accessor
    # Past the orphan grace (5 s here), a ledger record whose pod is not seen is revoked.
    time.sleep(6)
    before = sweep_errors(pg_broker)
    with frozen(apiserver(kube)):
        # A whole sweep pass that failed to list the pods (counted at its end).
        assert eventually(lambda: sweep_errors(pg_broker) > before, timeout=60)
    assert all(lease_alive(root, lease) for lease in leases), "a running launch lost its lease"
    assert token_alive(root, accessor)


def test_a_frozen_audit_database_gives_prompt_503s(
    pg_broker: BrokerHandle, postgres: Postgres
) -> None:
    with frozen(postgres.process):
        launch, took = timed(
            "POST", f"{pg_broker.url}/v1/launches", pg_broker, json=launch_body("analytics_etl_c")
        )
        assert_prompt_503(launch, took, "audit")
        ready, took = timed("GET", f"{pg_broker.url}/readyz", pg_broker)
        assert ready.status_code == 503 and took < PROMPT

    assert eventually(
        lambda: httpx.get(f"{pg_broker.url}/readyz", timeout=30).status_code == 200, timeout=40
    )
    after = httpx.post(
        f"{pg_broker.url}/v1/launches",
        headers=pg_broker.headers(),
        timeout=30,
        json=launch_body("analytics_etl_hang_db_after"),
    )
    assert after.status_code == 201, after.text


def test_a_kill_does_not_wait_for_a_frozen_audit_database(
    pg_broker: BrokerHandle, postgres: Postgres, own_vault: OpenBao, kube_api: client.ApiClient
) -> None:
    """Issue 12 item 10: a kill is not refused (nor held) while the audit store is down;
    it is recorded afterwards. The launch holds a dynamic login: Vault's lookups show
    its lease and child token revoked, and the pod and its Secret go."""
    root = hvac.Client(url=own_vault.url, token=own_vault.root_token)
    launched = httpx.post(
        f"{pg_broker.url}/v1/launches",
        headers=pg_broker.headers(),
        timeout=30,
        json=launch_body("analytics_etl_kill_frozen", wanted="orders-db", task_id="extract_orders"),
    )
    assert launched.status_code == 201, launched.text
    view = launched.json()
    leases, accessor = issued_to(pg_broker.audit_url, view["launch_id"])
    assert leases and accessor and all(lease_alive(root, lease) for lease in leases)
    with frozen(postgres.process):
        killed, took = timed(
            "DELETE", f"{pg_broker.url}/v1/launches/{view['launch_id']}", pg_broker
        )
        assert killed.status_code == 200, killed.text
        assert took < PROMPT, f"took {took:.1f}s"
        # Given back while the store is still frozen (from the Secret's record).
        assert eventually(
            lambda: not any(lease_alive(root, lease) for lease in leases), timeout=30
        ), "the lease outlived the kill"
        assert not token_alive(root, accessor)

    core = client.CoreV1Api(kube_api)
    selector = f"{LAUNCH_ID_LABEL}={view['launch_id']}"

    def gone() -> bool:
        pods = core.list_namespaced_pod(pg_broker.namespace, label_selector=selector).items
        secrets = core.list_namespaced_secret(pg_broker.namespace, label_selector=selector).items
        return not pods and not secrets

    assert eventually(gone, timeout=60), "the pod or its Secret outlived the kill"

    def recorded() -> bool:
        with open_audit_store(pg_broker.audit_url, create=False) as store:
            return any(
                e.kind == EventKind.LAUNCH_KILLED and e.launch_id == view["launch_id"]
                for e in store.events()
            )

    assert eventually(recorded, timeout=60), "the kill was never recorded"


@pytest.mark.parametrize("size_mib", [2, 4])
def test_a_pod_too_large_for_the_api_server_is_a_4xx(
    pg_broker: BrokerHandle, size_mib: int
) -> None:
    """2 MiB passes the API server's body limit but not etcd's; 4 MiB passes neither."""
    response = httpx.post(
        f"{pg_broker.url}/v1/launches",
        headers=pg_broker.headers(),
        timeout=60,
        json=launch_body(f"analytics_etl_big_{size_mib}", args=["x" * (size_mib << 20)]),
    )
    assert 400 <= response.status_code < 500, response.text[:500]
    assert response.json()["retryable"] is False
