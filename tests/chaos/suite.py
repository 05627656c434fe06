"""Bounded fault loops on the local stack, then the invariants (issue 12, "A chaos suite").

Loops: SIGKILL the broker across launches with KV and dynamic secrets, half of the kills
aimed at the moment between a Vault read and the Secret create, then restart it; freeze
(SIGSTOP/SIGCONT) Vault, the API server and the audit database in turn under load; two
replicas on one audit store racing on the same task try, one killed. The load behaves
like the Airflow operator: a lost answer or a 503 is retried with the SAME task try, and
a try that keeps failing is followed by the next try of the same run. After recovery
every launch is killed through the API and the cluster and Vault are checked: no Secret
without its pod, no live lease or child token without a running pod, no revoked lease or
token under a running pod, no duplicate pod per task try, one creator per raced try, the
audit chain verifies, every launch has a terminal record.
"""

from __future__ import annotations

import datetime as dt
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
from broker.core import podmeta
from broker.core.audit_events import EventKind
from broker.core.plan import secret_name_for
from broker.core.podmeta import LAUNCH_ID_LABEL, TASK_ANNOTATION
from podbroker_devstack.broker_env import BrokerHandle, serve_broker, start_broker
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.procs import free_port
from podbroker_devstack.sources import SourceTree
from tests.chaos.faults import frozen, resume, sigkill, stop

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
CHAOS_DAG = "analytics_etl_chaos"

# What the load launches (task id, secrets), all granted by the example policies:
KINDS: dict[str, tuple[str, list[str]]] = {
    # keys in the catalog: pod created while Vault is read; a batch token, no ledger entry
    "kv": ("load", ["warehouse-readonly"]),
    # a PostgreSQL login: a lease under a service token, both in the holdings ledger
    "dynamic": ("extract_orders", ["orders-db"]),
    # warehouse-loader's keys are learnt by reading it: Vault is read BEFORE the pod is
    # created, so the pod create lies between the Vault read and the Secret create
    "sequential": ("extract_orders_all", ["orders-db", "warehouse-loader"]),
}

# The operator makes 3 attempts at one try, waiting Retry-After (5 s when the broker is
# unreachable) up to 10 s; here the wait is capped at 2 s to keep the loops short, which
# still spans a broker restart.
ATTEMPTS_PER_TRY = 3
RETRY_WAIT_CAP = 2.0
TRIES_PER_RUN = 2  # then Airflow would give up on the task instance


@dataclass(frozen=True)
class Sizes:
    kills: int
    freeze_seconds: float
    threads: int = 1
    """Load threads: each runs one task try at a time."""
    replica_seconds: tuple[float, float] = (3.0, 3.0)
    """Load on two replicas before the kill (at most), then on the survivor."""
    race: float = 0.5
    """Share of the replica loop's tries sent to both replicas at once."""
    gap_search_seconds: float = 10.0


# The smoke races too: before one attempt per launch it found, nearly every time, the
# loser of a race giving back the winner's lease (now a regression test in
# tests/integration/test_broker_holdings.py).
SMOKE = Sizes(kills=2, freeze_seconds=2.0, race=0.3)
FULL = Sizes(kills=30, freeze_seconds=8.0, threads=3, replica_seconds=(40.0, 15.0), race=0.3)


@dataclass
class Figures:
    attempted: int = 0
    """Launch requests sent (every POST, retries of a try included)."""
    accepted: int = 0
    failed_retryably: int = 0
    failed_otherwise: int = 0
    lost: int = 0
    tries: Counter[str] = field(default_factory=Counter)
    """Task tries launched, by kind of secrets."""
    same_try_retries: int = 0
    next_tries: int = 0
    reattached: int = 0
    races: int = 0
    kills: int = 0
    gap_kills: int = 0
    """SIGKILLs that landed after a Vault read and before its Secret existed."""
    orphans: dict[str, list[str]] = field(default_factory=dict)
    violations: dict[str, list[str]] = field(default_factory=dict)
    known: dict[str, list[str]] = field(default_factory=dict)
    """Findings of a defect that has a failing (xfail) regression test, by defect."""
    cleanup_seconds: float = 0.0
    loop_seconds: float = 0.0
    accepted_ids: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def violation(self, kind: str, item: str) -> None:
        with self._lock:
            self.violations.setdefault(kind, []).append(item)

    def print(self, title: str) -> None:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.tries.items()))
        print(f"== chaos: {title}")
        print(f"   task tries launched    {sum(self.tries.values())} ({kinds})")
        print(f"   launches attempted     {self.attempted} (requests, retries included)")
        print(f"   same try retried       {self.same_try_retries}")
        print(f"   next try of a run      {self.next_tries}")
        print(f"   raced on two replicas  {self.races}")
        print(f"   accepted               {self.accepted} ({self.reattached} reattached)")
        print(f"   failed retryably       {self.failed_retryably}")
        print(f"   failed otherwise       {self.failed_otherwise}")
        if self.kills:
            print(f"   broker SIGKILLs        {self.kills} ({self.gap_kills} in the gap)")
        print(f"   lost (must be 0)       {self.lost}")
        print(f"   orphans (must be 0)    {sum(len(v) for v in self.orphans.values())}")
        for kind, items in self.orphans.items():
            print(f"     {kind}: {len(items)} {items[:3]}")
        for kind, items in self.violations.items():
            if items:
                print(f"   VIOLATION {kind}: {len(items)} {items[:3]}")
        for defect, items in self.known.items():
            if items:
                print(f"   KNOWN DEFECT {defect}: {len(items)} {items[:3]}")
        print(f"   time under load        {self.loop_seconds:.1f}s")
        print(f"   time to clean up       {self.cleanup_seconds:.1f}s")

    @property
    def ok_but_known(self) -> bool:
        """Every invariant holds, apart from findings of known defects."""
        return (
            self.lost == 0
            and not any(self.orphans.values())
            and not any(self.violations.values())
            and self.failed_otherwise == 0
        )

    @property
    def ok(self) -> bool:
        return self.ok_but_known and not any(self.known.values())


def launch_body(kind: str, run_id: str, try_number: int) -> dict[str, Any]:
    task_id, secrets = KINDS[kind]
    return {
        "task": {
            "dag_id": CHAOS_DAG,
            "task_id": task_id,
            "run_id": run_id,
            "try_number": try_number,
        },
        "container": {"image": "python:3.12-slim"},
        "secrets": secrets,
        "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "600s"}},
    }


class Load:
    """Task tries (KV, dynamic or sequential secrets, at random) against the current
    broker URLs, from ``threads`` threads until stopped, retried as the operator does;
    with ``race`` > 0 that share of tries is sent to two replicas at once."""

    def __init__(
        self,
        urls: list[str],
        token: str,
        figures: Figures,
        seed: int,
        *,
        threads: int = 1,
        race: float = 0.0,
    ) -> None:
        self.urls, self.figures, self.race = urls, figures, race
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(seed + i,), daemon=True)
            for i in range(threads)
        ]
        self.http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def post(self, url: str, body: dict[str, Any]) -> tuple[str, dict[str, Any] | None, float]:
        """One request; (outcome, view, wait): ("ok", the launch, 0), ("retry", None,
        seconds the operator would wait) or ("failed", None, 0)."""
        self.figures.add(attempted=1)
        try:
            response = self.http.post(f"{url}/v1/launches", json=body)
        except httpx.HTTPError:
            self.figures.add(failed_retryably=1)
            return "retry", None, 5.0  # the operator's wait for an unreachable broker
        if response.status_code in (200, 201):
            view = response.json()
            with self.figures._lock:
                self.figures.accepted += 1
                self.figures.accepted_ids.add(view["launch_id"])
                self.figures.reattached += not view.get("created", True)
            return "ok", view, 0.0
        if response.status_code == 503 or _says_retryable(response):
            self.figures.add(failed_retryably=1)
            return "retry", None, float(response.headers.get("Retry-After", "5"))
        self.figures.add(failed_otherwise=1)
        print(f"   unexpected {response.status_code}: {response.text[:200]}")
        return "failed", None, 0.0

    def launch_try(self, rng: random.Random, body: dict[str, Any]) -> bool:
        """The operator's launch of one try: the same request again after a lost answer
        or a 503 (it is idempotent per try). False when every attempt failed."""
        for attempt in range(ATTEMPTS_PER_TRY):
            if attempt:
                self.figures.add(same_try_retries=1)
            outcome, _, wait = self.post(rng.choice(self.urls), body)
            if outcome != "retry":
                return True
            if self._stop.wait(min(wait, RETRY_WAIT_CAP)):
                return True  # the loop is over: this try is not retried any more
        return False

    def race_try(self, body: dict[str, Any]) -> None:
        """The same try sent to two replicas at the same moment (a retry routed to the
        other replica while the first still works on the original request). Every
        answer must name the same launch, and at most one may say it created it."""
        self.figures.add(races=1)
        urls = self.urls[:2] if len(self.urls) > 1 else self.urls * 2
        start = threading.Barrier(len(urls))
        views: list[dict[str, Any]] = []

        def one(url: str) -> None:
            start.wait()
            _, view, _ = self.post(url, body)
            if view is not None:
                views.append(view)

        racers = [threading.Thread(target=one, args=(url,)) for url in urls]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join()
        task = f"{body['task']['task_id']}/{body['task']['run_id']}/{body['task']['try_number']}"
        if len({v["launch_id"] for v in views}) > 1:
            self.figures.violation("raced try answered with two launches", task)
        if sum(bool(v.get("created", True)) for v in views) > 1:
            self.figures.violation("raced try created twice", task)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            kind = rng.choice(sorted(KINDS))
            run_id = uuid.uuid4().hex
            for try_number in range(1, TRIES_PER_RUN + 1):
                if try_number > 1:
                    self.figures.add(next_tries=1)
                with self.figures._lock:
                    self.figures.tries[kind] += 1
                body = launch_body(kind, run_id, try_number)
                if self.race and rng.random() < self.race:
                    self.race_try(body)
                    break
                if self.launch_try(rng, body) or self._stop.is_set():
                    break

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        self.http.close()


def _says_retryable(response: httpx.Response) -> bool:
    try:
        return bool(response.json().get("retryable"))
    except ValueError:
        return False


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


def kill_in_the_gap(
    broker: BrokerHandle,
    core: client.CoreV1Api,
    rng: random.Random,
    answered: set[str],
    *,
    search_seconds: float,
) -> bool:
    """SIGKILL the broker between a Vault read and the Secret create of one launch.

    That moment lasts milliseconds, so it is found rather than timed: the broker is
    frozen (SIGSTOP) at random short intervals and, while frozen, the holdings ledger
    and the API server are asked whether a launch begun since this search started, and
    not yet answered (``answered``), holds a lease (recorded once Vault answered the
    read) but has no Secret. If so the broker is killed where it stands; if not it is
    resumed. After ``search_seconds`` without
    such a moment it is killed anyway. True if the kill landed in the gap (the Secret
    still absent after the kill: its create had not been sent)."""
    started = dt.datetime.now(dt.UTC)
    deadline = time.monotonic() + search_seconds
    with open_audit_store(broker.audit_url, create=False) as store:
        ledger = store.holdings()
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(0.005, 0.05))
            stopped = stop(broker.process)
            try:
                candidates = [
                    held.launch_id
                    for held in ledger.unreleased()
                    if held.holdings.lease_ids
                    and held.created_at >= started
                    and held.launch_id not in answered
                ]
                in_gap = [
                    launch_id
                    for launch_id in candidates
                    if not _secret_exists(core, broker.namespace, launch_id)
                ]
            except Exception:
                resume(stopped)
                raise
            if in_gap:
                sigkill(broker.process)
                return not any(_secret_exists(core, broker.namespace, i) for i in in_gap)
            resume(stopped)
    sigkill(broker.process)
    return False


def _secret_exists(core: client.CoreV1Api, namespace: str, launch_id: str) -> bool:
    try:
        core.read_namespaced_secret(secret_name_for(launch_id), namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def sigkill_loop(stack: ChaosStack, figures: Figures, sizes: Sizes, *, seed: int) -> BrokerHandle:
    """SIGKILL the broker under load, every other time in the gap between a Vault read
    and the Secret create (:func:`kill_in_the_gap`), else at a random moment; restart
    it each time."""
    broker = stack.broker("kill")
    rng = random.Random(seed)
    with (
        broker.kube.api_client() as api,
        Load([broker.url], broker.token, figures, seed, threads=sizes.threads),
    ):
        core = client.CoreV1Api(api)
        for n in range(sizes.kills):
            if n % 2 == 0:  # the search waits on its own
                landed = kill_in_the_gap(
                    broker,
                    core,
                    rng,
                    figures.accepted_ids,
                    search_seconds=sizes.gap_search_seconds,
                )
                figures.add(gap_kills=int(landed))
            else:
                time.sleep(rng.uniform(0.2, 2.0))
                sigkill(broker.process)
            figures.add(kills=1)
            broker.restart()
        time.sleep(1)
    return broker


def freeze_loop(stack: ChaosStack, figures: Figures, sizes: Sizes, *, seed: int) -> BrokerHandle:
    """Freeze Vault, the API server and the audit database in turn under load."""
    broker = stack.broker("freeze")
    apiserver = next(p for p in stack.kube.processes if p.name == "kube-apiserver")
    with Load([broker.url], broker.token, figures, seed, threads=sizes.threads):
        for part in (stack.vault.process, apiserver, stack.postgres.process):
            time.sleep(1)
            with frozen(part):
                time.sleep(sizes.freeze_seconds)
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


def replicas_loop(stack: ChaosStack, figures: Figures, sizes: Sizes, *, seed: int) -> BrokerHandle:
    """Two replicas (same settings, one audit store) get the same task try at once now
    and then; one is SIGKILLed under load and the survivor carries on (and cleans up
    after it)."""
    first = stack.broker("replicas")
    second = start_replica(first, 2)
    urls = [first.url, second.url]
    before, after = sizes.replica_seconds
    with Load(urls, first.token, figures, seed, threads=sizes.threads, race=sizes.race):
        time.sleep(random.Random(seed).uniform(before / 2, before))
        sigkill(second.process)
        figures.add(kills=1)
        urls.remove(second.url)
        time.sleep(after)
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


def _revoked_under_running_pods(
    core: client.CoreV1Api, namespace: str, root: hvac.Client
) -> list[str]:
    """Launches whose pod runs (not being deleted) while a lease or the child token its
    Secret names is gone from Vault: the task would hold dead credentials."""
    selector = "podbroker.dev/managed-by=podbroker"
    running = {
        (p.metadata.labels or {}).get(LAUNCH_ID_LABEL)
        for p in core.list_namespaced_pod(namespace, label_selector=selector).items
        if p.status and p.status.phase == "Running" and not p.metadata.deletion_timestamp
    }
    found = []
    for secret in core.list_namespaced_secret(namespace, label_selector=selector).items:
        launch_id = (secret.metadata.labels or {}).get(LAUNCH_ID_LABEL)
        if launch_id not in running:
            continue
        held = podmeta.holdings_of(secret.metadata.annotations or {})
        dead = [lease for lease in held.lease_ids if not _lease_alive(root, lease)]
        if held.token_accessor and not _token_alive(root, held.token_accessor):
            dead.append(f"token {held.token_accessor}")
        if dead:
            found.append(f"{launch_id}: {', '.join(dead)}")
    return found


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
    revoked = _revoked_under_running_pods(core, broker.namespace, root)
    figures.violations["lease or token revoked under a running pod"] = revoked
    for item in revoked[:3]:
        explain(broker, item.split(":")[0])

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
    for accessor in figures.orphans["child token without a running pod"][:3]:
        meta = root.auth.token.lookup_accessor(accessor)["data"].get("meta") or {}
        explain(broker, str(meta.get("launch_id")))
    core_api.close()

    key = load_signing_key(broker.config_path.parent / "audit-signing.pem")
    # A launch whose broker was killed between its intent and its pod is closed by the
    # sweep once the orphan grace has passed (its retries are refused meanwhile, one
    # attempt at a time): give the sweep that long (5 s grace + 5 s interval here).
    deadline = time.monotonic() + 20
    while True:
        with open_audit_store(broker.audit_url, create=False) as store:
            result = store.verify(key.public_key())
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
        if not requested - terminal or time.monotonic() > deadline:
            break
        time.sleep(1)
    if not result.ok:
        figures.violations["audit chain"] = [str(result)]
    figures.violations["launch without a terminal record"] = sorted(requested - terminal)
    figures.lost = len(figures.accepted_ids - recorded)


def run_all(stack: ChaosStack, sizes: Sizes, seed: int = 12) -> dict[str, Figures]:
    """Every loop with its own broker and task namespace; figures per loop."""
    root = hvac.Client(url=stack.vault.url, token=stack.vault.root_token)
    results: dict[str, Figures] = {}
    loops = {
        "SIGKILL the broker across launches": sigkill_loop,
        "freeze Vault, API server, audit database": freeze_loop,
        "two replicas, one killed": replicas_loop,
    }
    for title, loop in loops.items():
        figures = Figures()
        started = time.monotonic()
        broker = loop(stack, figures, sizes, seed=seed)
        figures.loop_seconds = time.monotonic() - started
        try:
            check(broker, figures, root)
            print(f"   [{title}: {time.monotonic() - started:.1f}s with its check]")
        finally:
            broker.stop()
        figures.print(title)
        results[title] = figures
    total = sum(sum(f.tries.values()) for f in results.values())
    sent = sum(f.attempted for f in results.values())
    print(f"== chaos: {total} task tries with secrets, {sent} launch requests in all")
    return results


def _lease_alive(root: hvac.Client, lease_id: str) -> bool:
    try:
        root.sys.read_lease(lease_id)
    except hvac.exceptions.InvalidRequest:
        return False
    return True


def _token_alive(root: hvac.Client, accessor: str) -> bool:
    try:
        root.auth.token.lookup_accessor(accessor)
    except hvac.exceptions.InvalidRequest:
        return False
    return True


def _child_tokens_outside(root: hvac.Client, launch_ids: set[str | None]) -> list[str]:
    """Accessors of the chaos DAG's child tokens whose launch is not in ``launch_ids``."""
    tokens = []
    for accessor in (root.list("auth/token/accessors") or {}).get("data", {}).get("keys", []):
        try:
            meta = root.auth.token.lookup_accessor(accessor)["data"].get("meta") or {}
        except hvac.exceptions.VaultError:
            continue  # gone meanwhile
        ours = meta.get("dag_id") == CHAOS_DAG
        if ours and meta.get("launch_id") not in launch_ids:
            tokens.append(accessor)
    return tokens
