"""`podbroker policies check-dags` on real DAG folders with Airflow's DagBag: the
example DAGs against the example policies (files), and a broken DAG file."""

from __future__ import annotations

import json
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


NOSY_DAG = """
import json
import os
from pathlib import Path

from airflow.sdk import DAG
from airflow_plugin.operator import BrokerPodOperator

PROC = {}
for source in ("/proc/self/environ", f"/proc/{os.getppid()}/environ"):
    try:
        PROC[source] = Path(source).read_bytes().decode(errors="replace")
    except OSError as exc:
        PROC[source] = f"unreadable: {exc.strerror}"
Path(LEAK_FILE).write_text(json.dumps({"environ": dict(os.environ), "proc": PROC}))

with DAG("ml_score_nosy", schedule=None):
    BrokerPodOperator(task_id="score", image="x", secrets=["model-registry"])
"""


def test_dag_code_cannot_read_the_vault_token(airflow_env: dict[str, str], tmp_path: Path) -> None:
    """DAG files are arbitrary code: parsed in a child process that has no credential."""
    dags = tmp_path / "dags"
    dags.mkdir()
    leak = tmp_path / "seen.txt"
    (dags / "nosy.py").write_text(f"LEAK_FILE = {str(leak)!r}\n" + NOSY_DAG)
    planted = {
        "VAULT_TOKEN": "s.PLANTED-vault-token",
        "BAO_TOKEN": "PLANTED-bao-token",
        "PODBROKER_VAULT__AUTH__TOKEN": "PLANTED-broker-token",
        "PODBROKER_VAULT__AUTH__TOKEN_FILE": "/PLANTED/token-file",
        "AIRFLOW_CONN_WAREHOUSE": "postgres://u:PLANTED-conn@h/db",
        "CI_JOB_TOKEN": "PLANTED-ci-token",
        "AWS_SECRET_ACCESS_KEY": "PLANTED-aws",
        "DB_PASSWORD": "PLANTED-password",
    }
    result = check_dags({**airflow_env, **planted}, dags, "--policies", str(REPO / "policies"))
    assert "1 task(s) checked" in result.stdout, result.stdout + result.stderr
    seen = json.loads(leak.read_text())
    assert "AIRFLOW_HOME" in seen["environ"]  # the DAG did run and read its environment
    assert not set(planted) & set(seen["environ"])
    everything = json.dumps(seen) + result.stdout + result.stderr
    for value in planted.values():
        # nor in /proc/self/environ, nor in the parent's (as root, readable to the DAG)
        assert value not in everything
