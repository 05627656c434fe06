"""`podbroker policies check-dags` on real DAG folders with Airflow's DagBag: the
example DAGs against the example policies (files), and a broken DAG file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.airflow

REPO = Path(__file__).resolve().parents[2]
PODBROKER = Path(sys.executable).parent / "podbroker"


def check_dags(env: dict[str, str], dags: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PODBROKER), "policies", "check-dags", str(dags), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_example_dags_against_example_policies(airflow_env: dict[str, str]) -> None:
    result = check_dags(
        airflow_env, REPO / "airflow_plugin" / "example_dags", "--policies", str(REPO / "policies")
    )
    assert result.returncode == 1, result.stdout + result.stderr
    rows = {
        tuple(line.split()[:2]): line
        for line in result.stdout.splitlines()
        if line.startswith(("analytics_", "ml_"))
    }
    assert rows[("analytics_etl_payments_peek", "peek_payments")].endswith(
        "not granted: payments-api"
    )
    for key in [
        ("analytics_etl_daily", "extract_orders"),
        ("analytics_etl_daily", "load_warehouse"),
        ("analytics_reports_daily", "upload_report"),
        ("ml_score_nightly", "score"),
    ]:
        assert rows[key].endswith("granted") and "not granted" not in rows[key]
    assert "5 task(s) checked, 1 with secrets not granted" in result.stdout


def test_all_granted_folder_passes_and_broken_file_fails(
    airflow_env: dict[str, str], tmp_path: Path
) -> None:
    good = REPO / "airflow_plugin" / "example_dags" / "ml_score_nightly.py"
    (tmp_path / "ml_score_nightly.py").write_text(good.read_text())
    result = check_dags(airflow_env, tmp_path, "--policies", str(REPO / "policies"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 task(s) checked, 0 with secrets not granted" in result.stdout

    (tmp_path / "broken_dag.py").write_text(
        "from airflow.sdk import DAG\n"
        "from airflow_plugin.operator import BrokerPodOperator\n"
        "with DAG('analytics_etl_broken', schedule=None):\n"
        "    BrokerPodOperator(task_id='t', image='x', secrets=['Not A Name'])\n"
    )
    result = check_dags(airflow_env, tmp_path, "--policies", str(REPO / "policies"))
    assert result.returncode == 1
    assert "broken_dag.py: DAG import failed" in result.stderr
    assert "secrets[0] is invalid" in result.stderr


def test_no_policy_source_is_a_usage_error(airflow_env: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in airflow_env.items() if k != "VAULT_ADDR"}
    result = check_dags(env, tmp_path)
    assert result.returncode == 2
    assert "give --policies DIR or --vault-addr" in result.stderr
