"""Bursts of launches against the floor, measured side by side on the real local stack.

A burst is N operations submitted at once (N threads released together):

  floor   POST pods, then POST secrets owned by that pod, straight to the API server
          with the admin client (the physical floor of a launch)
  broker  POST /v1/launches (static token), one kind per burst: no secrets, or one
          KV secret whose keys the catalog declares

The broker's 503 + Retry-After (its in-flight cap) is honoured by the client, as the
Airflow operator does, and counted: a launch that got a 503 and then succeeded is not
an error. Throughput is N over the time from the release of the threads to the last
answer. After each burst the pods are counted by task try (duplicates) and the launches
killed through DELETE /v1/launches/{id}; cleaning up is never timed."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from podbroker_devstack.broker_env import BrokerHandle
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION

BURST_LABEL = "bench-burst"
IMAGE = "python:3.12-slim"
COMMAND = ["python", "-c", "print('burst')"]
KINDS: dict[str, tuple[str, str, tuple[dict[str, Any], ...]]] = {
    "no_secrets": ("bench_burst", "run", ()),
    "kv": (
        "analytics_reports_burst",
        "upload_burst",
        (
            {"name": "warehouse-readonly", "delivery": {"type": "file", "mount_path": "/wh"}},
            {"name": "s3-reports", "delivery": {"type": "env", "prefix": "S3_"}},
        ),
    ),
}


@dataclass
class BurstResult:
    kind: str
    n: int
    wall_s: float
    latencies: list[float]
    errors: int = 0
    retries_503: int = 0
    duplicates: int = 0
    pods: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.n / self.wall_s if self.wall_s else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _run_together(n: int, op: Callable[[int], float]) -> tuple[float, list[float | BaseException]]:
    """Run ``op(i)`` for i < n on n threads released at once; wall time and each
    result (its latency or the exception it raised)."""
    barrier = threading.Barrier(n + 1)
    results: list[float | BaseException] = [0.0] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = op(i)
        except BaseException as exc:  # reported as an error of the burst
            results[i] = exc

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="burst") as pool:
        futures = [pool.submit(worker, i) for i in range(n)]
        barrier.wait()
        started = time.perf_counter()
        for future in futures:
            future.result()
        wall = time.perf_counter() - started
    return wall, results


def _floor_pod(name: str, namespace: str, tag: str, secret: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {BURST_LABEL: tag, "bench": "floor"},
            "annotations": {RUN_DURATION_ANNOTATION: "10m"},
        },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "task",
                    "image": IMAGE,
                    "command": COMMAND,
                    "env": [
                        {"name": "S_K", "valueFrom": {"secretKeyRef": {"name": secret, "key": "k"}}}
                    ],
                }
            ],
        },
    }


def _floor_secret(name: str, namespace: str, pod: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {BURST_LABEL: "floor", "bench": "floor"},
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid, "controller": True}
            ],
        },
        "immutable": True,
        "type": "Opaque",
        "data": {"k": base64.b64encode(b"bench").decode()},
    }


def admin_client_for(admin: client.ApiClient, concurrency: int) -> client.ApiClient:
    """A copy of the admin client whose connection pool fits ``concurrency`` threads
    (the default, 5 x cores, would make the floor pay for new connections)."""
    configuration = admin.configuration
    configuration.connection_pool_maxsize = max(concurrency, 4)
    return client.ApiClient(configuration)


def floor_burst(admin: client.ApiClient, namespace: str, n: int) -> BurstResult:
    tag = f"floor-{uuid.uuid4().hex[:8]}"
    with admin_client_for(admin, n) as api:
        core = client.CoreV1Api(api)

        def op(i: int) -> float:
            pod_name = f"burst-{tag}-{i}"
            started = time.perf_counter()
            pod = core.create_namespaced_pod(
                namespace, _floor_pod(pod_name, namespace, tag, pod_name)
            )
            core.create_namespaced_secret(
                namespace,
                _floor_secret(pod_name, namespace, pod_name, pod.metadata.uid),
                _preload_content=False,
            )
            return time.perf_counter() - started

        wall, results = _run_together(n, op)
        result = _result("floor", n, wall, results)
        result.pods = len(
            core.list_namespaced_pod(namespace, label_selector=f"{BURST_LABEL}={tag}").items
        )
        core.delete_collection_namespaced_pod(
            namespace, label_selector=f"{BURST_LABEL}={tag}", grace_period_seconds=0
        )
    return result


def _result(kind: str, n: int, wall: float, results: list[float | BaseException]) -> BurstResult:
    result = BurstResult(kind, n, wall, [r for r in results if isinstance(r, float)])
    failures = [r for r in results if isinstance(r, BaseException)]
    result.errors = len(failures)
    result.error_samples = sorted({f"{type(f).__name__}: {str(f)[:160]}" for f in failures})[:5]
    return result


def launch_body(kind: str, run_id: str, tag: str) -> dict[str, Any]:
    dag_id, task_id, secrets = KINDS[kind]
    return {
        "task": {"dag_id": dag_id, "task_id": task_id, "run_id": run_id, "try_number": 1},
        "container": {"image": IMAGE, "command": COMMAND},
        "secrets": list(secrets),
        "scheduling": {
            "labels": {BURST_LABEL: tag, "bench": "broker"},
            "annotations": {RUN_DURATION_ANNOTATION: "10m"},
        },
    }


def post_launch(
    http: httpx.Client, body: dict[str, Any], retries: list[int], *, deadline_s: float = 120.0
) -> tuple[float, str]:
    """POST until it is not a 503 (honouring Retry-After, as the operator does);
    latency from the first send to the final answer, and the launch id."""
    started = time.perf_counter()
    while True:
        response = http.post("/v1/launches", json=body)
        if response.status_code == 503 and time.perf_counter() - started < deadline_s:
            retries.append(1)
            time.sleep(float(response.headers.get("Retry-After", "1")))
            continue
        if response.status_code not in (200, 201):
            raise RuntimeError(f"{response.status_code} {response.text[:200]}")
        return time.perf_counter() - started, str(response.json()["launch_id"])


def broker_burst(
    broker: BrokerHandle, admin: client.ApiClient, kind: str, n: int
) -> tuple[BurstResult, list[str]]:
    """N launches at once; the result and the launch ids (for cleanup)."""
    tag = f"{kind.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
    retries: list[int] = []
    launch_ids: list[str] = [""] * n
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    with httpx.Client(
        base_url=broker.url, headers=broker.headers(), timeout=180, limits=limits
    ) as http:

        def op(i: int) -> float:
            elapsed, launch_ids[i] = post_launch(
                http, launch_body(kind, f"burst__{tag}_{i}", tag), retries
            )
            return elapsed

        wall, results = _run_together(n, op)
    result = _result(kind, n, wall, results)
    result.retries_503 = len(retries)
    core = client.CoreV1Api(admin)
    pods = core.list_namespaced_pod(broker.namespace, label_selector=f"{BURST_LABEL}={tag}").items
    result.pods = len(pods)
    tries = Counter(
        (p.metadata.labels.get("run_id"), p.metadata.labels.get("try_number")) for p in pods
    )
    result.duplicates = sum(count - 1 for count in tries.values())
    return result, [i for i in launch_ids if i]


def kill_launches(broker: BrokerHandle, launch_ids: Sequence[str]) -> None:
    """DELETE every launch (Secret deleted, leases revoked), a few at a time; untimed."""
    with httpx.Client(base_url=broker.url, headers=broker.headers(), timeout=60) as http:

        def kill(launch_id: str) -> None:
            for _ in range(30):
                response = http.delete(f"/v1/launches/{launch_id}")
                if response.status_code != 503:
                    return
                time.sleep(float(response.headers.get("Retry-After", "1")))

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(kill, launch_ids))


def wait_gone(admin: client.ApiClient, namespace: str, timeout: float = 300.0) -> None:
    core = client.CoreV1Api(admin)
    deadline = time.monotonic() + timeout
    while core.list_namespaced_pod(namespace, label_selector=BURST_LABEL).items:
        if time.monotonic() > deadline:
            raise RuntimeError(f"burst pods still present in {namespace} after {timeout}s")
        time.sleep(0.2)


def delete_floor_leftovers(admin: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(admin)
    try:
        core.delete_collection_namespaced_pod(
            namespace, label_selector="bench=floor", grace_period_seconds=0
        )
    except ApiException as exc:
        if exc.status != 404:
            raise
