"""`podbroker policies check-dags` on real DAG folders with Airflow's DagBag: the
example DAGs against the example policies (files), a broken DAG file, and DAG code
looking for credentials (policy from files, and from the stack's OpenBao)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import hvac
import pytest

from broker.core.policy import Grant, KvSecret, PolicySet, Team
from podbroker_devstack.openbao import OpenBao
from tests.integration.vault_policy_env import make_env

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


# Reads what DAG code could reach of a credential: its own environment, its parent's
# /proc environ and cmdline, and (readable as root, or to a same-user process without
# Yama) its parent's memory, scanned for strings shaped like the token.
NOSY_DAG = """
import json
import os
import re
from pathlib import Path

from airflow.sdk import DAG
from airflow_plugin.operator import BrokerPodOperator

PARENT = os.getppid()
PROC = {}
for source in ("/proc/self/environ", f"/proc/{PARENT}/environ", f"/proc/{PARENT}/cmdline"):
    try:
        PROC[source] = Path(source).read_bytes().decode(errors="replace")
    except OSError as exc:
        PROC[source] = f"unreadable: {exc.strerror}"

SHAPE = re.compile(re.escape(TOKEN_PREFIX.encode()) + rb"[A-Za-z0-9._-]{%d}" % TOKEN_TAIL)
memory = {"readable": False, "marker_seen": False, "token_shaped": []}
try:
    with open(f"/proc/{PARENT}/maps") as maps, open(f"/proc/{PARENT}/mem", "rb") as mem:
        for line in maps:
            fields = line.split()
            if not fields[1].startswith("rw"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            memory["readable"] = True
            memory["marker_seen"] |= MARKER.encode() in chunk
            found = {m.decode() for m in SHAPE.findall(chunk)}
            memory["token_shaped"] = sorted(set(memory["token_shaped"]) | found)
except OSError as exc:
    memory["error"] = exc.strerror
seen = {"environ": dict(os.environ), "proc": PROC, "memory": memory}
Path(LEAK_FILE).write_text(json.dumps(seen))

with DAG("ml_score_nosy", schedule=None):
    BrokerPodOperator(task_id="score", image="x", secrets=["model-registry"])
"""


def nosy_dags(folder: Path, leak: Path, token: str, marker: str) -> Path:
    dags = folder / "dags"
    dags.mkdir()
    (dags / "nosy.py").write_text(
        f"LEAK_FILE = {str(leak)!r}\nTOKEN_PREFIX = {token[:2]!r}\nTOKEN_TAIL = {len(token) - 2}\n"
        f"MARKER = {marker!r}\n" + NOSY_DAG
    )
    return dags


def test_dag_code_cannot_read_planted_credentials(
    airflow_env: dict[str, str], tmp_path: Path
) -> None:
    """DAG files are arbitrary code: the process that parses them, and its parent, have
    no credential in their environment (policy from files here)."""
    leak = tmp_path / "seen.txt"
    dags = nosy_dags(tmp_path, leak, "s.PLANTED-vault-token", "model-registry")
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


@pytest.mark.stack
def test_dag_code_cannot_read_the_vault_token(
    airflow_env: dict[str, str], vault: OpenBao, tmp_path: Path
) -> None:
    """The policy comes from the stack's OpenBao with a real token given both as
    VAULT_TOKEN and (deprecated) --vault-token; DAG code finds it neither in its own
    environment nor in its parent's environ, cmdline or memory."""
    unique = uuid.uuid4().hex[:8]
    root = hvac.Client(url=vault.url, token=vault.root_token)
    env = make_env(vault, root, unique)
    marker = f"ml/registry-{unique}"  # in the deciding process's memory (its policy)
    env.apply(
        PolicySet(
            catalog={"model-registry": KvSecret(mount=env.kv_mount, path=marker)},
            teams={
                "ml": Team(
                    grants=(Grant(id="score", dags="ml_score_*", secrets=("model-registry",)),)
                )
            },
        )
    )
    # What a CI job's token needs for check-dags: read the policy documents.
    reader = f"check-dags-{unique}"
    root.sys.create_or_update_policy(
        reader,
        f'path "sys/mounts" {{ capabilities = ["read"] }}\n'
        f'path "{env.layout.config_mount}/data/*" {{ capabilities = ["read"] }}\n',
    )
    token = root.auth.token.create(policies=[reader], ttl="10m")["auth"]["client_token"]
    leak = tmp_path / "seen.txt"
    dags = nosy_dags(tmp_path, leak, token, marker)
    layout = [
        "--config-mount",
        env.layout.config_mount,
        "--policy-prefix",
        env.layout.policy_prefix,
    ]
    result = check_dags(
        {**airflow_env, "VAULT_ADDR": vault.url, "VAULT_TOKEN": token},
        dags,
        "--vault-token",
        token,
        *layout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ml_score_nosy  score  model-registry  granted" in result.stdout
    assert "--vault-token is deprecated" in result.stderr
    seen = json.loads(leak.read_text())
    assert "AIRFLOW_HOME" in seen["environ"]  # the DAG ran
    memory = seen["memory"]
    places = {
        **seen["proc"],
        "own environment": json.dumps(seen["environ"]),
        "parent's memory": json.dumps(memory["token_shaped"]),
        "output": result.stdout + result.stderr,
    }
    # Names of the places only: a failure must not print the token.
    assert [place for place, text in places.items() if token in text] == []
    assert not {"VAULT_TOKEN", "VAULT_ADDR"} & set(seen["environ"])
    cmdline = next(v for k, v in seen["proc"].items() if k.endswith("/cmdline"))
    assert "broker.cli.check_dags\x00decide" in cmdline  # the parent's was read
    if os.geteuid() == 0:  # root reads any process's memory
        assert memory["readable"], memory.get("error")
        assert memory["marker_seen"]  # the scan does see what the parent holds

    # Through VAULT_TOKEN only: no deprecation warning, same result.
    leak.unlink()
    result = check_dags(
        {**airflow_env, "VAULT_ADDR": vault.url, "VAULT_TOKEN": token}, dags, *layout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deprecated" not in result.stderr
    assert token not in leak.read_text(), "the token reached the DAG"
