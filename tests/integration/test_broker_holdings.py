"""Nothing issued without a way back (issue 12 item 2), on the real stack: what a launch
holds in Vault is in the broker's ledger before values are used, and every failure path
gives it back: a launch refused after Vault was read, and a pod (with its Secret, taken
by the garbage collector) deleted while the broker was down. Vault's own lease lookups
are the judge."""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hvac
import pytest
from hvac.exceptions import InvalidRequest
from kubernetes import client

from broker.audit.store import open_audit_store
from broker.core.models import TaskIdentity
from broker.core.plan import launch_id_for
from broker.core.podmeta import holdings_of
from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree
from tests.helpers import eventually
from tests.integration.vault_database import lease_alive, token_alive

pytestmark = pytest.mark.stack


@pytest.fixture
def own_broker(
    tmp_path: Path,
    kube: ControlPlane,
    vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
    unique: str,
) -> Iterator[BrokerHandle]:
    handle = start_broker(
        tmp_path / "broker", kube, vault, postgres, sources, task_namespace=f"hold-{unique}"
    )
    yield handle
    handle.stop()


def ledger_row(broker: BrokerHandle, launch_id: str) -> dict[str, Any]:
    path = broker.audit_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        row = db.execute(
            "SELECT * FROM launch_holdings WHERE launch_id = ?", (launch_id,)
        ).fetchone()
    assert row is not None, f"no ledger record of {launch_id}"
    return dict(row)


def ledger_rows(broker: BrokerHandle) -> list[dict[str, Any]]:
    path = broker.audit_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM launch_holdings").fetchall()]


def launch(
    broker: BrokerHandle, dag_id: str, secrets: list[Any], **container: Any
) -> httpx.Response:
    return httpx.post(
        f"{broker.url}/v1/launches",
        json={
            "task": {
                "dag_id": dag_id,
                "task_id": "extract_orders",
                "run_id": f"manual__{uuid.uuid4().hex[:8]}",
                "try_number": 1,
            },
            "container": {"image": "python:3.12-slim", **container},
            "secrets": secrets,
            "namespace": broker.namespace,
            "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "300s"}},
        },
        headers=broker.headers(),
        timeout=30,
    )


def test_a_launch_refused_after_vault_was_read_gives_everything_back(
    own_broker: BrokerHandle, vault_root: hvac.Client
) -> None:
    # warehouse-loader's keys are not in the catalog: they are learnt by reading it, and
    # with orders-db's prefix they collide with orders-db's variables (found only then).
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    response = launch(
        own_broker,
        dag_id,
        [
            "orders-db",
            {"name": "warehouse-loader", "delivery": {"type": "env", "prefix": "ORDERS_DB_"}},
        ],
    )
    assert response.status_code == 422, response.text
    (row,) = ledger_rows(own_broker)
    assert row["token_accessor"]
    leases = json.loads(row["lease_ids"])
    assert leases, "the database lease was recorded before the values were used"
    assert row["released_at"] is not None
    assert not any(lease_alive(vault_root, lease) for lease in leases)
    assert not token_alive(vault_root, row["token_accessor"])


def test_holdings_of_a_pod_deleted_while_the_broker_was_down_are_revoked(
    own_broker: BrokerHandle, kube_api: client.ApiClient, vault_root: hvac.Client
) -> None:
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    response = launch(own_broker, dag_id, ["orders-db"])
    assert response.status_code == 201, response.text
    view = response.json()
    row = ledger_row(own_broker, view["launch_id"])
    (lease_id,) = json.loads(row["lease_ids"])
    assert lease_alive(vault_root, lease_id)

    own_broker.process.stop()  # the broker is down ...
    core = client.CoreV1Api(kube_api)
    core.delete_namespaced_pod(view["pod_name"], own_broker.namespace, grace_period_seconds=0)
    secret = f"podbroker-{view['launch_id']}"

    def secret_gone() -> bool:
        names = [s.metadata.name for s in core.list_namespaced_secret(own_broker.namespace).items]
        return secret not in names

    # ... and the garbage collector takes the Secret (its annotations named the lease).
    assert eventually(secret_gone, timeout=60), "the garbage collector kept the Secret"
    assert lease_alive(vault_root, lease_id)

    own_broker.restart()
    assert eventually(lambda: not lease_alive(vault_root, lease_id), timeout=60), (
        "the lease outlived its pod"
    )
    assert not token_alive(vault_root, row["token_accessor"])
    assert ledger_row(own_broker, view["launch_id"])["released_at"] is not None


def try_body(broker: BrokerHandle, dag_id: str, run_id: str) -> dict[str, Any]:
    """One task try of the sequential kind: warehouse-loader's keys are learnt by
    reading it, so Vault (a lease under a child token) is read before the pod exists."""
    return {
        "task": {
            "dag_id": dag_id,
            "task_id": "extract_orders_all",
            "run_id": run_id,
            "try_number": 1,
        },
        "container": {"image": "python:3.12-slim"},
        "secrets": ["orders-db", "warehouse-loader"],
        "namespace": broker.namespace,
        "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "300s"}},
    }


def tokens_of(vault_root: hvac.Client, launch_id: str) -> list[str]:
    """Accessors of live tokens whose metadata names ``launch_id`` (child tokens)."""
    found = []
    for accessor in (vault_root.list("auth/token/accessors") or {}).get("data", {}).get("keys", []):
        try:
            meta = vault_root.auth.token.lookup_accessor(accessor)["data"].get("meta") or {}
        except InvalidRequest:
            continue
        if meta.get("launch_id") == launch_id:
            found.append(accessor)
    return found


def test_a_try_retried_after_a_crash_waits_for_the_first_attempts_token_to_go_back(
    own_broker: BrokerHandle, vault_root: hvac.Client
) -> None:
    """A broker killed after recording its child token and before the pod leaves that
    token in the ledger; the operator retries the same try, under the same launch id.
    The retry is refused (503, retry) until the sweep has given that token back, then
    launches; once killed, no token issued to the launch is alive. (Regression: the
    retry overwrote the first token's record, and that token outlived everything.)"""
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    body = try_body(own_broker, dag_id, f"manual__{uuid.uuid4().hex[:8]}")
    launch_id = launch_id_for(TaskIdentity.model_validate(body["task"]), own_broker.namespace)
    # What the killed attempt left: a child token (a stand-in, tagged as the broker tags
    # its own) recorded against the launch, and no pod.
    earlier = vault_root.auth.token.create(
        policies=["default"], meta={"launch_id": launch_id, "dag_id": dag_id}, ttl="15m"
    )["auth"]["accessor"]
    with open_audit_store(own_broker.audit_url, create=False) as store:
        store.holdings().hold(launch_id, own_broker.namespace, token_accessor=earlier)

    def launch() -> httpx.Response:
        return httpx.post(
            f"{own_broker.url}/v1/launches", json=body, headers=own_broker.headers(), timeout=30
        )

    refused = launch()
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] and "still launching" in refused.json()["reason"]
    # Nothing minted for the retry (the sweep may already have given the earlier back
    # while the retry waited for a pod of the attempt that held the try).
    assert set(tokens_of(vault_root, launch_id)) <= {earlier}
    answers: list[httpx.Response] = []

    def launched() -> bool:
        answers.append(launch())
        return answers[-1].status_code == 201

    assert eventually(launched, timeout=60, interval=2), answers[-1].text
    assert answers[-1].json()["launch_id"] == launch_id
    assert not token_alive(vault_root, earlier)  # the sweep gave it back first
    killed = httpx.delete(
        f"{own_broker.url}/v1/launches/{launch_id}", headers=own_broker.headers(), timeout=30
    )
    assert killed.status_code == 200, killed.text
    assert eventually(lambda: not tokens_of(vault_root, launch_id), timeout=20), (
        "a token issued to the launch outlived its kill"
    )


def test_two_requests_racing_on_one_try_leave_the_winner_its_lease(
    own_broker: BrokerHandle, vault_root: hvac.Client
) -> None:
    """The same try twice at once (an operator's retry routed to another replica while
    the first still works): one creates the pod; the other is told to retry (503) or,
    once the pod exists, reattaches; it is issued nothing. (Regression: the loser gave
    back what the ledger held for the launch, the winner's lease included.)"""
    dag_id = f"analytics_etl_{uuid.uuid4().hex[:6]}"
    body = try_body(own_broker, dag_id, f"manual__{uuid.uuid4().hex[:8]}")
    start = threading.Barrier(2)
    answers: list[httpx.Response] = []

    def post() -> None:
        start.wait()
        answers.append(
            httpx.post(
                f"{own_broker.url}/v1/launches",
                json=body,
                headers=own_broker.headers(),
                timeout=30,
            )
        )

    racers = [threading.Thread(target=post) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert sorted(a.status_code for a in answers) in ([200, 201], [201, 503]), [
        a.text for a in answers
    ]
    (launch_id,) = {a.json()["launch_id"] for a in answers if a.status_code != 503}
    assert sum(a.status_code == 201 and a.json()["created"] for a in answers) == 1

    with own_broker.kube.api_client() as api:
        secret = client.CoreV1Api(api).read_namespaced_secret(
            f"podbroker-{launch_id}", own_broker.namespace
        )
    held = holdings_of(secret.metadata.annotations or {})
    assert held.lease_ids and held.token_accessor
    assert all(lease_alive(vault_root, lease) for lease in held.lease_ids), (
        "the running pod's lease was revoked"
    )
    assert token_alive(vault_root, held.token_accessor)
    assert tokens_of(vault_root, launch_id) == [held.token_accessor], (
        "the losing request's token is still alive"
    )
