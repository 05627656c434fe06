"""Policy changes applied to Vault reach a running broker within its cache time, and
finished pods are removed after the configured retention. Own OpenBao and namespace."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client

from broker.audit.store import open_audit_store
from broker.core.audit_events import EventKind
from podbroker_devstack.broker_env import (
    BrokerHandle,
    apply_example_policies,
    start_broker,
)
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import start_openbao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree
from tests.helpers import eventually

pytestmark = pytest.mark.stack


@pytest.fixture
def own_broker(
    tmp_path: Path,
    kube: ControlPlane,
    postgres: Postgres,
    sources: SourceTree,
    unique: str,
) -> Iterator[BrokerHandle]:
    vault = start_openbao(tmp_path / "openbao")
    handle = start_broker(
        tmp_path / "broker",
        kube,
        vault,
        postgres,
        sources,
        task_namespace=f"pol-{unique}",
        extra_settings={
            "kubernetes": {"pod_retention_seconds": 2, "reconcile_interval_seconds": 1}
        },
    )
    yield handle
    handle.stop()
    vault.stop()


def launch(broker: BrokerHandle, dag_id: str, secrets: list[str]) -> httpx.Response:
    body: dict[str, Any] = {
        "task": {"dag_id": dag_id, "task_id": "score", "run_id": uuid.uuid4().hex},
        "container": {"image": "python:3.12-slim"},
        "secrets": [{"name": s, "delivery": {"type": "file", "mount_path": "/s"}} for s in secrets],
        "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "1s"}},
    }
    return httpx.post(f"{broker.url}/v1/launches", headers=broker.headers(), json=body, timeout=30)


def test_revoked_grant_is_enforced_within_the_cache_time(
    own_broker: BrokerHandle,
    tmp_path: Path,
    sources: SourceTree,
) -> None:
    assert launch(own_broker, "ml_score_daily", ["feature-store"]).status_code == 201
    changed = tmp_path / "policies"
    shutil.copytree(sources.policies, changed)
    team_file = changed / "teams" / "ml-platform.yaml"
    team = yaml.safe_load(team_file.read_text())
    team["grants"] = [g for g in team["grants"] if g["id"] != "batch-scoring"]
    team_file.write_text(yaml.safe_dump(team))
    apply_example_policies(own_broker.vault, changed, prune=True)

    # The dev stack's policy_cache_seconds is 2: well within 10s the grant is gone.
    def denied() -> bool:
        return launch(own_broker, "ml_score_daily", ["feature-store"]).status_code == 403

    assert eventually(denied, timeout=10, interval=0.5)
    body = launch(own_broker, "ml_score_daily", ["feature-store"]).json()
    assert body["denied_secrets"] == ["feature-store"]


def test_finished_pods_are_removed_after_the_retention(
    own_broker: BrokerHandle,
    kube_api: client.ApiClient,
) -> None:
    core = client.CoreV1Api(kube_api)
    view = launch(own_broker, "ml_score_retention", ["feature-store"]).json()
    namespace, pod = view["namespace"], view["pod_name"]

    def gone() -> bool:
        return not [p for p in core.list_namespaced_pod(namespace).items if p.metadata.name == pod]

    assert eventually(gone, timeout=30), "the finished pod outlived its retention"
    store = open_audit_store(own_broker.audit_url, create=False)
    with store:
        kinds = [
            (e.kind, e.details.get("action"))
            for e in store.events()
            if e.launch_id == view["launch_id"]
        ]
    assert (EventKind.POD_FINISHED, None) in kinds
    assert (EventKind.SECRET_DELETED, None) in kinds
    assert (EventKind.RECONCILER_CLEANUP, "delete retained pod") in kinds
