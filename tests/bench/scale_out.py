"""`make bench-scale` (issue 15, figure 7): several broker replicas sharing one PostgreSQL
audit store, many kwok nodes, many task pods in flight, one replica SIGKILLed mid-run.

    python -m tests.bench.scale_out [--replicas 3] [--nodes 200] [--pods 1000]
        [--concurrency 50] [--seed 15]

The launches (no secrets and two KV secrets, alternately) are spread over the replicas;
each one runs for ten minutes, so they are all in flight at the end of the submission.
Half-way through, the last replica is SIGKILLed; a launch that fails on a replica (not a
503, which the client waits out as the operator does) is tried once more on another.
Then every launch is ended through the API and the invariants of the chaos suite are
checked (no Secret, lease or child token without its pod, one pod per task try, the
chain verifies, a terminal record per launch), plus duplicate cleanups (a launch whose
Secret deletion was recorded twice). The floor is the API server's own Pod + Secret
create at the same concurrency, in the same run. Stack start-up and adding nodes are
printed apart and are in no figure; nothing asserts on time.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import hvac
import yaml
from kubernetes import client

from broker.audit.store import open_audit_store
from broker.core.audit_events import EventKind
from podbroker_devstack.broker_env import BrokerHandle, apply_example_policies
from podbroker_devstack.kube import KWOK_NODE_ANNOTATION
from podbroker_devstack.sources import SourceTree
from podbroker_devstack.stack import local_stack
from tests.bench import burst as bursts
from tests.chaos.faults import sigkill
from tests.chaos.suite import ChaosStack, Figures, check, explain, start_replica

KINDS = ("no_secrets", "kv")


@dataclass
class ScaleOutFigures:
    replicas: int
    nodes: int
    pods: int
    concurrency: int
    accepted: int = 0
    retried: int = 0
    failed_beyond_one_retry: int = 0
    waited_503: int = 0
    in_flight: int = 0
    submit_seconds: float = 0.0
    floor_per_second: float = 0.0
    duplicate_cleanups: int = 0
    policy_cache_seconds: float = 10.0
    policy_change_seconds: list[float] = field(default_factory=list)
    """Per live replica: from a grant's removal applied in Vault to its first denial."""
    invariants: Figures = field(default_factory=Figures)
    samples: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.accepted / self.submit_seconds if self.submit_seconds else 0.0

    @property
    def ok(self) -> bool:
        return (
            len(self.policy_change_seconds) >= 1
            and max(self.policy_change_seconds) <= self.policy_cache_seconds + 1
            and self.failed_beyond_one_retry == 0
            and self.duplicate_cleanups == 0
            and self.invariants.ok
            and self.accepted == self.pods
        )

    def print(self) -> None:
        inv = self.invariants
        ratio = self.per_second / self.floor_per_second if self.floor_per_second else 0.0
        orphans = sum(len(v) for v in inv.orphans.values())
        rows = [
            ("replicas / kwok nodes", f"{self.replicas} / {self.nodes}", ""),
            ("launches accepted", f"{self.accepted} of {self.pods}", f"= {self.pods}"),
            ("task pods in flight after submission", str(self.in_flight), f"= {self.pods}"),
            ("failed beyond one retry", str(self.failed_beyond_one_retry), "0"),
            ("retried once on another replica", str(self.retried), ""),
            ("503s waited out", str(self.waited_503), ""),
            ("orphans after grace", str(orphans), "0"),
            (
                "duplicate pods per task try",
                str(len(inv.violations.get("duplicate pod per task try", []))),
                "0",
            ),
            ("duplicate cleanups", str(self.duplicate_cleanups), "0"),
            (
                "audit chain",
                "verifies" if "audit chain" not in inv.violations else "BROKEN",
                "verifies",
            ),
            (
                "launches without a terminal record",
                str(len(inv.violations.get("launch without a terminal record", []))),
                "0",
            ),
            (f"throughput at concurrency {self.concurrency}", f"{self.per_second:.1f}/s", ""),
            ("floor (Pod + Secret create)", f"{self.floor_per_second:.1f}/s", ""),
            ("throughput / floor", f"{ratio:.2f}x", ">= 0.8x"),
            ("time to clean up after the end", f"{inv.cleanup_seconds:.1f} s", ""),
            (
                "grant removal enforced, slowest replica",
                f"{max(self.policy_change_seconds, default=float('nan')):.1f} s",
                f"<= cache {self.policy_cache_seconds:g} s + 1 s probe",
            ),
        ]
        print("Scale-out run (issue 15, figure 7): value, goal")
        for name, value, goal in rows:
            print(f"  {name:<40} {value:>14}   {goal}")
        for sample in self.samples[:5]:
            print(f"  sample failure: {sample}")
        print(f"  verdict: {'OK' if self.ok else 'MISS'}")


def add_kwok_nodes(api: client.ApiClient, total: int, progress: Callable[[str], None]) -> list[str]:
    """Nodes kwok-node-1 ... up to ``total`` nodes (kwok-node-0 comes with the stack),
    each managed by kwok (the annotation), waited for until Ready; the names added."""
    core = client.CoreV1Api(api)
    existing = {n.metadata.name for n in core.list_node().items}
    added = [f"kwok-node-{i}" for i in range(1, total) if f"kwok-node-{i}" not in existing]
    for name in added:
        core.create_node(
            client.V1Node(
                metadata=client.V1ObjectMeta(
                    name=name,
                    annotations={KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    labels={"kubernetes.io/hostname": name, "type": "kwok"},
                )
            )
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready = sum(
            any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))
            for n in core.list_node().items
        )
        if ready >= total:
            progress(f"[scale-out] {ready} kwok nodes Ready")
            return added
        time.sleep(1)
    raise RuntimeError(f"only {ready} of {total} kwok nodes became Ready")


class Submitter:
    """Posts launches across the live replicas; a failure other than a 503 is tried once
    more on another replica."""

    def __init__(self, replicas: list[BrokerHandle], figures: ScaleOutFigures) -> None:
        self.live = [r.url for r in replicas]
        self.token = replicas[0].token
        self.figures = figures
        self.launch_ids: list[str] = []
        self._lock = threading.Lock()
        limits = httpx.Limits(
            max_connections=figures.concurrency, max_keepalive_connections=figures.concurrency
        )
        self.http = httpx.Client(
            headers={"Authorization": f"Bearer {self.token}"}, timeout=60, limits=limits
        )

    def drop(self, url: str) -> None:
        with self._lock:
            self.live.remove(url)

    def submit(self, i: int, tag: str) -> None:
        body = bursts.launch_body(KINDS[i % len(KINDS)], f"scaleout__{tag}_{i}", tag)
        for attempt in range(2):
            with self._lock:
                url = self.live[(i + attempt) % len(self.live)]
            try:
                retries: list[int] = []
                _, launch_id = self._post(url, body, retries)
            except (httpx.HTTPError, RuntimeError) as exc:
                with self._lock:
                    if attempt == 0:
                        self.figures.retried += 1
                        continue
                    self.figures.failed_beyond_one_retry += 1
                    self.figures.samples.append(f"{type(exc).__name__}: {str(exc)[:160]}")
                return
            with self._lock:
                self.figures.accepted += 1
                self.figures.waited_503 += len(retries)
                self.launch_ids.append(launch_id)
            return

    def _post(self, url: str, body: dict[str, object], retries: list[int]) -> tuple[float, str]:
        started = time.perf_counter()
        while True:
            response = self.http.post(f"{url}/v1/launches", json=body)
            if response.status_code == 503 and response.headers.get("Retry-After"):
                retries.append(1)
                time.sleep(float(response.headers["Retry-After"]))
                continue
            if response.status_code not in (200, 201):
                raise RuntimeError(f"{response.status_code} {response.text[:160]}")
            return time.perf_counter() - started, str(response.json()["launch_id"])


REMOVED_GRANT = "reports-upload"
PROBE = {
    "task": {"dag_id": "analytics_reports_probe", "task_id": "upload_probe", "run_id": "probe"},
    "container": {"image": bursts.IMAGE},
    "secrets": ["s3-reports"],
}


def without_grant(folder: Path, target: Path, grant_id: str) -> Path:
    """A copy of the policy folder ``folder`` without the grant ``grant_id``."""
    shutil.copytree(folder, target)
    for path in (target / "teams").glob("*.yaml"):
        document = yaml.safe_load(path.read_text())
        kept = [g for g in document.get("grants", []) if g.get("id") != grant_id]
        if len(kept) != len(document.get("grants", [])):
            path.write_text(yaml.safe_dump({**document, "grants": kept}, sort_keys=False))
            return target
    raise ValueError(f"no grant {grant_id!r} in {folder}")


def time_policy_change(stack: ChaosStack, urls: list[str], token: str, work: Path) -> list[float]:
    """Apply the example policies without one grant; per replica, seconds until its
    dry run of a launch that grant allowed is denied. The grant is put back after."""
    headers = {"Authorization": f"Bearer {token}"}

    def allowed(url: str) -> bool:
        response = httpx.post(
            f"{url}/v1/launches",
            params={"dry_run": "true"},
            json=PROBE,
            headers=headers,
            timeout=30,
        )
        if response.status_code != 200:
            raise RuntimeError(f"probe: {response.status_code} {response.text[:160]}")
        return bool(response.json()["decision"]["allowed"])  # a denial is a decision

    if not all(allowed(url) for url in urls):
        raise RuntimeError("the probe is denied before the change")
    # --prune: without it, apply keeps what the files no longer name.
    changed = without_grant(stack.sources.policies, work, REMOVED_GRANT)
    apply_example_policies(stack.vault, changed, prune=True)
    applied = time.monotonic()
    pending, seconds = set(urls), []
    while pending and time.monotonic() - applied < 120:
        for url in sorted(pending):
            if not allowed(url):
                seconds.append(time.monotonic() - applied)
                pending.discard(url)
        time.sleep(0.25)
    apply_example_policies(stack.vault, stack.sources.policies, prune=True)
    return seconds if not pending else [*seconds, float("inf")]


def run_scale_out(
    stack: ChaosStack,
    *,
    replicas: int,
    nodes: int,
    pods: int,
    concurrency: int,
    progress: Callable[[str], None] = print,
) -> ScaleOutFigures:
    figures = ScaleOutFigures(replicas, nodes, pods, concurrency)
    admin = stack.kube.api_client()
    added_nodes = add_kwok_nodes(admin, nodes, progress)
    try:
        return _run(stack, figures, admin, progress)
    finally:
        # The control plane may be shared (the smoke test runs on the session's): leave
        # it with the nodes it had, or later pods land on these.
        core = client.CoreV1Api(admin)
        for name in added_nodes:
            core.delete_node(name)
        admin.close()


def _run(
    stack: ChaosStack,
    figures: ScaleOutFigures,
    admin: client.ApiClient,
    progress: Callable[[str], None],
) -> ScaleOutFigures:
    replicas, pods, concurrency = figures.replicas, figures.pods, figures.concurrency
    first = stack.broker("scaleout")
    handles = [first] + [start_replica(first, n) for n in range(2, replicas + 1)]
    progress(f"[scale-out] {replicas} replicas ready on one PostgreSQL audit store")
    floor = bursts.floor_burst(admin, first.namespace, concurrency)
    figures.floor_per_second = floor.throughput
    progress(f"[scale-out] floor {floor.throughput:.1f}/s at concurrency {concurrency}")

    submitter = Submitter(handles, figures)
    tag = f"so-{uuid.uuid4().hex[:8]}"
    done = Counter[str]()
    victim = handles[-1] if replicas > 1 else None
    killed = threading.Event()

    def one(i: int) -> None:
        submitter.submit(i, tag)
        with submitter._lock:
            done["n"] += 1
            half = done["n"] >= pods // 2
        if victim is not None and half and not killed.is_set():
            killed.set()
            submitter.drop(victim.url)
            sigkill(victim.process)
            progress(f"[scale-out] SIGKILLed replica {replicas} after {done['n']} launches")

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(pods)))
    figures.submit_seconds = time.perf_counter() - started
    submitter.http.close()
    core = client.CoreV1Api(admin)
    selector = f"{bursts.BURST_LABEL}={tag}"

    def running() -> int:
        listed = core.list_namespaced_pod(first.namespace, label_selector=selector).items
        return sum(1 for p in listed if p.status and p.status.phase == "Running")

    # The scheduler and kwok start pods a moment after their launch answers.
    settle = time.monotonic() + max(60.0, pods * 0.2)
    figures.in_flight = running()
    while figures.in_flight < figures.accepted and time.monotonic() < settle:
        time.sleep(1)
        figures.in_flight = running()
    if figures.in_flight < figures.accepted:
        listed = core.list_namespaced_pod(first.namespace, label_selector=selector).items
        phases = Counter(p.status.phase if p.status else "?" for p in listed)
        figures.samples.append(f"pods by phase when counted: {dict(phases)}")
    progress(
        f"[scale-out] {figures.accepted} accepted in {figures.submit_seconds:.1f}s, "
        f"{figures.in_flight} pods Running; ending them"
    )

    settings = yaml.safe_load(first.config_path.read_text())
    figures.policy_cache_seconds = float(settings["vault"]["policy_cache_seconds"])
    figures.policy_change_seconds = time_policy_change(
        stack, list(submitter.live), first.token, stack.folder / "policies-changed"
    )
    progress(f"[scale-out] grant removal enforced after {figures.policy_change_seconds} s")
    root = hvac.Client(url=stack.vault.url, token=stack.vault.root_token)
    figures.invariants.accepted_ids = set(submitter.launch_ids)
    try:
        check(first, figures.invariants, root, settle_seconds=max(45.0, pods * 0.3))
        with open_audit_store(first.audit_url, create=False) as store:
            deletions = Counter(
                e.launch_id for e in store.events() if e.kind == EventKind.SECRET_DELETED
            )
        twice = [launch_id for launch_id, n in deletions.items() if n > 1 and launch_id]
        figures.duplicate_cleanups = len(twice)
        for launch_id in twice[:3]:
            explain(first, launch_id)
    finally:
        for handle in handles:
            handle.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args(argv)
    sources = SourceTree.in_checkout(Path(__file__).resolve().parents[2])
    started = time.monotonic()
    with local_stack(sources, progress=print) as stack:
        print(f"[scale-out] stack ready in {time.monotonic() - started:.0f}s")
        chaos = ChaosStack(stack.folder, stack.kube, stack.vault, stack.postgres, sources)
        figures = run_scale_out(
            chaos,
            replicas=args.replicas,
            nodes=args.nodes,
            pods=args.pods,
            concurrency=args.concurrency,
        )
    figures.print()
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())
