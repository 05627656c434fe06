"""Fixtures of the fast service tests: the service layer over in-memory fakes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.fakes import Services, make_services


@pytest.fixture
def svc() -> Iterator[Services]:
    services = make_services()
    yield services
    services.close()
