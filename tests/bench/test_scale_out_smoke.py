"""The scale-out run (`make bench-scale`, tests/bench/scale_out.py) at toy size on the
session's stack: three replicas on one PostgreSQL audit store, a few kwok nodes, one
replica SIGKILLed half-way. Its invariants must hold (no launch lost beyond one retry,
no orphan, no duplicate pod or cleanup, the chain verifies); no time is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from podbroker_devstack.kube import ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree
from tests.bench.scale_out import run_scale_out
from tests.chaos.suite import ChaosStack

pytestmark = pytest.mark.stack


def test_scale_out_keeps_every_invariant_with_a_replica_killed(
    tmp_path: Path, kube: ControlPlane, vault: OpenBao, postgres: Postgres, sources: SourceTree
) -> None:
    stack = ChaosStack(tmp_path, kube, vault, postgres, sources)
    with kube.api_client() as api:
        nodes_before = {n.metadata.name for n in client.CoreV1Api(api).list_node().items}
        figures = run_scale_out(stack, replicas=3, nodes=3, pods=24, concurrency=8)
        # The session's control plane keeps only its own nodes (other tests expect them).
        nodes_after = {n.metadata.name for n in client.CoreV1Api(api).list_node().items}
    assert nodes_after == nodes_before
    figures.print()
    assert figures.accepted == 24 and figures.in_flight == 24
    assert figures.failed_beyond_one_retry == 0, figures.samples
    assert not any(figures.invariants.orphans.values()), figures.invariants.orphans
    assert not any(figures.invariants.violations.values()), figures.invariants.violations
    assert figures.duplicate_cleanups == 0
    assert figures.floor_per_second > 0 and figures.per_second > 0
    # Every live replica denied the removed grant (measured, not bounded in time here).
    assert len(figures.policy_change_seconds) == 2
    assert all(s != float("inf") for s in figures.policy_change_seconds)
