"""KPO features on the real stack: templates that bind (issue 12 item 5), volumes and
scheduling fields (issue 13 items 1, 6), a pending pod's events and diagnosis (item 3)
and dry-run launches (item 9). One broker with its own OpenBao, task namespace and
policies (a grant bound to a pod template)."""

from __future__ import annotations

import dataclasses
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from kubernetes import client

from broker.audit.store import open_audit_store
from broker.core.audit_events import EventKind
from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import start_openbao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree
from tests.helpers import eventually

pytestmark = pytest.mark.stack

SEALED_TEAM = """\
kind: team
team: sealed
description: a grant that binds its secrets to one pod template
grants:
  - id: sealed-etl
    dags: "kpo_sealed_*"
    secrets: [warehouse-readonly]
    pod_templates: [sealed]
"""


@pytest.fixture(scope="module")
def bound(
    tmp_path_factory: pytest.TempPathFactory,
    kube: ControlPlane,
    postgres: Postgres,
    sources: SourceTree,
) -> Iterator[BrokerHandle]:
    folder = tmp_path_factory.mktemp("kpo")
    policies = folder / "policies"
    shutil.copytree(sources.policies, policies)
    (policies / "teams" / "sealed.yaml").write_text(SEALED_TEAM)
    unique = uuid.uuid4().hex[:8]
    namespace = f"kpo-{unique}"
    vault = start_openbao(folder / "openbao")
    handle = start_broker(
        folder / "broker",
        kube,
        vault,
        postgres,
        dataclasses.replace(sources, policies=policies),
        task_namespace=namespace,
        extra_settings={
            "kubernetes": {
                "namespace_rules": {namespace: {"config_maps": ["etl-settings"]}},
            },
            "pod_templates": {
                "sealed": {
                    "service_account": "default",
                    "resources": {"requests": {"cpu": "200m"}, "limits": {"memory": "256Mi"}},
                    "node_selector": {"type": "kwok"},
                    "volumes": [{"name": "cache", "empty_dir": {}}],
                },
                "small": {"resources": {"limits": {"memory": "256Mi"}}},
            },
        },
    )
    yield handle
    handle.stop()
    vault.stop()


def body(dag_id: str, **fields: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "task": {"dag_id": dag_id, "task_id": "load", "run_id": f"manual__{uuid.uuid4().hex}"},
        "container": {"image": "python:3.12-slim", "command": ["python", "-c", "print(1)"]},
        "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "30s"}},
    }
    payload.update(fields)
    return payload


def post(broker: BrokerHandle, payload: Any, query: str = "") -> httpx.Response:
    return httpx.post(
        f"{broker.url}/v1/launches{query}", json=payload, headers=broker.headers(), timeout=30
    )


def test_template_ceilings_and_fixed_values_are_enforced(bound: BrokerHandle) -> None:
    over = body(
        "kpo_limits",
        pod_template="sealed",
        container={"image": "python:3.12-slim", "resources": {"limits": {"memory": "1Gi"}}},
    )
    answer = post(bound, over)
    assert answer.status_code == 422, answer.text
    assert "container.resources.limits.memory" in answer.json()["reason"]
    moved = body("kpo_limits", pod_template="sealed", scheduling={"node_selector": {"type": "gpu"}})
    answer = post(bound, moved)
    assert answer.status_code == 422
    assert "node_selector is fixed" in answer.json()["reason"]
    labelled = body("kpo_limits", scheduling={"labels": {"owner": "me"}})
    answer = post(bound, labelled)
    assert answer.status_code == 422
    assert "scheduling.labels: 'owner' is not allowed" in answer.json()["reason"]


def test_a_grant_bound_to_a_template_denies_others_naming_the_secret(
    bound: BrokerHandle, kube: ControlPlane
) -> None:
    secrets = ["warehouse-readonly"]
    answer = post(bound, body("kpo_sealed_daily", secrets=secrets, pod_template="small"))
    assert answer.status_code == 403, answer.text
    assert answer.json()["denied_secrets"] == ["warehouse-readonly"]
    assert "pod templates sealed" in answer.json()["reason"]
    answer = post(bound, body("kpo_sealed_daily", secrets=secrets, pod_template="sealed"))
    assert answer.status_code == 201, answer.text
    with kube.api_client() as api:
        pod = client.CoreV1Api(api).read_namespaced_pod(answer.json()["pod_name"], bound.namespace)
    assert pod.spec.node_selector == {"type": "kwok"}
    assert pod.spec.containers[0].resources.requests["cpu"] == "200m"
    assert pod.spec.volumes[0].name == "cache"


def test_volumes_reach_the_pod_and_unsafe_ones_are_refused(
    bound: BrokerHandle, kube: ControlPlane
) -> None:
    payload = body(
        "kpo_volumes",
        volumes=[
            {"name": "scratch", "empty_dir": {"size_limit": "1Gi"}},
            {"name": "conf", "config_map": {"name": "etl-settings", "optional": True}},
        ],
        volume_mounts=[
            {"name": "scratch", "mount_path": "/scratch"},
            {"name": "conf", "mount_path": "/etc/etl", "read_only": True},
        ],
    )
    answer = post(bound, payload)
    assert answer.status_code == 201, answer.text
    with kube.api_client() as api:
        pod = client.CoreV1Api(api).read_namespaced_pod(answer.json()["pod_name"], bound.namespace)
    assert {v.name for v in pod.spec.volumes} == {"scratch", "conf"}
    assert [m.mount_path for m in pod.spec.containers[0].volume_mounts] == ["/scratch", "/etc/etl"]
    for volume, needle in (
        ({"name": "h", "host_path": {"path": "/"}}, "host_path volumes are refused"),
        ({"name": "s", "secret": {"secret_name": "x"}}, "secret volumes are refused"),
        ({"name": "c", "config_map": {"name": "kube-root-ca.crt"}}, "is not allowed"),
    ):
        answer = post(bound, body("kpo_volumes", volumes=[volume]))
        assert answer.status_code == 422, answer.text
        assert needle in answer.json()["reason"]


def test_a_pending_pod_shows_its_events_and_why(bound: BrokerHandle) -> None:
    stuck = body("kpo_pending", scheduling={"node_selector": {"pool": "nowhere"}})
    answer = post(bound, stuck)
    assert answer.status_code == 201, answer.text
    url = f"{bound.url}/v1/launches/{answer.json()['launch_id']}"
    seen: dict[str, Any] = {}

    def diagnosed() -> bool:
        view = httpx.get(url, headers=bound.headers(), timeout=10).json()
        seen.update(view)
        return view.get("pending") is not None and bool(view.get("events"))

    assert eventually(diagnosed, timeout=30), seen
    assert seen["phase"] == "Pending"
    assert seen["pending"]["kind"] == "unschedulable"
    assert seen["pending"]["permanent"] is False
    assert any(e["reason"] == "FailedScheduling" for e in seen["events"])


def test_dry_run_plans_and_decides_without_creating_anything(
    bound: BrokerHandle, kube: ControlPlane
) -> None:
    payload = body("analytics_etl_dry", secrets=["warehouse-readonly"])
    answer = post(bound, payload, "?dry_run=true")
    assert answer.status_code == 200, answer.text
    plan = answer.json()
    assert plan["dry_run"] is True
    assert plan["decision"]["allowed"] is True
    # KV only: a batch token (not persisted, no use count) just long enough to read.
    assert plan["token"]["policies"] and plan["token"]["ttl_seconds"] > 0
    assert [r["name"] for r in plan["vault_reads"]] == ["warehouse-readonly"]
    assert plan["pod"]["metadata"]["name"] == plan["pod_name"]
    assert "PLANTED-" not in answer.text  # nothing was read
    with kube.api_client() as api:
        core = client.CoreV1Api(api)
        pods = core.list_namespaced_pod(bound.namespace, label_selector="dag_id=analytics_etl_dry")
        assert pods.items == []
        names = {s.metadata.name for s in core.list_namespaced_secret(bound.namespace).items}
        assert plan["secret_name"] not in names
    denied = post(bound, body("analytics_etl_dry", secrets=["payments-api"]), "?dry_run=true")
    assert denied.status_code == 200, denied.text
    assert denied.json()["decision"]["allowed"] is False
    with open_audit_store(bound.audit_url, create=False) as store:
        kinds = [e.kind for e in store.events() if e.dag_id == "analytics_etl_dry"]
    assert kinds == [EventKind.LAUNCH_DRY_RUN, EventKind.LAUNCH_DRY_RUN]
    lax = post(bound, payload, "?dry_run=1")
    assert lax.status_code == 422
