"""Policy scale: decision time by number of grants (pure ``decide``), and reading,
planning and applying a policy folder of many grants against a real OpenBao.

A synthetic folder: a catalog of 200 KV secrets, 10 teams, ``n`` grants in all, grant i
for DAGs ``dag_i_*`` naming secrets i mod 200 and i+1 mod 200. The decision asked is a
launch of the last grant's DAG requesting its two secrets (allowed)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hvac
import hvac.exceptions
import yaml

from broker.cli.policy_folder import load_policy_dir
from broker.core.models import SecretRequest, TaskIdentity
from broker.core.policy import PolicySet, decide
from broker.errors import BrokerError
from broker.vault.bootstrap import BootstrapOptions, bootstrap
from broker.vault.layout import VaultLayout
from broker.vault.policy_store import apply_plan, parse_stored, plan, read_stored

CATALOG_SIZE = 200
TEAMS = 10
# Its own mount, prefix and role: the synthetic grants never mix with the policies a
# broker on the same OpenBao enforces.
BENCH_LAYOUT = VaultLayout(
    config_mount="bench-config",
    policy_prefix="bench-grant-",
    token_role="bench-launch",
    broker_policy="bench-broker",
)


def write_policy_folder(folder: Path, grants: int, catalog_size: int = CATALOG_SIZE) -> None:
    """The synthetic folder described in the module docstring."""
    (folder / "teams").mkdir(parents=True, exist_ok=True)
    catalog = {
        f"s{i}": {"type": "kv", "mount": "secret", "path": f"bench/s{i}", "keys": ["k"]}
        for i in range(catalog_size)
    }
    (folder / "catalog.yaml").write_text(yaml.safe_dump({"kind": "catalog", "secrets": catalog}))
    per_team: list[list[dict[str, object]]] = [[] for _ in range(TEAMS)]
    for i in range(grants):
        per_team[i % TEAMS].append(
            {
                "id": f"g{i}",
                "dags": f"dag_{i}_*",
                "secrets": [f"s{i % catalog_size}", f"s{(i + 1) % catalog_size}"],
            }
        )
    for t, team_grants in enumerate(per_team):
        if team_grants:
            doc = {"kind": "team", "team": f"team{t}", "grants": team_grants}
            (folder / "teams" / f"team{t}.yaml").write_text(yaml.safe_dump(doc))


def _requests(grants: int) -> tuple[TaskIdentity, list[SecretRequest]]:
    last = grants - 1
    task = TaskIdentity(dag_id=f"dag_{last}_x", task_id="t", run_id="r", try_number=1)
    names = [f"s{last % CATALOG_SIZE}", f"s{(last + 1) % CATALOG_SIZE}"]
    requests = [
        SecretRequest.model_validate({"name": n, "delivery": {"type": "env"}}) for n in names
    ]
    return task, requests


@dataclass
class DecisionTiming:
    grants: int
    load_s: float
    first_us: float  # first decision on a fresh policy set (builds the index)
    median_us: float
    allowed: bool


def time_decisions(folder: Path, grants: int, rounds: int = 2000) -> DecisionTiming:
    write_policy_folder(folder, grants)
    started = time.perf_counter()
    policy = load_policy_dir(folder)
    load_s = time.perf_counter() - started
    task, requests = _requests(grants)
    started = time.perf_counter()
    decision = decide(policy, task, requests, image="python:3.12")
    first = time.perf_counter() - started
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        decide(policy, task, requests, image="python:3.12")
        samples.append(time.perf_counter() - started)
    return DecisionTiming(
        grants, load_s, first * 1e6, statistics.median(samples) * 1e6, decision.allowed
    )


def _wait_for_kv(root: hvac.Client, mount: str, timeout: float = 30.0) -> None:
    """A new KV v2 mount answers 400 while it upgrades itself; wait until it takes a write."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            root.secrets.kv.v2.create_or_update_secret(
                "bench-ready", {"ok": "1"}, mount_point=mount
            )
            return
        except hvac.exceptions.InvalidRequest:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


APPLY_CATALOG_SIZE = 20


@dataclass
class ApplyTiming:
    grants: int
    plan_s: float
    apply_s: float
    replan_s: float
    policies_written: int
    replan_changes: int
    error: str = ""
    parts: int = 0
    """KV parts the policy was stored in (index not counted)."""
    read_s: float = 0.0
    """A broker's first read of the stored policy (index, every part, parse)."""


def time_plan_apply(
    folder: Path, vault_url: str, root_token: str, grants: int, progress: Callable[[str], None]
) -> ApplyTiming:
    """``policies plan`` and ``apply`` (the functions the CLI runs) of ``grants`` grants
    into an OpenBao, a broker's first read of the stored policy, then a second plan
    (nothing to change)."""
    write_policy_folder(folder, grants, APPLY_CATALOG_SIZE)
    files: PolicySet = load_policy_dir(folder)
    root = hvac.Client(url=vault_url, token=root_token)
    layout = BENCH_LAYOUT
    bootstrap(root, BootstrapOptions(layout=layout))
    _wait_for_kv(root, layout.config_mount)
    started = time.perf_counter()
    first = plan(root, layout, files)
    plan_s = time.perf_counter() - started
    progress(f"plan of {grants} grants: {plan_s:.1f}s; applying ...")
    started = time.perf_counter()
    try:
        apply_plan(root, first)
    except BrokerError as exc:
        failed = time.perf_counter() - started
        return ApplyTiming(grants, plan_s, failed, 0.0, len(first.put_policies), -1, exc.reason)
    apply_s = time.perf_counter() - started
    started = time.perf_counter()
    stored, parts = read_stored(root, layout)
    parse_stored(stored, layout)
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    second = plan(root, layout, files)
    replan_s = time.perf_counter() - started
    return ApplyTiming(
        grants,
        plan_s,
        apply_s,
        replan_s,
        len(first.put_policies),
        len(second.put_policies) + len(second.write_parts),
        parts=len(parts),
        read_s=read_s,
    )
