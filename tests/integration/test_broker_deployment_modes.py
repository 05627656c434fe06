"""Ways operators run the broker: HTTPS, several replicas sharing a PostgreSQL audit
store, and `podbroker gc` as a one-off pass. Each test has its own OpenBao and task
namespace so the session broker is untouched."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from broker.audit.keys import load_public_key, public_path
from broker.audit.store import open_audit_store
from broker.core.audit_events import EventKind
from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.pki import LocalCA
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree
from tests.helpers import eventually

pytestmark = pytest.mark.stack


def launch_body(dag_id: str, task_id: str) -> dict[str, Any]:
    return {
        "task": {"dag_id": dag_id, "task_id": task_id, "run_id": uuid.uuid4().hex},
        "container": {"image": "python:3.12-slim"},
        "secrets": ["warehouse-readonly"],
        "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "1s"}},
    }


def test_https_when_given_a_cert_and_key(
    tmp_path: Path,
    kube: ControlPlane,
    own_vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
    unique: str,
) -> None:
    ca = LocalCA(tmp_path / "tls")
    pair = ca.issue("broker", common_name="podbroker", server=True)
    broker = start_broker(
        tmp_path / "broker",
        kube,
        own_vault,
        postgres,
        sources,
        task_namespace=f"tls-{unique}",
        extra_settings={"server": {"tls_cert_file": str(pair.cert), "tls_key_file": str(pair.key)}},
        tls_ca_file=str(ca.cert_path),
    )
    try:
        assert broker.url.startswith("https://")
        response = httpx.post(
            f"{broker.url}/v1/launches",
            headers=broker.headers(),
            verify=broker.verify,
            timeout=30,
            json=launch_body("analytics_etl_tls", "load"),
        )
        assert response.status_code == 201, response.text
        plain = broker.url.replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{plain}/healthz", timeout=5)
    finally:
        broker.stop()


def test_two_replicas_share_one_postgres_audit_chain(
    tmp_path: Path,
    kube: ControlPlane,
    own_vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
    unique: str,
) -> None:
    database = f"audit_{unique}"
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    audit = {"url": postgres.url(database), "signing_key_file": str(tmp_path / "audit.pem")}
    namespace = f"replicas-{unique}"
    replicas: list[BrokerHandle] = []
    try:
        for name in ("a", "b"):
            replicas.append(
                start_broker(
                    tmp_path / name,
                    kube,
                    own_vault,
                    postgres,
                    sources,
                    task_namespace=namespace,
                    extra_settings={"audit": audit},
                )
            )
        dag_id = f"analytics_etl_{unique}"

        def post(index: int) -> int:
            broker = replicas[index % 2]
            return httpx.post(
                f"{broker.url}/v1/launches",
                headers=broker.headers(),
                timeout=60,
                json=launch_body(dag_id, f"t{index}"),
            ).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(post, range(16)))
        assert codes == [201] * 16

        def all_secrets_deleted() -> bool:
            with open_audit_store(postgres.url(database), create=False) as store:
                deleted = {
                    e.task_id
                    for e in store.events()
                    if e.kind == EventKind.SECRET_DELETED and e.dag_id == dag_id
                }
            return len(deleted) == 16

        # Both replicas watch the namespace and see every pod end.
        assert eventually(all_secrets_deleted, timeout=60)
        time.sleep(3)  # give a second, duplicate cleanup the chance to show up
    finally:
        for broker in replicas:
            broker.stop()
    store = open_audit_store(postgres.url(database), create=False)
    with store:
        result = store.verify(load_public_key(public_path(tmp_path / "audit.pem")))
        requested = [
            e for e in store.events() if e.kind == EventKind.LAUNCH_REQUESTED and e.dag_id == dag_id
        ]
        ends = Counter(
            (e.task_id, e.kind)
            for e in store.events()
            if e.dag_id == dag_id and e.kind in (EventKind.POD_FINISHED, EventKind.SECRET_DELETED)
        )
    assert result.ok, result.summary()
    assert len(requested) == 16
    assert len({e.task_id for e in requested}) == 16
    # Exactly one replica cleaned up each pod (the claim), not both.
    assert sorted(ends.values()) == [1] * 32, ends


def test_gc_command_runs_one_reconcile_pass(broker: BrokerHandle) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "broker", "gc", "--config", str(broker.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "orphan secrets deleted:" in result.stdout
    assert "pods without secret deleted:" in result.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "broker", "gc", "--config", "/nonexistent/broker.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2
    flat = " ".join(missing.stderr.replace("│", " ").split())  # unwrap typer's error panel
    assert "/nonexistent/broker.yaml" in flat.replace(" ", "")
    assert "does not exist" in flat
