"""A KV v2 mount just enabled refuses requests while it upgrades its storage; bootstrap
waits for it, bounded, and passes every other error on at once (fake hvac client: the
real engine's timing cannot be forced; tests/integration bootstraps the real one)."""

from __future__ import annotations

from typing import Any

import hvac.exceptions
import pytest

from broker.errors import BrokerError
from broker.vault.bootstrap import await_kv_ready

UPGRADING = "Upgrading from non-versioned to versioned data. This backend will be unavailable"


class FakeClient:
    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.reads: list[str] = []

    def read(self, path: str) -> dict[str, Any]:
        self.reads.append(path)
        if self.failures:
            raise self.failures.pop(0)
        return {"data": {"max_versions": 0}}


def test_waits_while_the_mount_upgrades() -> None:
    client = FakeClient(
        hvac.exceptions.InvalidRequest(UPGRADING), hvac.exceptions.InvalidRequest(UPGRADING)
    )
    await_kv_ready(client, "podbroker")  # type: ignore[arg-type]
    assert client.reads == ["podbroker/config"] * 3


def test_other_errors_and_an_endless_upgrade_are_raised() -> None:
    denied = FakeClient(hvac.exceptions.Forbidden("permission denied"))
    with pytest.raises(BrokerError, match="permission denied"):
        await_kv_ready(denied, "podbroker")  # type: ignore[arg-type]
    assert len(denied.reads) == 1
    endless = FakeClient(*[hvac.exceptions.InvalidRequest(UPGRADING)] * 50)
    with pytest.raises(BrokerError):
        await_kv_ready(endless, "podbroker", timeout=0.3)  # type: ignore[arg-type]
