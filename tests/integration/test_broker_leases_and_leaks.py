"""Long tasks and leaked values on the real stack (issue 14 items 1 and 2): a dedicated
broker in its own Vault layout and task namespace, with a database role whose leases
last 3 s and grants capped at 20 s. A launch running three times its lease keeps a
working PostgreSQL login and loses it past the cap; a pod printing its password (raw,
base64, split over two writes) has it masked in the broker's log stream, the exposure
audited and its login revoked. Vault's lease lookups and PostgreSQL logins judge."""

from __future__ import annotations

import base64
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hvac
import psycopg
import pytest
from hvac.exceptions import InvalidRequest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from broker.audit.store import open_audit_store
from broker.core.audit_events import AuditEvent, EventKind
from broker.core.policy import Constraints, DatabaseSecret, Grant, KvSecret, PolicySet, Team
from broker.core.report import compute_report
from broker.vault.bootstrap import BootstrapOptions, bootstrap
from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree
from tests.helpers import eventually
from tests.integration.vault_database import can_login, database_mount
from tests.integration.vault_policy_env import PolicyEnv, make_env

pytestmark = pytest.mark.stack

LEASE_TTL = 3
CAP = 20
KV_PASSWORD = "kv-PLANTED-" + uuid.uuid4().hex


@pytest.fixture
def lease_env(
    vault: OpenBao, vault_root: hvac.Client, postgres: Postgres, unique: str
) -> PolicyEnv:
    env = make_env(vault, vault_root, unique)
    mount = f"db-{unique}"
    database_mount(
        vault_root, postgres, mount, role="short", default_ttl=f"{LEASE_TTL}s", max_ttl="1h"
    )
    vault_root.secrets.kv.v2.create_or_update_secret(
        "team/app", {"password": KV_PASSWORD}, mount_point=env.kv_mount
    )
    catalog: dict[str, KvSecret | DatabaseSecret] = {
        "short-db": DatabaseSecret(mount=mount, role="short"),
        "app": KvSecret(mount=env.kv_mount, path="team/app", keys=("password",)),
    }
    capped = Constraints(max_lease_ttl=CAP)
    env.apply(
        PolicySet(
            catalog=catalog,
            teams={
                "data": Team(
                    grants=(
                        Grant(
                            id="long", dags="lease_long*", secrets=("short-db",), constraints=capped
                        ),
                        Grant(
                            id="leaky",
                            dags="lease_leak*",
                            secrets=("short-db", "app"),
                            constraints=Constraints(max_lease_ttl=600),
                            on_exposure="revoke",
                        ),
                    )
                )
            },
        )
    )
    # The broker may renew and revoke the leases of this mount (from the catalog).
    bootstrap(vault_root, BootstrapOptions(layout=env.layout, dynamic_mounts=(mount,)))
    return env


@pytest.fixture
def lease_broker(
    tmp_path: Path,
    kube: ControlPlane,
    vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
    unique: str,
    lease_env: PolicyEnv,
    kube_api: client.ApiClient,
) -> Iterator[BrokerHandle]:
    handle = start_broker(
        tmp_path / "broker",
        kube,
        vault,
        postgres,
        sources,
        task_namespace=f"lease-{unique}",
        extra_settings={"vault": lease_env.broker_settings()},
    )
    # Each test pod prints its own log (a namespaced kwok Logs object per pod).
    objects = client.CustomObjectsApi(kube_api)
    objects.delete_cluster_custom_object(
        "kwok.x-k8s.io", "v1alpha1", "clusterlogs", f"logs-{handle.namespace}"
    )
    yield handle
    handle.stop()


def launch(
    broker: BrokerHandle, dag_id: str, secrets: list[Any], *, run_for: str = "300s"
) -> dict[str, Any]:
    response = httpx.post(
        f"{broker.url}/v1/launches",
        json={
            "task": {
                "dag_id": dag_id,
                "task_id": "long_query",
                "run_id": f"manual__{uuid.uuid4().hex[:8]}",
                "try_number": 1,
            },
            "container": {"image": "python:3.12-slim"},
            "secrets": secrets,
            "namespace": broker.namespace,
            "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: run_for}},
        },
        headers=broker.headers(),
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def secret_data(kube_api: client.ApiClient, namespace: str, launch_id: str) -> dict[str, str]:
    secret = client.CoreV1Api(kube_api).read_namespaced_secret(f"podbroker-{launch_id}", namespace)
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def db_login(data: dict[str, str]) -> tuple[str, str]:
    user = next(v for k, v in data.items() if k.endswith(".username"))
    password = next(v for k, v in data.items() if k.endswith(".password") and v != KV_PASSWORD)
    return user, password


def lease_ttl(vault_root: hvac.Client, lease_id: str) -> int | None:
    try:
        return int(vault_root.sys.read_lease(lease_id)["data"]["ttl"])
    except InvalidRequest:
        return None


def audit_kinds(broker: BrokerHandle, launch_id: str) -> list[tuple[str, str]]:
    with sqlite3.connect(broker.audit_url.removeprefix("sqlite:///")) as db:
        return list(
            db.execute(
                "SELECT kind, event_json FROM audit_records WHERE launch_id = ? ORDER BY position",
                (launch_id,),
            ).fetchall()
        )


def leases_of(broker: BrokerHandle, launch_id: str) -> list[str]:
    with sqlite3.connect(broker.audit_url.removeprefix("sqlite:///")) as db:
        rows = db.execute("SELECT lease_id FROM launch_leases WHERE launch_id = ?", (launch_id,))
        return [r[0] for r in rows.fetchall()]


def leaky_lines(password: str) -> list[tuple[str, str]]:
    """A pod's log printing ``password``, the KV password's base64 and the KV password
    split over two writes ("P": a partial line, as the container runtime writes it)."""
    encoded = base64.b64encode(KV_PASSWORD.encode()).decode()
    return [
        ("F", "task: connecting"),
        ("F", f"debug: PGPASSWORD={password}"),
        ("F", f"debug: token={encoded}"),
        ("P", f"half: {KV_PASSWORD[:10]}"),
        ("F", f"{KV_PASSWORD[10:]} (two writes)"),
        ("F", "task: done"),
    ]


def print_log(
    kube_api: client.ApiClient,
    namespace: str,
    pod_name: str,
    lines: list[tuple[str, str]],
    folder: Path,
) -> None:
    """Make the kwok pod ``pod_name`` print ``lines`` (a namespaced Logs object)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    log_file = folder / f"{pod_name}.log"
    log_file.write_text(
        "".join(f"{stamp}.{i:09d}Z stdout {tag} {text}\n" for i, (tag, text) in enumerate(lines))
    )
    client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        "kwok.x-k8s.io",
        "v1alpha1",
        namespace,
        "logs",
        {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "Logs",
            "metadata": {"name": pod_name, "namespace": namespace},
            "spec": {"logs": [{"containers": ["base"], "logsFile": str(log_file)}]},
        },
    )


def test_a_task_running_three_leases_keeps_its_login_and_loses_it_at_the_cap(
    lease_broker: BrokerHandle,
    kube_api: client.ApiClient,
    vault_root: hvac.Client,
    postgres: Postgres,
) -> None:
    view = launch(lease_broker, f"lease_long_{uuid.uuid4().hex[:6]}", ["short-db"])
    started = time.monotonic()
    user, password = db_login(secret_data(kube_api, lease_broker.namespace, view["launch_id"]))
    (lease_id,) = leases_of(lease_broker, view["launch_id"])
    assert lease_ttl(vault_root, lease_id) is not None
    # Three lease lifetimes later the login still works and Vault still knows the lease.
    time.sleep(max(0.0, 3 * LEASE_TTL + 1 - (time.monotonic() - started)))
    assert can_login(postgres, user, password)
    ttl = lease_ttl(vault_root, lease_id)
    assert ttl is not None and 0 < ttl <= LEASE_TTL
    # Past the grant's cap: the lease is gone and so is the login.
    assert eventually(lambda: lease_ttl(vault_root, lease_id) is None, timeout=CAP + 10)
    assert time.monotonic() - started >= CAP - 2
    assert not can_login(postgres, user, password)
    kinds = [kind for kind, _ in audit_kinds(lease_broker, view["launch_id"])]
    assert kinds.count("lease_renewed") == 1
    assert kinds.count("lease_capped") == 1


def test_values_printed_by_the_pod_are_masked_audited_and_revoked(
    lease_broker: BrokerHandle,
    kube: ControlPlane,
    kube_api: client.ApiClient,
    vault_root: hvac.Client,
    postgres: Postgres,
    tmp_path: Path,
) -> None:
    view = launch(
        lease_broker,
        f"lease_leak_{uuid.uuid4().hex[:6]}",
        ["short-db", "app"],
    )
    namespace, launch_id = lease_broker.namespace, view["launch_id"]
    user, password = db_login(secret_data(kube_api, namespace, launch_id))
    (lease_id,) = leases_of(lease_broker, launch_id)
    encoded = base64.b64encode(KV_PASSWORD.encode()).decode()
    print_log(kube_api, namespace, view["pod_name"], leaky_lines(password), tmp_path)

    def relayed() -> str:
        response = httpx.get(
            f"{lease_broker.url}/v1/launches/{launch_id}/logs",
            headers=lease_broker.headers(),
            timeout=30,
        )
        return response.text if response.status_code == 200 else ""

    assert eventually(lambda: "task: done" in relayed(), timeout=30)
    text = relayed()
    assert "task: connecting" in text
    for value in (password, KV_PASSWORD, encoded, KV_PASSWORD[10:]):
        assert value not in text
    assert "***" in text
    events = [(k, e) for k, e in audit_kinds(lease_broker, launch_id) if k == "secret_exposed"]
    assert {e.split('"secret_names":[')[1].split("]")[0] for _, e in events} == {
        '"short-db"',
        '"app"',
    }
    assert all(password not in e and KV_PASSWORD not in e for _, e in events)
    assert eventually(lambda: lease_ttl(vault_root, lease_id) is None, timeout=10)
    assert not can_login(postgres, user, password)
    metrics = httpx.get(f"{lease_broker.url}/metrics", timeout=10).text
    assert 'podbroker_secret_exposures_total{action="revoked"}' in metrics
    with pytest.raises(ApiException):
        client.CoreV1Api(kube_api).read_namespaced_secret("no-such", namespace)
    assert user not in Path(lease_broker.log_path).read_text()


def secret_gone(kube_api: client.ApiClient, namespace: str, launch_id: str) -> bool:
    try:
        client.CoreV1Api(kube_api).read_namespaced_secret(f"podbroker-{launch_id}", namespace)
    except ApiException as exc:
        return exc.status == 404
    return False


def test_a_one_shot_read_after_the_pod_ended_and_its_secret_went_is_masked_or_refused(
    lease_broker: BrokerHandle,
    kube_api: client.ApiClient,
    tmp_path: Path,
) -> None:
    """The deferrable operator's path: the log is read once, after the pod ended and
    the broker deleted its Secret. The values the broker held since the launch mask it;
    a broker that no longer holds them (restarted) refuses the read, never unmasked."""
    view = launch(
        lease_broker, f"lease_leak_{uuid.uuid4().hex[:6]}", ["short-db", "app"], run_for="3s"
    )
    namespace, launch_id = lease_broker.namespace, view["launch_id"]
    user, password = db_login(secret_data(kube_api, namespace, launch_id))
    print_log(kube_api, namespace, view["pod_name"], leaky_lines(password), tmp_path)
    assert eventually(lambda: secret_gone(kube_api, namespace, launch_id), timeout=60)
    planted = (password, KV_PASSWORD, base64.b64encode(KV_PASSWORD.encode()).decode())
    url = f"{lease_broker.url}/v1/launches/{launch_id}/logs"

    response = httpx.get(url, headers=lease_broker.headers(), timeout=30)
    assert response.status_code == 200, response.text
    assert "task: connecting" in response.text and "task: done" in response.text
    # (indexes, not values: a failure must not print what leaked)
    assert [i for i, v in enumerate((*planted, KV_PASSWORD[10:])) if v in response.text] == []
    assert "***" in response.text
    kinds = [kind for kind, _ in audit_kinds(lease_broker, launch_id)]
    assert "secret_exposed" in kinds

    # A restarted broker holds nothing of it: the read is refused and says why.
    lease_broker.restart()
    refused = httpx.get(url, headers=lease_broker.headers(), timeout=30)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "conflict"
    assert "leak_guard.retain_seconds" in refused.text
    assert [i for i, v in enumerate((*planted, user)) if v in refused.text] == []
    assert "task: connecting" not in refused.text

    # The refused read is audited like any refused request (a report reader sees it).
    def refusals() -> list[AuditEvent]:
        with open_audit_store(lease_broker.audit_url, create=False) as store:
            return [
                e
                for e in store.events()
                if e.kind == EventKind.REQUEST_REFUSED
                and e.details["endpoint"] == "GET /v1/launches/{launch_id}/logs"
            ]

    assert eventually(lambda: bool(refusals()), timeout=20)
    [record] = refusals()
    assert (record.caller, record.details["status"], record.details["reason_class"]) == (
        "static:dev",
        409,
        "log_unmaskable",
    )
    assert launch_id in record.details["reason"]
    denials = compute_report(refusals()).denials
    assert [d.reasons[0].split(":")[0] for d in denials] == [
        "409 log_unmaskable on GET /v1/launches/{launch_id}/logs"
    ]
    broker_log = Path(lease_broker.log_path).read_text()
    assert [i for i, v in enumerate(planted) if v in broker_log] == []


def test_a_replica_that_did_not_make_the_launch_masks_its_log_after_the_end(
    tmp_path: Path,
    kube: ControlPlane,
    kube_api: client.ApiClient,
    vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
    unique: str,
    lease_env: PolicyEnv,
) -> None:
    """Two replicas (the chart's default): the launch is made through one, its log read
    after the end through the other, which saw the pod run (its watch) and held the
    values from then on."""
    database = f"audit_{unique}"
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    settings = {
        "vault": lease_env.broker_settings(),
        "audit": {"url": postgres.url(database), "signing_key_file": str(tmp_path / "a.pem")},
    }
    namespace = f"leak2-{unique}"
    replicas: list[BrokerHandle] = []
    try:
        for name in ("a", "b"):
            replicas.append(
                start_broker(
                    tmp_path / name,
                    kube,
                    vault,
                    postgres,
                    sources,
                    task_namespace=namespace,
                    extra_settings=settings,
                )
            )
        client.CustomObjectsApi(kube_api).delete_cluster_custom_object(
            "kwok.x-k8s.io", "v1alpha1", "clusterlogs", f"logs-{namespace}"
        )
        maker, reader = replicas
        view = launch(maker, f"lease_leak_{uuid.uuid4().hex[:6]}", ["app"], run_for="4s")
        launch_id = view["launch_id"]
        print_log(kube_api, namespace, view["pod_name"], leaky_lines("no-db-password"), tmp_path)
        assert eventually(lambda: secret_gone(kube_api, namespace, launch_id), timeout=60)
        response = httpx.get(
            f"{reader.url}/v1/launches/{launch_id}/logs", headers=reader.headers(), timeout=30
        )
        assert response.status_code == 200, response.text
        assert "task: done" in response.text
        encoded = base64.b64encode(KV_PASSWORD.encode()).decode()
        planted = (KV_PASSWORD, encoded, KV_PASSWORD[10:])
        assert [i for i, v in enumerate(planted) if v in response.text] == []
        assert "***" in response.text
    finally:
        for broker in replicas:
            broker.stop()
