"""Bounded fault loops on the local stack, then the invariants (issue 12, "A chaos suite").

Loops: SIGKILL the broker at random points across launches with KV and dynamic secrets,
then restart it; freeze (SIGSTOP/SIGCONT) Vault, the API server and the audit database in
turn under load; two replicas on one audit store, one killed. After recovery every launch
is killed through the API and the cluster and Vault are checked: no Secret without its
pod, no live lease or child token without a running pod, no duplicate pod per task try,
the audit chain verifies, every launch has a terminal record.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hvac
import psycopg
import yaml
from kubernetes import client

from broker.audit.keys import load_signing_key
from broker.audit.store import open_audit_store
from broker.core.audit_events import EventKind
from broker.core.podmeta import LAUNCH_ID_LABEL, TASK_ANNOTATION
from podbroker_devstack.broker_env import BrokerHandle, serve_broker, start_broker
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.procs import free_port
from podbroker_devstack.sources import SourceTree
from tests.chaos.faults import frozen, sigkill

TERMINAL = {
    EventKind.LAUNCH_FAILED,
    EventKind.LAUNCH_KILLED,
    EventKind.POD_FINISHED,
    EventKind.POD_DELETED,
    EventKind.SECRET_DELETED,
    EventKind.LEASES_REVOKED,
    EventKind.RECONCILER_CLEANUP,
}
DYNAMIC_LEASE_PREFIX = "database/creds/orders-readonly"


@dataclass
class Figures:
    attempted: int = 0
    accepted: int = 0
    failed_retryably: int = 0
    failed_otherwise: int = 0
    lost: int = 0
    orphans: dict[str, list[str]] = field(default_factory=dict)
    violations: dict[str, list[str]] = field(default_factory=dict)
    cleanup_seconds: float = 0.0
    accepted_ids: set[str] = field(default_factory=set)

    def print(self, title: str) -> None:
        print(f"== chaos: {title}")
        print(f"   launches attempted     {self.attempted}")
        print(f"   accepted               {self.accepted}")
        print(f"   failed retryably       {self.failed_retryably}")
        print(f"   failed otherwise       {self.failed_otherwise}")
        print(f"   lost (must be 0)       {self.lost}")
        print(f"   orphans (must be 0)    {sum(len(v) for v in self.orphans.values())}")
        for kind, items in self.orphans.items():
            print(f"     {kind}: {len(items)} {items[:3]}")
        for kind, items in self.violations.items():
            print(f"   VIOLATION {kind}: {len(items)} {items[:3]}")
        print(f"   time to clean up       {self.cleanup_seconds:.1f}s")

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and not any(self.orphans.values())
            and not any(self.violations.values())
            and self.failed_otherwise == 0
        )


class Load:
    """Launches (KV or dynamic, alternately) against whichever broker URL is current,
    one at a time, until stopped; counts outcomes."""

    def __init__(self, urls: list[str], token: str, figures: Figures, seed: int) -> None:
        self.urls, self.token, self.figures = urls, token, figures
        self.random = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def launch_once(self) -> None:
        dynamic = self.random.random() < 0.5
        body: dict[str, Any] = {
            "task": {
                "dag_id": "analytics_etl_chaos",
                "task_id": "extract_orders" if dynamic else "load",
                "run_id": uuid.uuid4().hex,
            },
            "container": {"image": "python:3.12-slim"},
            "secrets": ["orders-db" if dynamic else "warehouse-readonly"],
            "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "600s"}},
        }
        self.figures.attempted += 1
        url = self.random.choice(self.urls)
        try:
            response = httpx.post(
                f"{url}/v1/launches",
                headers={"Authorization": f"Bearer {self.token}"},
                json=body,
                timeout=30,
            )
        except httpx.HTTPError:
            self.figures.failed_retryably += 1
            time.sleep(0.2)  # the broker is restarting: back off like a client would
            return
        if response.status_code in (200, 201):
            self.figures.accepted += 1
            self.figures.accepted_ids.add(response.json()["launch_id"])
        elif response.status_code == 503 or response.json().get("retryable"):
            self.figures.failed_retryably += 1
        else:
            self.figures.failed_otherwise += 1
            print(f"   unexpected {response.status_code}: {response.text[:200]}")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.launch_once()

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)


@dataclass
class ChaosStack:
    folder: Path
    kube: ControlPlane
    vault: OpenBao
    postgres: Postgres
    sources: SourceTree

    def broker(self, name: str) -> BrokerHandle:
        database = f"chaos_{name}_{uuid.uuid4().hex[:6]}"
        with psycopg.connect(self.postgres.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        return start_broker(
            self.folder / name,
            self.kube,
            self.vault,
            self.postgres,
            self.sources,
            task_namespace=f"chaos-{name}",
            extra_settings={
                "audit": {"url": self.postgres.url(database)},
                "kubernetes": {"request_timeout_seconds": 3},
            },
        )


def sigkill_loop(stack: ChaosStack, figures: Figures, *, kills: int, seed: int) -> BrokerHandle:
    """SIGKILL the broker at random points under load, restart it each time."""
    broker = stack.broker("kill")
    rng = random.Random(seed)
    with Load([broker.url], broker.token, figures, seed):
        for _ in range(kills):
            time.sleep(rng.uniform(0.2, 2.0))
            sigkill(broker.process)
            broker.restart()
        time.sleep(1)
    return broker


def freeze_loop(stack: ChaosStack, figures: Figures, *, seconds: float, seed: int) -> BrokerHandle:
    """Freeze Vault, the API server and the audit database in turn under load."""
    broker = stack.broker("freeze")
    apiserver = next(p for p in stack.kube.processes if p.name == "kube-apiserver")
    with Load([broker.url], broker.token, figures, seed):
        for part in (stack.vault.process, apiserver, stack.postgres.process):
            time.sleep(1)
            with frozen(part):
                time.sleep(seconds)
            broker.wait_ready(60)
        time.sleep(1)
    return broker


def start_replica(first: BrokerHandle, number: int) -> BrokerHandle:
    """Another replica of ``first``: same settings and audit store, its own port."""
    settings = yaml.safe_load(first.config_path.read_text())
    settings["server"]["port"] = free_port()
    config = first.config_path.with_name(f"broker-{number}.yaml")
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    process = serve_broker(config, first.log_path.with_name(f"replica-{number}.log"))
    replica = BrokerHandle(
        f"http://127.0.0.1:{settings['server']['port']}",
        first.token,
        first.namespace,
        config,
        first.log_path,
        process,
        first.kube,
        first.vault,
        audit_url=first.audit_url,
    )
    replica.wait_ready()
    return replica


def replicas_loop(stack: ChaosStack, figures: Figures, *, seed: int) -> BrokerHandle:
    """Two replicas (same settings, one audit store); one is SIGKILLed under load and
    the survivor carries on (and cleans up after it)."""
    first = stack.broker("replicas")
    second = start_replica(first, 2)
    urls = [first.url, second.url]
    with Load(urls, first.token, figures, seed):
        time.sleep(random.Random(seed).uniform(1, 3))
        sigkill(second.process)
        urls.remove(second.url)
        time.sleep(3)
    return first


def explain(broker: BrokerHandle, launch_id: str) -> None:
    """Print what the trail and the ledger say of a launch that left something behind."""
    with open_audit_store(broker.audit_url, create=False) as store:
        for event in store.events():
            if event.launch_id == launch_id:
                print(f"   {launch_id} {event.time:%H:%M:%S.%f} {event.kind} {event.details}")
        for held in store.holdings().unreleased():
            if held.launch_id == launch_id:
                print(f"   {launch_id} ledger: unreleased {held}")


def check(
    broker: BrokerHandle, figures: Figures, root: hvac.Client, *, settle_seconds: float = 45
) -> None:
    """Kill every accepted launch through the API, wait (at most ``settle_seconds``) for
    the cluster to settle, then check the invariants."""
    core_api = broker.kube.api_client()
    core = client.CoreV1Api(core_api)
    selector = "podbroker.dev/managed-by=podbroker"
    pods = core.list_namespaced_pod(broker.namespace, label_selector=selector).items
    # One pod per task try: the task annotation names the try (dag, task, run, try, map).
    tries = Counter((p.metadata.annotations or {}).get(TASK_ANNOTATION) for p in pods)
    figures.violations["duplicate pod per task try"] = [str(k) for k, n in tries.items() if n > 1]

    started = time.monotonic()
    # Every launch the broker recorded, also those whose answer the client never got (the
    # broker was killed after making the pod): Airflow would retry that try, reattach and
    # end it; here it is ended directly. Unknown ids answer 404.
    with open_audit_store(broker.audit_url, create=False) as store:
        recorded_ids = {
            e.launch_id
            for e in store.events()
            if e.kind == EventKind.POD_CREATED and e.launch_id is not None
        }
    for launch_id in sorted(figures.accepted_ids | recorded_ids):
        httpx.delete(f"{broker.url}/v1/launches/{launch_id}", headers=broker.headers(), timeout=30)
    deadline = time.monotonic() + settle_seconds
    while time.monotonic() < deadline:
        pods = core.list_namespaced_pod(broker.namespace, label_selector=selector).items
        secrets = core.list_namespaced_secret(broker.namespace, label_selector=selector).items
        leases = root.list(f"sys/leases/lookup/{DYNAMIC_LEASE_PREFIX}") or {}
        live = {p.metadata.labels.get(LAUNCH_ID_LABEL) for p in pods}
        # A child token minted by a broker killed before recording it ends on its own
        # within the mint grace (30 s): wait for that too.
        quiet = not pods and not secrets and not (leases.get("data") or {}).get("keys")
        if quiet and not _child_tokens_outside(root, live):
            break
        time.sleep(1)
    figures.cleanup_seconds = time.monotonic() - started
    running = {
        p.metadata.labels.get(LAUNCH_ID_LABEL)
        for p in core.list_namespaced_pod(broker.namespace, label_selector=selector).items
        if p.status and p.status.phase == "Running"
    }
    figures.orphans["secret without its pod"] = [
        s.metadata.name
        for s in core.list_namespaced_secret(broker.namespace, label_selector=selector).items
    ]
    for name in figures.orphans["secret without its pod"]:
        explain(broker, name.removeprefix("podbroker-"))
    leases = root.list(f"sys/leases/lookup/{DYNAMIC_LEASE_PREFIX}") or {}
    figures.orphans["live lease without a running pod"] = [
        f"{DYNAMIC_LEASE_PREFIX}/{k}" for k in (leases.get("data") or {}).get("keys") or []
    ]
    figures.orphans["child token without a running pod"] = _child_tokens_outside(root, running)
    core_api.close()

    key = load_signing_key(broker.config_path.parent / "audit-signing.pem")
    with open_audit_store(broker.audit_url, create=False) as store:
        result = store.verify(key.public_key())
        if not result.ok:
            figures.violations["audit chain"] = [str(result)]
        requested: set[str] = set()
        terminal: set[str] = set()
        recorded: set[str] = set()
        for event in store.events():
            if not event.launch_id:
                continue
            recorded.add(event.launch_id)
            if event.kind == EventKind.LAUNCH_REQUESTED:
                requested.add(event.launch_id)
            if event.kind in TERMINAL:
                terminal.add(event.launch_id)
    figures.violations["launch without a terminal record"] = sorted(requested - terminal)
    figures.lost = len(figures.accepted_ids - recorded)


@dataclass(frozen=True)
class Sizes:
    kills: int
    freeze_seconds: float


SMOKE = Sizes(kills=2, freeze_seconds=2.0)
FULL = Sizes(kills=25, freeze_seconds=8.0)


def run_all(stack: ChaosStack, sizes: Sizes, seed: int = 12) -> dict[str, Figures]:
    """Every loop with its own broker and task namespace; figures per loop."""
    root = hvac.Client(url=stack.vault.url, token=stack.vault.root_token)
    results: dict[str, Figures] = {}
    loops = {
        "SIGKILL the broker across launches": lambda f: sigkill_loop(
            stack, f, kills=sizes.kills, seed=seed
        ),
        "freeze Vault, API server, audit database": lambda f: freeze_loop(
            stack, f, seconds=sizes.freeze_seconds, seed=seed
        ),
        "two replicas, one killed": lambda f: replicas_loop(stack, f, seed=seed),
    }
    for title, loop in loops.items():
        figures = Figures()
        broker = loop(figures)
        try:
            check(broker, figures, root)
        finally:
            broker.stop()
        figures.print(title)
        results[title] = figures
    return results


def _child_tokens_outside(root: hvac.Client, launch_ids: set[str | None]) -> list[str]:
    """Accessors of the chaos DAG's child tokens whose launch is not in ``launch_ids``."""
    tokens = []
    for accessor in (root.list("auth/token/accessors") or {}).get("data", {}).get("keys", []):
        try:
            meta = root.auth.token.lookup_accessor(accessor)["data"].get("meta") or {}
        except hvac.exceptions.VaultError:
            continue  # gone meanwhile
        ours = meta.get("dag_id") == "analytics_etl_chaos"
        if ours and meta.get("launch_id") not in launch_ids:
            tokens.append(accessor)
    return tokens
