"""Airflow 3 is real: a tiny DAG from tests/dags passes `airflow dags test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.airflow


def test_tiny_dag_passes_airflow_dags_test(airflow_env: dict[str, str]) -> None:
    airflow = Path(sys.executable).parent / "airflow"
    result = subprocess.run(
        [str(airflow), "dags", "test", "smoke_tiny", "2026-01-01"],
        env=airflow_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "smoke-tiny-ran-42" in output
