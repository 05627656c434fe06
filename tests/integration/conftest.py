"""Fixtures for integration tests that need parts of their own (not the session's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from podbroker_devstack.openbao import OpenBao, start_openbao


@pytest.fixture
def own_vault(tmp_path: Path) -> Iterator[OpenBao]:
    """A private OpenBao for tests that stop it or bootstrap it their own way."""
    server = start_openbao(tmp_path / "openbao")
    yield server
    server.stop()
