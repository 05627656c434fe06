"""What `pip install .` ships: the podbroker wheel, built from a copy of this checkout,
holds the product only. The development stack (deploy/devstack, `podbroker-dev`) is a
separate distribution, and no shipped module finds files through the repository layout
(`Path(__file__).parents[...]`), which breaks once installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli.main import app
from tests.deploy.conftest import REPO_ROOT

# Reaching from a module's own file up into the tree around it.
FILE_PARENT_LOOKUP = re.compile(r"__file__.*\.parents?\b")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """`uv build --wheel` of a copy of the checkout (setuptools builds in the source tree)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(
        REPO_ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".*_cache", ".demo"
        ),
    )
    uv = Path(sys.executable).parent / "uv"
    result = subprocess.run(
        [str(uv), "build", "--wheel", "--out-dir", str(work / "dist"), str(source)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = (work / "dist").glob("podbroker-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_ships_no_development_stack(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert any(name.startswith("broker/cli/main.py") for name in names)
    assert any(name.startswith("airflow_plugin/") for name in names)
    leaked = [n for n in names if "devstack" in n or n.endswith("cli/dev.py") or "kwok" in n]
    assert leaked == []
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = wheel.read(entry_points).decode().split("[console_scripts]")[1]
    assert "podbroker-dev" not in scripts


def test_no_shipped_module_looks_up_the_repository(wheel: zipfile.ZipFile) -> None:
    lookups = [
        f"{name}: {line.strip()}"
        for name in wheel.namelist()
        if name.endswith(".py")
        for line in wheel.read(name).decode().splitlines()
        if FILE_PARENT_LOOKUP.search(line)
    ]
    assert lookups == [], "package data belongs in importlib.resources; paths are passed in"


def test_the_podbroker_command_has_no_dev_commands() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    commands = re.findall(r"^│ (\S+)\s", result.output, flags=re.MULTILINE)
    assert "audit" in commands
    assert "dev" not in commands
