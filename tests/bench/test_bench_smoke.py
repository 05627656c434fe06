"""The launch benchmark runs end to end on the real stack (two rounds). Checks only that
every row was measured and reported: timings are printed by `make bench`, never asserted."""

from __future__ import annotations

import pytest
from kubernetes import client

from podbroker_devstack.broker_env import BrokerHandle
from tests.bench.launch_latency import BENCH_LABEL, SCENARIOS, format_report, run_bench

pytestmark = pytest.mark.stack


def test_benchmark_reports_every_row(broker: BrokerHandle, kube_api: client.ApiClient) -> None:
    report = run_bench(broker, kube_api, iterations=2, warmup=0, gap=0.0)

    assert {key: len(values) for key, values in report.samples.items()} == {
        s.key: 2 for s in SCENARIOS
    }
    broker_rows = [s.key for s in SCENARIOS if s.broker]
    # Every broker launch was matched to exactly one podbroker_launch_seconds observation.
    assert all(
        sample.server_s is not None and sample.parts
        for key in broker_rows
        for sample in report.samples[key]
    )
    text = format_report(report)
    for scenario in SCENARIOS:
        assert scenario.label in text
    for heading in ("Client side", "Server side", "breakdown", "audit append"):
        assert heading in text
    # Each round cleaned up after itself.
    core = client.CoreV1Api(kube_api)
    leftovers = core.list_namespaced_pod(broker.namespace, label_selector=BENCH_LABEL).items
    assert leftovers == []
