"""The scale benchmark (tests/bench/scale.py) runs end to end on the real stack at toy
sizes. Checks only that every figure was measured and reported: timings are printed by
`make bench-burst`, never asserted."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client

from podbroker_devstack.broker_env import BrokerHandle
from podbroker_devstack.openbao import OpenBao
from tests.bench.burst import BURST_LABEL
from tests.bench.scale import (
    ScaleReport,
    broker_pid,
    format_report,
    rss_mb,
    run_audit,
    run_bursts,
    run_cleanup,
    run_memory,
    run_policy,
)

pytestmark = pytest.mark.stack


def test_scale_benchmark_measures_every_figure(
    broker: BrokerHandle, kube_api: client.ApiClient, vault: OpenBao, tmp_path: Path
) -> None:
    report = ScaleReport()
    idle = rss_mb(broker_pid(broker))
    launched = run_bursts(report, broker, kube_api, [4], ["no_secrets", "kv"], print)
    launched += run_cleanup(report, broker, kube_api, 3, 4, print)
    run_memory(report, broker, kube_api, idle, launched, 3, print, target=0)
    run_policy(report, tmp_path / "policy", [10, 100], 30, (vault.url, vault.root_token), print)
    run_audit(report, tmp_path / "audit", [400], print)

    names = [(f.section, f.name) for f in report.figures]
    assert names == [
        ("burst", "N=4 floor Pod+Secret"),
        ("burst", "N=4 broker no_secrets"),
        ("burst", "N=4 broker kv"),
        ("cleanup", "3 pods end, quiet"),
        ("cleanup", "3 pods end, burst of 4 launching"),
        ("memory", "broker RSS idle (after start)"),
        ("memory", f"broker RSS after {launched} launches"),
        ("memory", "broker RSS with 3 followed log streams"),
        ("policy", "decide, 10 grants"),
        ("policy", "decide, 100 grants"),
        ("policy", "plan + apply, 30 grants"),
        ("audit", "400 events: generate"),
        *[
            ("audit", f"400 events: {name}")
            for name in (
                "last 7 days, table",
                "last 7 days, JSON",
                "last 7 days, HTML",
                "Airflow page (HTML, 7 days, 20 DAGs)",
                "whole trail, JSON",
                "one task try (GET /v1/audit/launches)",
                "task index build (migration 4, once)",
                "audit verify",
            )
        ],
    ]
    assert all(f.value and "nan" not in f.value for f in report.figures)
    text = format_report(report)
    assert "CPUs" in text and "goal" in text
    # Every burst pod was counted and cleaned up; nothing failed or was duplicated.
    assert all("err 0 dup 0" in f.value for f in report.figures if f.section == "burst")
    leftovers = client.CoreV1Api(kube_api).list_namespaced_pod(
        broker.namespace, label_selector=BURST_LABEL
    )
    assert leftovers.items == []
