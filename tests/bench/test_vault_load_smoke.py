"""The Vault-load benchmark on the real stack (two launches per kind): exact counts of
Vault requests and storage writes per launch, from OpenBao's audit log and metrics.
Counts only, never times."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from podbroker_devstack.broker_env import BrokerHandle
from podbroker_devstack.kube import ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree
from tests.bench.vault_load import (
    KINDS,
    format_report,
    run_vault_load,
    start_bench_broker,
    start_metered_openbao,
)

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def metered(
    tmp_path_factory: pytest.TempPathFactory,
    kube: ControlPlane,
    postgres: Postgres,
    sources: SourceTree,
) -> Iterator[tuple[OpenBao, BrokerHandle]]:
    folder = tmp_path_factory.mktemp("vault-load")
    vault = start_metered_openbao(folder / "openbao")
    try:
        broker = start_bench_broker(folder / "broker", kube, vault, postgres, sources)
        try:
            yield vault, broker
        finally:
            broker.stop()
    finally:
        vault.stop()


def test_vault_requests_and_storage_writes_per_launch_meet_the_goal(
    metered: tuple[OpenBao, BrokerHandle],
) -> None:
    vault, broker = metered
    report = run_vault_load(broker, vault, launches=2, idle_seconds=1.0)
    text = format_report(report)
    print(text)
    rows = {k.key: k for k in report.kinds}
    assert list(rows) == [k.key for k in KINDS]
    assert rows["none"].launch.total == rows["none"].end.total == 0
    for n in (1, 3, 10):
        kv = rows[f"kv{n}"]
        # One batch child token minted, one read per secret; nothing to revoke at the end.
        assert kv.launch.requests == {"token_create": 2, "kv_read": 2 * n}, text
        assert kv.end.total == 0, text
        assert kv.launch.writes == kv.end.writes == 0, text
    dynamic = rows["dynamic"]
    assert dynamic.launch.requests == {"token_create": 2, "token_renew": 2, "creds_read": 2}, text
    assert dynamic.end.requests == {"lease_revoke": 2, "token_revoke": 2}, text
    assert dynamic.launch.writes > 0, text  # a service token is stored (revocation exact)
    # The broker counts what OpenBao logged.
    for kind in report.kinds:
        assert kind.launch.broker_counted == kind.launch.requests, text
        assert kind.end.broker_counted == kind.end.requests, text
    assert all(k.met for k in report.kinds), text
    assert "Goal: 5/5 kinds met" in text
