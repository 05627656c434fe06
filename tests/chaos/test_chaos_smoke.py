"""The smallest chaos loops (issue 12) on the session's stack: every invariant holds."""

from __future__ import annotations

from pathlib import Path

import pytest

from podbroker_devstack.kube import ControlPlane
from podbroker_devstack.openbao import OpenBao, start_openbao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree
from tests.chaos.suite import SMOKE, ChaosStack, run_all

pytestmark = pytest.mark.stack


def test_smallest_chaos_loops_keep_every_invariant(
    tmp_path: Path,
    kube: ControlPlane,
    postgres: Postgres,
    sources: SourceTree,
) -> None:
    # An OpenBao of its own: the loop freezes it.
    vault: OpenBao = start_openbao(tmp_path / "openbao")
    try:
        results = run_all(ChaosStack(tmp_path, kube, vault, postgres, sources), SMOKE)
    finally:
        vault.stop()
    for title, figures in results.items():
        assert figures.accepted > 0, title
        assert figures.attempted >= sum(figures.tries.values()), title
        assert figures.lost == 0, title
        assert not any(figures.orphans.values()), (title, figures.orphans)
        assert not any(figures.violations.values()), (title, figures.violations)
        assert figures.failed_otherwise == 0, title
        assert not any(figures.known.values()), (title, figures.known)
