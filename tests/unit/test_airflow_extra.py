"""The Airflow side installs and imports without the broker's libraries: the `airflow`
extra resolves without hvac or kubernetes, and every airflow_plugin module imports with
those libraries made unimportable."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).parent / "uv"


def test_airflow_extra_resolves_without_hvac() -> None:
    result = subprocess.run(
        [
            str(UV), "pip", "compile", "pyproject.toml", "--extra", "airflow",
            "-c", "constraints.txt", "--python-version", "3.11", "--no-header", "-q",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    packages = {
        m.group(1).lower()
        for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", result.stdout, flags=re.MULTILINE)
    }
    assert "apache-airflow" in packages
    assert "httpx" in packages
    assert "hvac" not in packages
    assert "kubernetes" not in packages


BLOCK_AND_IMPORT = """
import sys
for name in ("hvac", "kubernetes"):
    sys.modules[name] = None  # any import of them now raises ImportError
import airflow_plugin.hook, airflow_plugin.operator, airflow_plugin.trigger
import airflow_plugin.plugin, airflow_plugin.provider, airflow_plugin.secrets
loaded = sorted(m for m in sys.modules if m.startswith("broker."))
print(",".join(loaded))
"""


def test_airflow_plugin_imports_without_broker_libraries(tmp_path: Path) -> None:
    env = {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_AND_IMPORT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = result.stdout.strip().splitlines()[-1].split(",")
    # Only the shared pure modules: no adapter, service or API module was pulled in.
    assert set(loaded) <= {
        "broker.core",
        "broker.core.models",
        "broker.core.api_models",
        "broker.core.timeline",  # the task-try view's response model
        "broker.core.audit_events",
        "broker.core.secret_value",
        "broker.errors",
    }
