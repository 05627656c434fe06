"""Vault load per launch, counted on the real OpenBao (issue 14 item 3).

    python -m tests.bench.vault_load [-n 20] [--json out.json]

Starts PostgreSQL, the control plane and an OpenBao with telemetry on (its file audit
device logs every request), a real broker (`podbroker serve`, Kubernetes auth, policy
cache longer than the run so decisions come from the cache), and a catalog of ten KV
secrets (keys declared) and the dynamic database secret ``orders-db``. For each kind
(no secrets; KV with n = 1, 3, 10 secrets; dynamic) it makes ``n`` launches one after
another, then kills them (DELETE /v1/launches/{id}: Secret deleted, leases and child
token revoked), and counts over each phase:

* Vault requests: the ``request`` entries of OpenBao's audit log made by any token but
  root (the bench's own scrapes use root), by operation; and, as a cross-check, the
  broker's own count (``podbroker_vault_requests_total`` deltas);
* Vault storage writes: OpenBao's ``vault_barrier_put_count`` and
  ``vault_barrier_delete_count`` deltas (every write to its storage goes through the
  barrier).

Each phase ends once OpenBao's counters and audit log stop moving. Prints the table
and the documented goal with a verdict per kind; times nothing."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hvac
from prometheus_client.parser import text_string_to_metric_families

from broker.core.policy import DatabaseSecret, Grant, KvSecret, PolicySet, Team
from broker.vault.client import vault_operation
from broker.vault.layout import VaultLayout
from broker.vault.policy_store import apply_plan, plan
from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION
from podbroker_devstack.openbao import OpenBao, start_openbao
from podbroker_devstack.sources import SourceTree
from podbroker_devstack.stack import local_stack

KV_SIZES = (1, 3, 10)
DAG_PREFIX = "bench_vault_"
RUN_DURATION = "10m"  # pods end only when the bench kills them


@dataclass(frozen=True)
class Kind:
    key: str
    label: str
    secrets: tuple[str, ...]
    dynamic: bool = False

    def goal(self) -> str:
        if self.dynamic:
            reads = len(self.secrets)
            return (
                f"launch: mint + extend + {reads} read(s) = {2 + reads}; "
                f"end: {reads} lease + 1 token revocation = {reads + 1}"
            )
        if not self.secrets:
            return "0 requests, 0 writes"
        return f"<= n + 1 = {len(self.secrets) + 1} requests, 0 writes"


KINDS: tuple[Kind, ...] = (
    Kind("none", "no secrets", ()),
    *(
        Kind(f"kv{n}", f"KV, {n} secret{'s' if n > 1 else ''}", tuple(f"kv-{i}" for i in range(n)))
        for n in KV_SIZES
    ),
    Kind("dynamic", "dynamic (1 database)", ("orders-db",), dynamic=True),
)


def bench_policy() -> PolicySet:
    """Ten KV secrets with declared keys and the dynamic orders-db, all granted to the
    bench's DAGs (replaces the example policy in the bench's own OpenBao)."""
    catalog: dict[str, KvSecret | DatabaseSecret] = {
        f"kv-{i}": KvSecret(mount="secret", path=f"bench/kv-{i}", keys=("value",))
        for i in range(max(KV_SIZES))
    }
    catalog["orders-db"] = DatabaseSecret(mount="database", role="orders-readonly")
    grant = Grant(id="vault-load", dags=f"{DAG_PREFIX}*", secrets=tuple(catalog))
    return PolicySet(catalog=catalog, teams={"bench": Team(grants=(grant,))})


def prepare_vault(vault: OpenBao) -> None:
    root = hvac.Client(url=vault.url, token=vault.root_token)
    for i in range(max(KV_SIZES)):
        root.secrets.kv.v2.create_or_update_secret(
            path=f"bench/kv-{i}",
            secret={"value": f"bench-{uuid.uuid4().hex}"},
            mount_point="secret",
        )
    apply_plan(root, plan(root, VaultLayout(), bench_policy()))


# -- counting ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    audit_offset: int
    puts: int
    deletes: int
    broker: dict[str, float]


@dataclass
class Phase:
    """What one phase (n launches, or their n ends) cost Vault."""

    requests: dict[str, int] = field(default_factory=dict)
    """Audit-logged requests by operation (every token but root)."""
    broker_counted: dict[str, int] = field(default_factory=dict)
    """podbroker_vault_requests_total deltas by operation."""
    puts: int = 0
    deletes: int = 0

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def writes(self) -> int:
        return self.puts + self.deletes


class VaultMeter:
    """Reads OpenBao's audit log and storage counters, and the broker's Vault counter."""

    def __init__(self, vault: OpenBao, broker: BrokerHandle) -> None:
        self.vault = vault
        self.broker = broker

    def _storage(self) -> tuple[int, int]:
        response = httpx.get(
            f"{self.vault.url}/v1/sys/metrics",
            params={"format": "prometheus"},
            headers={"X-Vault-Token": self.vault.root_token},
            timeout=10,
        )
        response.raise_for_status()
        counts: dict[str, int] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name in ("vault_barrier_put_count", "vault_barrier_delete_count"):
                    counts[sample.name] = int(sample.value)
        return counts.get("vault_barrier_put_count", 0), counts.get("vault_barrier_delete_count", 0)

    def _broker_counts(self) -> dict[str, float]:
        text = httpx.get(f"{self.broker.url}/metrics", timeout=10).text
        return {
            sample.labels["operation"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "podbroker_vault_requests"
            for sample in family.samples
            if sample.name == "podbroker_vault_requests_total"
        }

    def mark(self) -> Mark:
        puts, deletes = self._storage()
        return Mark(self.vault.audit_log.stat().st_size, puts, deletes, self._broker_counts())

    def settle(self, *, quiet: float = 1.5, timeout: float = 60.0) -> Mark:
        """A mark once no request but the bench's own (root) reached OpenBao and its
        storage counters stayed still for ``quiet`` s."""
        deadline = time.monotonic() + timeout
        last = self.mark()
        still_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.mark()
            moved = (now.puts, now.deletes) != (last.puts, last.deletes) or bool(
                self._requests(last.audit_offset, now.audit_offset)
            )
            if moved:
                still_since = time.monotonic()
            elif time.monotonic() - still_since >= quiet:
                return now
            last = now
        return last

    def _requests(self, start: int, end: int) -> Counter[str]:
        """Audit-logged requests between two offsets, by operation, except root's."""
        counts: Counter[str] = Counter()
        with self.vault.audit_log.open("rb") as log:
            log.seek(start)
            data = log.read(max(0, end - start))
        for line in data.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("type") != "request":
                continue
            if "root" in ((entry.get("auth") or {}).get("policies") or []):
                continue
            path = (entry.get("request") or {}).get("path") or ""
            counts[vault_operation(f"/v1/{path}")] += 1
        return counts

    def phase(self, start: Mark, end: Mark) -> Phase:
        requests = self._requests(start.audit_offset, end.audit_offset)
        broker = {
            op: int(end.broker.get(op, 0) - start.broker.get(op, 0))
            for op in set(end.broker) | set(start.broker)
        }
        return Phase(
            requests={k: v for k, v in sorted(requests.items()) if v},
            broker_counted={k: v for k, v in sorted(broker.items()) if v},
            puts=end.puts - start.puts,
            deletes=end.deletes - start.deletes,
        )


# -- the run -------------------------------------------------------------------------------


@dataclass
class KindResult:
    key: str
    label: str
    launches: int
    goal: str
    launch: Phase
    end: Phase
    met: bool = False
    verdict: str = ""


@dataclass
class VaultLoadReport:
    launches_per_kind: int
    kinds: list[KindResult] = field(default_factory=list)
    idle: Phase = field(default_factory=Phase)
    idle_seconds: float = 0.0


def _launch(broker: BrokerHandle, kind: Kind, index: int) -> str:
    response = httpx.post(
        f"{broker.url}/v1/launches",
        json={
            "task": {
                "dag_id": f"{DAG_PREFIX}{kind.key}",
                "task_id": f"t{index}",
                "run_id": f"bench__{uuid.uuid4().hex[:12]}",
                "try_number": 1,
            },
            "container": {"image": "python:3.12-slim"},
            "secrets": list(kind.secrets),
            "namespace": broker.namespace,
            "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: RUN_DURATION}},
        },
        headers=broker.headers(),
        timeout=60,
    )
    if response.status_code != 201:
        raise RuntimeError(f"launch of {kind.key} answered {response.status_code}: {response.text}")
    return str(response.json()["launch_id"])


def _kill(broker: BrokerHandle, launch_id: str) -> None:
    response = httpx.delete(
        f"{broker.url}/v1/launches/{launch_id}",
        params={"reason": "bench"},
        headers=broker.headers(),
        timeout=60,
    )
    if response.status_code != 200:
        raise RuntimeError(f"kill of {launch_id} answered {response.status_code}: {response.text}")


def judge(kind: Kind, result: KindResult) -> None:
    """Check one kind against the documented goal (per launch; exact counts)."""
    n = result.launches
    launch, end = result.launch, result.end
    per = {op: count / n for op, count in launch.requests.items()}
    if not kind.secrets:
        result.met = launch.total == 0 and end.total == 0 and launch.writes + end.writes == 0
    elif not kind.dynamic:
        result.met = (
            launch.total <= (len(kind.secrets) + 1) * n
            and end.total == 0
            and launch.writes + end.writes == 0
        )
    else:
        result.met = (
            per.get("token_create") == 1
            and per.get("token_renew") == 1
            and per.get("creds_read") == len(kind.secrets)
            and launch.total == (2 + len(kind.secrets)) * n
            # Leases first (synchronous: the login is gone when the kill answers), then
            # the token (asynchronous for its leases in Vault, so not relied on alone).
            and end.requests == {"lease_revoke": len(kind.secrets) * n, "token_revoke": n}
        )
    result.verdict = "met" if result.met else "NOT met"


def run_vault_load(
    broker: BrokerHandle,
    vault: OpenBao,
    *,
    launches: int,
    kinds: Sequence[Kind] = KINDS,
    idle_seconds: float = 3.0,
    progress: Callable[[str], None] = lambda _: None,
) -> VaultLoadReport:
    """Measure ``kinds`` on ``broker`` (whose OpenBao ``vault`` has telemetry on and the
    bench policy applied): ``launches`` launches per kind, then their ends."""
    meter = VaultMeter(vault, broker)
    report = VaultLoadReport(launches_per_kind=launches, idle_seconds=idle_seconds)
    # Warm up: the first decision reads the policy into the broker's cache.
    _kill(broker, _launch(broker, Kind("warmup", "warm-up", ()), 0))
    start = meter.settle()
    time.sleep(idle_seconds)
    report.idle = meter.phase(start, meter.mark())
    for kind in kinds:
        progress(f"{kind.label}: {launches} launches ...")
        start = meter.settle()
        ids = [_launch(broker, kind, i) for i in range(launches)]
        launched = meter.settle()
        for launch_id in ids:
            _kill(broker, launch_id)
        ended = meter.settle()
        result = KindResult(
            key=kind.key,
            label=kind.label,
            launches=launches,
            goal=kind.goal(),
            launch=meter.phase(start, launched),
            end=meter.phase(launched, ended),
        )
        judge(kind, result)
        report.kinds.append(result)
    return report


# -- the table -----------------------------------------------------------------------------


def _per(count: int, n: int) -> str:
    value = count / n
    return f"{value:.0f}" if value == int(value) else f"{value:.2f}"


def _ops(counts: dict[str, int], n: int) -> str:
    return ", ".join(f"{op} {_per(c, n)}" for op, c in counts.items()) or "-"


def format_report(report: VaultLoadReport) -> str:
    n = report.launches_per_kind
    header = (
        f"{'kind':<22} {'requests/launch':>15} {'at launch':>9} {'at end':>6} "
        f"{'writes/launch':>13} {'at launch':>9} {'at end':>6}  goal -> verdict"
    )
    lines = [
        f"Vault load per launch ({n} launches per kind; requests from OpenBao's audit log,",
        "storage writes = barrier puts + deletes from its metrics; per launch)",
        "",
        header,
        "-" * len(header),
    ]
    for kind in report.kinds:
        lines.append(
            f"{kind.label:<22} {_per(kind.launch.total + kind.end.total, n):>15} "
            f"{_per(kind.launch.total, n):>9} {_per(kind.end.total, n):>6} "
            f"{_per(kind.launch.writes + kind.end.writes, n):>13} "
            f"{_per(kind.launch.writes, n):>9} {_per(kind.end.writes, n):>6}  "
            f"{kind.goal} -> {kind.verdict}"
        )
    lines += ["", "By operation (per launch; audit log | the broker's own counter):"]
    for kind in report.kinds:
        lines.append(
            f"  {kind.label:<22} launch: {_ops(kind.launch.requests, n)}"
            f" | {_ops(kind.launch.broker_counted, n)}"
        )
        lines.append(
            f"  {'':<22} end:    {_ops(kind.end.requests, n)} | {_ops(kind.end.broker_counted, n)}"
        )
        lines.append(
            f"  {'':<22} storage: {_per(kind.launch.puts, n)} put + "
            f"{_per(kind.launch.deletes, n)} delete at launch, {_per(kind.end.puts, n)} put + "
            f"{_per(kind.end.deletes, n)} delete at end"
        )
    idle = report.idle
    lines += [
        "",
        f"Idle broker for {report.idle_seconds:g} s (background, not in the rows): "
        f"{idle.total} requests, {idle.writes} storage writes",
        f"Goal: {sum(k.met for k in report.kinds)}/{len(report.kinds)} kinds met",
    ]
    return "\n".join(lines)


def start_metered_openbao(folder: Path) -> OpenBao:
    return start_openbao(folder, telemetry=True)


def start_bench_broker(
    folder: Path, stack_kube: Any, vault: OpenBao, postgres: Any, sources: SourceTree
) -> BrokerHandle:
    """A broker on ``vault`` whose policy cache outlives the run (decisions from the
    cache), then the bench policy applied over the example one."""
    handle = start_broker(
        folder,
        stack_kube,
        vault,
        postgres,
        sources,
        task_namespace="bench-vault",
        extra_settings={"vault": {"policy_cache_seconds": 24 * 3600}},
    )
    try:
        prepare_vault(vault)
    except BaseException:
        handle.stop()
        raise
    return handle


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-n", "--launches", type=int, default=20, help="launches per kind")
    parser.add_argument("--json", type=Path, help="also write the counts to this file")
    args = parser.parse_args(argv)

    def progress(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    sources = SourceTree.in_checkout(Path(__file__).resolve().parents[2])
    with local_stack(sources, progress=progress) as stack, contextlib.ExitStack() as running:
        progress("starting an OpenBao with telemetry and a broker on it ...")
        vault = start_metered_openbao(stack.folder / "openbao-metered")
        running.callback(vault.stop)
        handle = start_bench_broker(
            stack.folder / "broker", stack.kube, vault, stack.postgres, sources
        )
        running.callback(handle.stop)
        report = run_vault_load(handle, vault, launches=args.launches, progress=progress)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if all(k.met for k in report.kinds) else 1


if __name__ == "__main__":
    raise SystemExit(main())
