"""Overload on the real stack: past its in-flight cap and its waiting room, a launch is
answered 503 with Retry-After, promptly (never a hung request or a client timeout), and
a refused launch creates and records nothing; retried after Retry-After, it launches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree

pytestmark = pytest.mark.stack

LAUNCHES = 24


@pytest.fixture
def small_broker(
    tmp_path: Path,
    kube: ControlPlane,
    vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
    unique: str,
) -> Iterator[BrokerHandle]:
    """Two launches in flight, two waiting at most half a second: a burst of 24
    overloads it."""
    handle = start_broker(
        tmp_path / "broker",
        kube,
        vault,
        postgres,
        sources,
        task_namespace=f"busy-{unique}",
        extra_settings={
            "server": {
                "max_in_flight": {
                    "launch": 2,
                    "launch_queue": 2,
                    "launch_queue_seconds": 0.5,
                }
            }
        },
    )
    yield handle
    handle.stop()


def launch_body(dag_id: str) -> dict[str, Any]:
    return {
        "task": {"dag_id": dag_id, "task_id": "load", "run_id": "r1", "try_number": 1},
        "container": {"image": "python:3.12-slim"},
        "secrets": ["warehouse-readonly"],
        "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "60s"}},
    }


def test_a_burst_past_the_cap_and_the_waiting_room_gets_prompt_503s_that_create_nothing(
    small_broker: BrokerHandle, kube_api: client.ApiClient, unique: str
) -> None:
    core = client.CoreV1Api(kube_api)
    dags = [f"analytics_etl_busy{unique}_{n}" for n in range(LAUNCHES)]
    barrier = threading.Barrier(LAUNCHES)

    def launch(dag_id: str) -> httpx.Response:
        barrier.wait()
        # A hung request would fail here: the client gives up after 30 s.
        return httpx.post(
            f"{small_broker.url}/v1/launches",
            json=launch_body(dag_id),
            headers=small_broker.headers(),
            timeout=30,
        )

    with ThreadPoolExecutor(LAUNCHES) as pool:
        answers = dict(zip(dags, pool.map(launch, dags), strict=True))
    codes = {dag: answer.status_code for dag, answer in answers.items()}
    assert set(codes.values()) <= {201, 503}, codes
    refused = [dag for dag, code in codes.items() if code == 503]
    assert refused, "24 launches at once never overloaded a broker with 2 slots + 2 seats"
    for dag in refused:
        body = answers[dag].json()
        assert body["retryable"] is True and body["component"] == "broker", body
        assert int(answers[dag].headers["Retry-After"]) >= 1
    pods = core.list_namespaced_pod(
        small_broker.namespace, label_selector="podbroker.dev/managed-by=podbroker"
    ).items
    made_for = {pod.metadata.labels.get("dag_id") for pod in pods}
    assert made_for.isdisjoint(refused), "a refused launch created a pod"
    assert len(pods) == LAUNCHES - len(refused)
    # Retried one at a time, as the operator does after Retry-After, each launches.
    for dag in refused:
        again = httpx.post(
            f"{small_broker.url}/v1/launches",
            json=launch_body(dag),
            headers=small_broker.headers(),
            timeout=30,
        )
        assert again.status_code == 201, again.text
