"""Cleanup latency: from the end of a task pod to its Secret deleted and what it held in
Vault revoked, on the real local stack.

KV launches (a child token each) get a short kwok run-duration, so their pods end on
cue. The benchmark watches the pods and Secrets itself: ``pod end`` is when its watch
first sees the pod Succeeded, ``Secret deleted`` when its watch sees the DELETED event of
the Secret the pod owns, and ``revoked`` the broker's holdings ledger's ``released_at``
(written right after the revocation). A launch's cleanup latency is the later of the
two minus the pod end. Optionally a burst of long-running launches is submitted at the
same moment, so the cleanups run while the broker is busy launching."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import urllib3
from kubernetes import client, watch

from podbroker_devstack.broker_env import BrokerHandle
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION
from tests.bench import burst as bursts


@dataclass
class CleanupResult:
    n: int
    during_burst: int
    latencies: list[float] = field(default_factory=list)
    missing: int = 0  # pods whose Secret or revocation was not seen in time
    burst: bursts.BurstResult | None = None


class _Watcher:
    """Pod-end and Secret-deletion times (wall clock) seen by watches in one namespace."""

    def __init__(self, admin: client.ApiClient, namespace: str, label: str) -> None:
        self.core = client.CoreV1Api(admin)
        self.namespace = namespace
        self.label = label
        self.pod_end: dict[str, float] = {}
        self.secret_gone: dict[str, float] = {}  # by owner pod name
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._quietly, args=(self._pods,), daemon=True),
            threading.Thread(target=self._quietly, args=(self._secrets,), daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        time.sleep(0.5)  # both watches established before the first launch

    def stop(self) -> None:
        self._stop.set()

    @staticmethod
    def _quietly(watching: Callable[[], None]) -> None:
        # The API server ends a watch stream when the benchmark moves on: not an error.
        with contextlib.suppress(urllib3.exceptions.HTTPError, OSError):
            watching()

    def _pods(self) -> None:
        w = watch.Watch()
        for event in w.stream(
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=self.label,
            timeout_seconds=600,
            _request_timeout=620,
        ):
            pod = event["object"]
            if pod.status and pod.status.phase in ("Succeeded", "Failed"):
                self.pod_end.setdefault(pod.metadata.name, time.time())
            if self._stop.is_set():
                w.stop()

    def _secrets(self) -> None:
        w = watch.Watch()
        for event in w.stream(
            self.core.list_namespaced_secret,
            self.namespace,
            timeout_seconds=600,
            _request_timeout=620,
        ):
            secret = event["object"]
            if event["type"] == "DELETED":
                for owner in secret.metadata.owner_references or []:
                    self.secret_gone.setdefault(owner.name, time.time())
            if self._stop.is_set():
                w.stop()


def _released_at(audit_url: str, launch_ids: Sequence[str]) -> dict[str, float]:
    """``released_at`` of the broker's holdings ledger (SQLite), as epoch seconds."""
    path = Path(audit_url.removeprefix("sqlite:///"))
    out: dict[str, float] = {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
        marks = ",".join("?" * len(launch_ids))
        rows = db.execute(
            f"SELECT launch_id, released_at FROM launch_holdings "  # noqa: S608 (placeholders)
            f"WHERE released_at IS NOT NULL AND launch_id IN ({marks})",
            list(launch_ids),
        ).fetchall()
    for launch_id, released in rows:
        out[launch_id] = dt.datetime.fromisoformat(released).timestamp()
    return out


def measure_cleanup(
    broker: BrokerHandle,
    admin: client.ApiClient,
    n: int,
    *,
    during_burst: int = 0,
    run_duration: str = "2s",
    timeout: float = 120.0,
) -> CleanupResult:
    """``n`` KV launches whose pods end after ``run_duration``; with ``during_burst``,
    that many long-running launches are submitted at the same moment."""
    tag = f"cleanup-{uuid.uuid4().hex[:8]}"
    label = f"{bursts.BURST_LABEL}={tag}"
    watcher = _Watcher(admin, broker.namespace, label)
    watcher.start()
    result = CleanupResult(n, during_burst)
    launched: dict[str, str] = {}  # pod name -> launch id
    retries: list[int] = []

    def launch(i: int) -> None:
        body = bursts.launch_body("kv", f"cleanup__{tag}_{i}", tag)
        body["scheduling"]["annotations"] = {RUN_DURATION_ANNOTATION: run_duration}
        with httpx.Client(base_url=broker.url, headers=broker.headers(), timeout=120) as http:
            _, launch_id = bursts.post_launch(http, body, retries)
            response = http.get(f"/v1/launches/{launch_id}")
            while response.status_code == 503:  # over the status cap: wait as told
                retries.append(1)
                time.sleep(float(response.headers.get("Retry-After", "1")))
                response = http.get(f"/v1/launches/{launch_id}")
            view = response.raise_for_status().json()
        launched[view["pod_name"]] = launch_id

    burst_ids: list[str] = []
    with ThreadPoolExecutor(max_workers=2) as outer:
        burst_future = (
            outer.submit(bursts.broker_burst, broker, admin, "kv", during_burst)
            if during_burst
            else None
        )
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(launch, range(n)))
        if burst_future is not None:
            result.burst, burst_ids = burst_future.result()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in launched if p in watcher.secret_gone]
        if len(done) == len(launched):
            break
        time.sleep(0.2)
    time.sleep(0.5)  # the ledger mark follows the revocation
    released = _released_at(broker.audit_url, list(launched.values()))
    watcher.stop()
    for pod, launch_id in launched.items():
        end = watcher.pod_end.get(pod)
        gone = watcher.secret_gone.get(pod)
        revoked = released.get(launch_id)
        if end is None or gone is None or revoked is None:
            result.missing += 1
            continue
        result.latencies.append(max(gone, revoked) - end)
    if burst_ids:
        bursts.kill_launches(broker, burst_ids)
    client.CoreV1Api(admin).delete_collection_namespaced_pod(
        broker.namespace, label_selector=label, grace_period_seconds=0
    )
    bursts.wait_gone(admin, broker.namespace)
    return result
