"""Launch latency of the broker against the physical floor, on the real local stack.

    python -m tests.bench.launch_latency [-n 50] [--warmup 5] [--json out.json]

Starts OpenBao, PostgreSQL and the control plane (kwok nodes), a real broker
(`podbroker serve` under its own ServiceAccount, example policies applied), then runs
rounds of six operations, one of each row, in a rotating order:

  floor A   POST pods with the admin client
  floor B   POST pods, then POST secrets owned by that pod (the physical floor of a launch)
  broker    POST /v1/launches over HTTP (static token): no secrets; two KV secrets whose
            keys the catalog declares (Vault read overlaps the pod create); one KV secret
            without declared keys (Vault read before the pod create); the dynamic
            database secret orders-db; and the two-KV launch again through a second
            broker that checks every launch with Airflow's API server (task verification
            in warn mode, no cache: every launch pays one Airflow call; the synthetic
            identities fail the check, which warn mode only logs)

Each broker launch is bracketed by two scrapes of /metrics, so the deltas of
``podbroker_launch_seconds`` (one observation per launch) give that launch's exact
server-side time, and the Vault / Kubernetes call histograms its breakdown. Pods get a
long kwok run-duration so none ends mid-round; after each round the broker launches are
killed through DELETE /v1/launches/{id} (Secret deleted, leases revoked) and the floor
objects deleted, and the round waits until its pods are gone. Prints tables; asserts
nothing about time."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from podbroker_devstack.airflow_api import start_airflow_api
from podbroker_devstack.airflow_env import prepare_airflow_home
from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION
from podbroker_devstack.sources import SourceTree
from podbroker_devstack.stack import local_stack

ROUND_LABEL = "bench-round"
BENCH_LABEL = "bench"
RUN_DURATION = "10m"  # longer than any run: pods end only when the round deletes them
IMAGE = "python:3.12-slim"
COMMAND = ["python", "-c", "print('bench')"]


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    broker: bool
    dag_id: str = ""
    task_id: str = ""
    secrets: tuple[dict[str, Any], ...] = ()
    overlap: bool = True  # Vault read runs during the pod create (keys known in advance)
    verified: bool = False  # sent to the broker that verifies task instances with Airflow


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("floor_pod", "A  floor: POST pods", broker=False),
    Scenario("floor_pod_secret", "B  floor: POST pods + POST secrets", broker=False),
    Scenario("no_secrets", "1  broker: no secrets", True, "bench_plain", "run"),
    Scenario(
        "kv_declared",
        "2  broker: 2 KV, keys in catalog (overlap)",
        True,
        "analytics_reports_bench",
        "upload_bench",
        (
            # the "dashboards" grant requires file delivery for warehouse-readonly
            {"name": "warehouse-readonly", "delivery": {"type": "file", "mount_path": "/wh"}},
            {"name": "s3-reports", "delivery": {"type": "env", "prefix": "S3_"}},
        ),
    ),
    Scenario(
        "kv_undeclared",
        "3  broker: 1 KV, keys not in catalog (seq.)",
        True,
        "analytics_etl_bench",
        "load",
        ({"name": "warehouse-loader", "delivery": {"type": "env", "prefix": "LOADER_"}},),
        overlap=False,
    ),
    Scenario(
        "database",
        "4  broker: dynamic database orders-db",
        True,
        "analytics_etl_bench",
        "extract_orders",
        ({"name": "orders-db", "delivery": {"type": "env", "prefix": "DB_"}},),
    ),
    Scenario(
        "kv_declared_verified",
        "5  broker: as 2, task checked with Airflow",
        True,
        "analytics_reports_bench",
        "upload_bench",
        (
            {"name": "warehouse-readonly", "delivery": {"type": "file", "mount_path": "/wh"}},
            {"name": "s3-reports", "delivery": {"type": "env", "prefix": "S3_"}},
        ),
        verified=True,
    ),
)
FLOOR_B = "floor_pod_secret"


@dataclass
class Sample:
    client_s: float
    server_s: float | None = None
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class BenchReport:
    iterations: int
    warmup: int
    samples: dict[str, list[Sample]]
    audit_append: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    setup_seconds: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before, after


# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Sequence[float]) -> tuple[float, float, float, float]:
    """p50, p90, p99, mean in milliseconds."""
    ms = [v * 1000 for v in values]
    return (percentile(ms, 0.5), percentile(ms, 0.9), percentile(ms, 0.99), statistics.fmean(ms))


# -- /metrics -----------------------------------------------------------------------------

_SERIES = {
    "podbroker_launch_seconds": "",
    "podbroker_vault_call_seconds": "operation",
    "podbroker_kubernetes_call_seconds": "verb",
    "podbroker_airflow_call_seconds": "operation",
}


def scrape(http: httpx.Client) -> dict[str, float]:
    """``name[:label]_sum`` / ``_count`` of the broker's latency histograms."""
    text = http.get("/metrics").raise_for_status().text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in _SERIES:
            continue
        label = _SERIES[family.name]
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                suffix = sample.name.rsplit("_", 1)[1]
                key = family.name + (f":{sample.labels[label]}" if label else "")
                out[f"{key}_{suffix}"] = sample.value
    return out


def _delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def server_parts(
    before: dict[str, float], after: dict[str, float], scenario: Scenario
) -> tuple[float | None, dict[str, float]]:
    """This launch's server-side time and its breakdown (seconds)."""
    if _delta(before, after, "podbroker_launch_seconds_count") != 1:
        return None, {}
    total = _delta(before, after, "podbroker_launch_seconds_sum")
    parts = {
        "decide": _delta(before, after, "podbroker_vault_call_seconds:decide_sum"),
        "create_pod": _delta(before, after, "podbroker_kubernetes_call_seconds:create_pod_sum"),
        "resolve": _delta(before, after, "podbroker_vault_call_seconds:resolve_sum"),
        "create_secret": _delta(
            before, after, "podbroker_kubernetes_call_seconds:create_secret_sum"
        ),
    }
    # The part of the Vault read the launch waited for: all of it on the sequential
    # path, only what outlasted the pod create on the overlap path.
    wait = (
        parts["resolve"]
        if not scenario.overlap
        else max(0.0, parts["resolve"] - parts["create_pod"])
    )
    parts["vault_wait"] = wait
    # The Airflow lookup runs beside the policy fetch: only what outlasts it is waited for.
    parts["airflow"] = _delta(before, after, "podbroker_airflow_call_seconds:get_task_instance_sum")
    airflow_wait = max(0.0, parts["airflow"] - parts["decide"])
    parts["other"] = (
        total - parts["decide"] - parts["create_pod"] - parts["create_secret"] - wait - airflow_wait
    )
    return total, parts


# -- the operations -----------------------------------------------------------------------


def _floor_pod(name: str, namespace: str, round_no: int, secret: str | None) -> dict[str, Any]:
    """A pod shaped like the broker's (hardened, labelled, annotated); with ``secret``
    its env refers to that Secret's keys as the broker's pods do."""
    env: list[dict[str, Any]] = [{"name": "BENCH", "value": "1"}]
    if secret:
        env += [
            {"name": f"S_{k.upper()}", "valueFrom": {"secretKeyRef": {"name": secret, "key": k}}}
            for k in ("host", "username", "password")
        ]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {BENCH_LABEL: "floor", ROUND_LABEL: str(round_no)},
            "annotations": {RUN_DURATION_ANNOTATION: RUN_DURATION},
        },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "activeDeadlineSeconds": 3600,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "task",
                    "image": IMAGE,
                    "command": COMMAND,
                    "env": env,
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def _floor_secret(name: str, namespace: str, pod: str, uid: str) -> dict[str, Any]:
    data = {
        k: base64.b64encode(f"bench-{k}".encode()).decode()
        for k in ("host", "username", "password")
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {BENCH_LABEL: "floor"},
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid, "controller": True}
            ],
        },
        "immutable": True,
        "type": "Opaque",
        "data": data,
    }


def launch_body(scenario: Scenario, run_id: str, round_no: int) -> dict[str, Any]:
    return {
        "task": {
            "dag_id": scenario.dag_id,
            "task_id": scenario.task_id,
            "run_id": run_id,
            "try_number": 1,
        },
        "container": {"image": IMAGE, "command": COMMAND},
        "secrets": list(scenario.secrets),
        "scheduling": {
            "labels": {BENCH_LABEL: "broker", ROUND_LABEL: str(round_no)},
            "annotations": {RUN_DURATION_ANNOTATION: RUN_DURATION},
        },
    }


class Bench:
    """One broker, one admin client, one namespace; runs rounds and cleans up after each."""

    def __init__(
        self,
        broker: BrokerHandle,
        admin: client.ApiClient,
        *,
        gap: float,
        verified: BrokerHandle | None = None,
    ) -> None:
        self.broker = broker
        self.core = client.CoreV1Api(admin)
        self.namespace = broker.namespace
        self.gap = gap
        # One keep-alive connection, as an Airflow hook reusing its session would have.
        self.http = httpx.Client(base_url=broker.url, headers=broker.headers(), timeout=30)
        self.verified = verified
        self.verified_http = (
            httpx.Client(base_url=verified.url, headers=verified.headers(), timeout=30)
            if verified is not None
            else None
        )
        self._launches: list[tuple[httpx.Client, str]] = []
        self._floor_pods: list[str] = []
        self._floor_secrets: list[str] = []

    def close(self) -> None:
        self.http.close()
        if self.verified_http is not None:
            self.verified_http.close()

    def run(self, scenario: Scenario, round_no: int) -> Sample:
        tag = uuid.uuid4().hex[:10]
        if scenario.key == "floor_pod":
            return self._floor(round_no, tag, with_secret=False)
        if scenario.key == FLOOR_B:
            return self._floor(round_no, tag, with_secret=True)
        return self._launch(scenario, round_no, f"bench__{round_no}_{tag}")

    def _floor(self, round_no: int, tag: str, *, with_secret: bool) -> Sample:
        pod_name = f"bench-floor-{'b' if with_secret else 'a'}-{tag}"
        secret_name = f"bench-floor-{tag}" if with_secret else None
        manifest = _floor_pod(pod_name, self.namespace, round_no, secret_name)
        started = time.perf_counter()
        pod = self.core.create_namespaced_pod(self.namespace, manifest)
        if secret_name:
            self.core.create_namespaced_secret(
                self.namespace,
                _floor_secret(secret_name, self.namespace, pod_name, pod.metadata.uid),
                _preload_content=False,
            )
        elapsed = time.perf_counter() - started
        self._floor_pods.append(pod_name)
        if secret_name:
            self._floor_secrets.append(secret_name)
        return Sample(elapsed)

    def _launch(self, scenario: Scenario, round_no: int, run_id: str) -> Sample:
        http = self.http
        payload = launch_body(scenario, run_id, round_no)
        if scenario.verified:
            assert self.verified is not None and self.verified_http is not None
            http = self.verified_http
            payload["namespace"] = self.verified.namespace
            payload["task"]["ti_id"] = str(uuid.uuid4())
        before = scrape(http)
        started = time.perf_counter()
        response = http.post("/v1/launches", json=payload)
        elapsed = time.perf_counter() - started
        if response.status_code != 201:
            raise RuntimeError(
                f"{scenario.key}: POST /v1/launches -> {response.status_code} {response.text}"
            )
        self._launches.append((http, response.json()["launch_id"]))
        server, parts = server_parts(before, scrape(http), scenario)
        return Sample(elapsed, server, parts)

    def cleanup_round(self, round_no: int, timeout: float = 30.0) -> None:
        """Kill the round's launches through the API, delete the floor objects, and wait
        until the round's pods are gone so the next round starts on a quiet cluster."""
        for http, launch_id in self._launches:
            http.delete(f"/v1/launches/{launch_id}").raise_for_status()
        for name in self._floor_secrets:
            _ignore_404(self.core.delete_namespaced_secret, name, self.namespace)
        for name in self._floor_pods:
            _ignore_404(
                self.core.delete_namespaced_pod, name, self.namespace, grace_period_seconds=0
            )
        self._launches, self._floor_pods, self._floor_secrets = [], [], []
        deadline = time.monotonic() + timeout
        namespaces = [self.namespace] + ([self.verified.namespace] if self.verified else [])
        for namespace in namespaces:
            while self.core.list_namespaced_pod(
                namespace, label_selector=f"{ROUND_LABEL}={round_no}"
            ).items:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pods of round {round_no} still present after {timeout}s")
                time.sleep(0.05)


def _ignore_404(call: Callable[..., object], *args: object, **kwargs: object) -> None:
    try:
        call(*args, **kwargs)
    except ApiException as exc:
        if exc.status != 404:
            raise


class AuditProbe:
    """Times AuditStore.append on a fresh SQLite store next to the broker's, with the
    broker's own code and settings, inside each round so it sees the same disk load
    (in this process: the broker exposes no audit histogram). A launch makes 3 appends
    before its pod create, 2 more before its Secret create."""

    def __init__(self, folder: Path) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from broker.audit.store import open_audit_store
        from broker.core.models import TaskIdentity

        folder.mkdir(parents=True, exist_ok=True)
        self.store = open_audit_store(
            f"sqlite:///{folder / 'bench-audit.db'}", Ed25519PrivateKey.generate()
        )
        self.task = TaskIdentity(dag_id="bench_audit", task_id="t", run_id="r", try_number=1)
        self.count = 0

    def append(self) -> float:
        from broker.core import audit_events as ev

        self.count += 1
        event = ev.launch_requested(
            launch_id=f"bench{self.count:015d}",
            caller="static:bench",
            task=self.task,
            secret_names=["warehouse-readonly"],
            namespace="bench",
            image=IMAGE,
        )
        started = time.perf_counter()
        self.store.append(event)
        return time.perf_counter() - started


def rotated(items: Sequence[Scenario], by: int) -> Iterator[Scenario]:
    """Each round starts with a different row, so no row always runs first or last."""
    shift = by % len(items)
    yield from (*items[shift:], *items[:shift])


def run_bench(
    broker: BrokerHandle,
    admin: client.ApiClient,
    *,
    iterations: int = 50,
    warmup: int = 5,
    gap: float = 0.05,
    progress: Callable[[str], None] = lambda _: None,
    verified: BrokerHandle | None = None,
) -> BenchReport:
    """``warmup`` unrecorded rounds, then ``iterations`` recorded rounds of every row
    (the verified row only when a ``verified`` broker is given)."""
    bench = Bench(broker, admin, gap=gap, verified=verified)
    probe = AuditProbe(broker.config_path.parent / "bench")
    scenarios = [s for s in SCENARIOS if verified is not None or not s.verified]
    samples: dict[str, list[Sample]] = {s.key: [] for s in scenarios}
    audit: list[float] = []
    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    try:
        for round_no in range(warmup + iterations):
            for scenario in rotated(scenarios, round_no):
                sample = bench.run(scenario, round_no)
                if round_no >= warmup:
                    samples[scenario.key].append(sample)
                time.sleep(gap)
            appended = probe.append()
            if round_no >= warmup:
                audit.append(appended)
            bench.cleanup_round(round_no)
            if round_no + 1 == warmup or (round_no + 1 - warmup) % 10 == 0:
                progress(f"round {round_no + 1}/{warmup + iterations}")
    finally:
        bench.close()
    return BenchReport(
        iterations,
        warmup,
        samples,
        audit_append=audit,
        wall_seconds=time.perf_counter() - began,
        load=(load_before, os.getloadavg()[0]),
    )


# -- report -------------------------------------------------------------------------------


def format_report(report: BenchReport) -> str:
    by_key = {s.key: s for s in SCENARIOS}
    floor_b = summary([s.client_s for s in report.samples[FLOOR_B]])
    lines = [
        f"Launch latency: {report.iterations} rounds after {report.warmup} warm-up rounds, "
        "rows interleaved in a rotating order (ms)",
        "",
        "Client side (floor rows: kubernetes client; broker rows: HTTP POST /v1/launches)",
        f"{'row':<46}{'p50':>8}{'p90':>8}{'p99':>8}{'mean':>8}{'p50/B':>8}{'mean/B':>8}",
    ]
    for key, values in report.samples.items():
        p50, p90, p99, mean = summary([s.client_s for s in values])
        lines.append(
            f"{by_key[key].label:<46}{p50:8.1f}{p90:8.1f}{p99:8.1f}{mean:8.1f}"
            f"{p50 / floor_b[0]:8.2f}{mean / floor_b[3]:8.2f}"
        )
    lines += [
        "",
        "Server side: podbroker_launch_seconds, one observation per launch "
        "(/metrics deltas); HTTP = client mean - server mean",
        f"{'row':<46}{'p50':>8}{'p90':>8}{'p99':>8}{'mean':>8}{'mean/B':>8}{'HTTP':>8}",
    ]
    for key, values in report.samples.items():
        server = [s.server_s for s in values if s.server_s is not None]
        if not by_key[key].broker or not server:
            continue
        p50, p90, p99, mean = summary(server)
        http = statistics.fmean(s.client_s for s in values) * 1000 - mean
        lines.append(
            f"{by_key[key].label:<46}{p50:8.1f}{p90:8.1f}{p99:8.1f}{mean:8.1f}"
            f"{mean / floor_b[3]:8.2f}{http:8.1f}"
        )
    parts = ("decide", "airflow", "create_pod", "resolve", "vault_wait", "create_secret", "other")
    lines += [
        "",
        "Server-side mean breakdown (podbroker_vault_call_seconds / "
        "podbroker_kubernetes_call_seconds deltas)",
        "  vault_wait = part of resolve the launch waited for (all of it on the sequential",
        "  path); airflow = the task instance lookup, which runs beside decide;",
        "  other = server - decide - create_pod - vault_wait - create_secret - (airflow",
        "  beyond decide) (authentication, plan, audit appends, thread hand-offs)",
        f"{'row':<46}" + "".join(f"{p:>12}" for p in parts),
    ]
    for key, values in report.samples.items():
        with_parts = [s.parts for s in values if s.parts]
        if not by_key[key].broker or not with_parts:
            continue
        means = [statistics.fmean(p[name] for p in with_parts) * 1000 for name in parts]
        lines.append(f"{by_key[key].label:<46}" + "".join(f"{m:12.1f}" for m in means))
    if "kv_declared_verified" in report.samples and report.samples["kv_declared"]:
        plain = summary([s.client_s for s in report.samples["kv_declared"]])
        checked = summary([s.client_s for s in report.samples["kv_declared_verified"]])
        lines += [
            "",
            "Task verification (row 5 against row 2, same launch, measured side by side)",
            f"  added p50 {checked[0] - plain[0]:+.1f} ms ({checked[0] / plain[0]:.2f}x), "
            f"added mean {checked[3] - plain[3]:+.1f} ms ({checked[3] / plain[3]:.2f}x)",
        ]
    if report.audit_append:
        p50, p90, p99, mean = summary(report.audit_append)
        lines += [
            "",
            "Measured in the benchmark process (once per round) with the broker's code and "
            "settings",
            f"{'':<46}{'p50':>8}{'p90':>8}{'p99':>8}{'mean':>8}",
            f"{'audit append (SQLite, synchronous=FULL)':<46}"
            f"{p50:8.1f}{p90:8.1f}{p99:8.1f}{mean:8.1f}",
            "  on every launch's critical path: one commit (3 events) before the pod create,",
            "  one more (2 events) before the Secret create when secrets are requested",
        ]
    lines += [
        "",
        f"{os.cpu_count()} CPUs, 1-minute load average {report.load[0]:.1f} before and "
        f"{report.load[1]:.1f} after the rounds",
        f"benchmark wall time {report.wall_seconds:.0f}s"
        + (
            f", stack and broker start-up {report.setup_seconds:.0f}s"
            if report.setup_seconds
            else ""
        ),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", "--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gap", type=float, default=0.05, help="pause between operations (s)")
    parser.add_argument("--json", type=Path, help="also write every sample to this file")
    args = parser.parse_args(argv)

    def progress(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    began = time.perf_counter()
    root = Path(__file__).resolve().parents[2]
    sources = SourceTree.in_checkout(root)
    with local_stack(sources, progress=progress) as stack, contextlib.ExitStack() as running:
        progress("starting the broker ...")
        handle = start_broker(
            stack.folder / "broker", stack.kube, stack.vault, stack.postgres, sources
        )
        running.callback(handle.stop)
        progress("starting Airflow's API server and a broker that verifies with it ...")
        airflow_env = prepare_airflow_home(stack.folder / "airflow", root / "tests" / "dags")
        airflow_api = start_airflow_api(stack.folder / "airflow-api", airflow_env)
        running.callback(airflow_api.stop)
        verified = start_broker(
            stack.folder / "verified-broker",
            stack.kube,
            stack.vault,
            stack.postgres,
            sources,
            task_namespace="bench-verified",
            extra_settings={"airflow": {**airflow_api.settings("warn"), "cache_seconds": 0}},
        )
        running.callback(verified.stop)
        setup = time.perf_counter() - began
        progress(f"stack and brokers ready in {setup:.0f}s")
        with stack.kube.api_client() as admin:
            report = run_bench(
                handle,
                admin,
                iterations=args.iterations,
                warmup=args.warmup,
                gap=args.gap,
                progress=progress,
                verified=verified,
            )
        report.setup_seconds = setup
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
