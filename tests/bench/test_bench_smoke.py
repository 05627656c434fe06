"""The launch benchmark runs end to end on the real stack (two rounds). Checks only that
every row was measured and reported: timings are printed by `make bench`, never asserted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from podbroker_devstack.airflow_api import AirflowApi
from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree
from tests.bench.launch_latency import BENCH_LABEL, SCENARIOS, format_report, run_bench

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def warn_broker(
    stack_folder: Path,
    kube: ControlPlane,
    vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
    airflow_api: AirflowApi,
) -> Iterator[BrokerHandle]:
    """A broker that checks every launch with Airflow and only logs failures (warn)."""
    handle = start_broker(
        stack_folder / "bench-warn-broker",
        kube,
        vault,
        postgres,
        sources,
        task_namespace="bench-verified",
        extra_settings={"airflow": {**airflow_api.settings("warn"), "cache_seconds": 0}},
    )
    yield handle
    handle.stop()


def test_benchmark_reports_every_row(
    broker: BrokerHandle, warn_broker: BrokerHandle, kube_api: client.ApiClient
) -> None:
    report = run_bench(broker, kube_api, iterations=2, warmup=0, gap=0.0, verified=warn_broker)

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
    for heading in ("Client side", "Server side", "breakdown", "audit append", "added p50"):
        assert heading in text
    # Each round cleaned up after itself.
    core = client.CoreV1Api(kube_api)
    for namespace in (broker.namespace, warn_broker.namespace):
        leftovers = core.list_namespaced_pod(namespace, label_selector=BENCH_LABEL).items
        assert leftovers == []
    # The verified row really asked Airflow each time.
    assert all(s.parts["airflow"] > 0 for s in report.samples["kv_declared_verified"])
