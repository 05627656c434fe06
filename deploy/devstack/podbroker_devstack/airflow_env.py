"""An AIRFLOW_HOME on SQLite with the database migrated and examples off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from podbroker_devstack.procs import StackError


def airflow_environment(home: Path, dags_folder: Path) -> dict[str, str]:
    """Environment variables for running `airflow` against ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "NO_PROXY": "*",
        }
    )
    return env


def prepare_airflow_home(home: Path, dags_folder: Path) -> dict[str, str]:
    """Create ``home`` and run `airflow db migrate` there; return the environment."""
    home.mkdir(parents=True, exist_ok=True)
    env = airflow_environment(home, dags_folder)
    airflow = Path(sys.executable).parent / "airflow"
    result = subprocess.run(
        [str(airflow), "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"airflow db migrate failed:\n{result.stderr[-3000:]}")
    return env
