"""The leak guard end to end (issue 14 item 2): `airflow dags test` runs of tasks whose
pods print their password, its base64 and the password split over two writes, against a
broker of their own (own Vault layout and task namespace) on the real OpenBao and control
plane. Nothing of it reaches the Airflow task log or anything Airflow stores; the audit
trail shows ``secret_exposed``. Both ways the operator reads logs: followed while the
pod runs, and read once after the pod ended and its Secret was deleted (deferrable)."""

from __future__ import annotations

import base64
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import pytest
from kubernetes import client

from broker.core.policy import Grant, KvSecret, PolicySet, Team
from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree
from tests.e2e.test_airflow_broker import (
    dags_test,
    everything_airflow_kept,
    latest_ti,
    with_connection,
    xcom_of,
)
from tests.integration.vault_policy_env import make_env

pytestmark = [pytest.mark.stack, pytest.mark.airflow]

PASSWORD = "pw-PLANTED-" + uuid.uuid4().hex
USER = "user-PLANTED-" + uuid.uuid4().hex[:12]
ENCODED = base64.b64encode(PASSWORD.encode()).decode()
LINES = [
    ("F", "task: connecting"),
    ("F", f"debug: user={USER} password={PASSWORD}"),
    ("F", f"debug: basic={ENCODED}"),
    ("P", f"half: {PASSWORD[:12]}"),
    ("F", f"{PASSWORD[12:]} (two writes)"),
    ("F", "task: done"),
]


@pytest.fixture(scope="module")
def leak_broker(
    tmp_path_factory: pytest.TempPathFactory,
    kube: ControlPlane,
    vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
) -> Iterator[BrokerHandle]:
    unique = uuid.uuid4().hex[:8]
    folder = tmp_path_factory.mktemp("leak-guard")
    root = hvac.Client(url=vault.url, token=vault.root_token)
    env = make_env(vault, root, unique)
    root.secrets.kv.v2.create_or_update_secret(
        "team/leaky", {"user": USER, "password": PASSWORD}, mount_point=env.kv_mount
    )
    env.apply(
        PolicySet(
            catalog={
                "leaky-app": KvSecret(
                    mount=env.kv_mount, path="team/leaky", keys=("user", "password")
                )
            },
            teams={
                "data": Team(
                    grants=(Grant(id="leaky", dags="leak_guard_e2e*", secrets=("leaky-app",)),)
                )
            },
        )
    )
    handle = start_broker(
        folder / "broker",
        kube,
        vault,
        postgres,
        sources,
        task_namespace=f"leak-{unique}",
        extra_settings={"vault": env.broker_settings()},
    )
    # Every pod of the namespace prints LINES (CRI format; "P" is a partial line).
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    log_file = folder / "pod.log"
    log_file.write_text(
        "".join(f"{stamp}.{i:09d}Z stdout {tag} {text}\n" for i, (tag, text) in enumerate(LINES))
    )
    with kube.api_client() as api:
        client.CustomObjectsApi(api).patch_cluster_custom_object(
            "kwok.x-k8s.io",
            "v1alpha1",
            "clusterlogs",
            f"logs-{handle.namespace}",
            {"spec": {"logs": [{"logsFile": str(log_file), "follow": False}]}},
        )
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def env(airflow_env: dict[str, str], leak_broker: BrokerHandle) -> dict[str, str]:
    return with_connection(airflow_env, leak_broker)


def audit_of(broker: BrokerHandle, launch_id: str) -> list[tuple[str, dict[str, Any]]]:
    with sqlite3.connect(broker.audit_url.removeprefix("sqlite:///")) as db:
        rows = db.execute(
            "SELECT kind, event_json FROM audit_records WHERE launch_id = ? ORDER BY position",
            (launch_id,),
        ).fetchall()
    return [(kind, json.loads(event)) for kind, event in rows]


def leaked(*texts: str) -> list[str]:
    """Which planted forms show up (names, never the values: a failure prints this)."""
    forms = {
        "password": PASSWORD,
        "user": USER,
        "base64": ENCODED,
        "second half": PASSWORD[12:],
    }
    return sorted({name for name, value in forms.items() for text in texts if value in text})


@pytest.mark.parametrize("dag_id", ["leak_guard_e2e_follow", "leak_guard_e2e_deferred"])
def test_printed_values_never_reach_the_task_log_and_are_audited(
    env: dict[str, str], leak_broker: BrokerHandle, dag_id: str
) -> None:
    result = dags_test(env, dag_id)
    output = result.stdout + result.stderr
    assert leaked(output) == []
    assert result.returncode == 0, output[-5000:]
    ti = latest_ti(env, dag_id)
    assert ti["state"] == "success", output[-5000:]
    if dag_id.endswith("deferred"):
        assert "running trigger in line" in output  # it really deferred
    # The pod's log reached the task log, masked.
    assert "[pod] task: connecting" in output, output[-5000:]
    assert "[pod] task: done" in output
    assert "[pod] debug: user=*** password=***" in output
    assert "[pod] debug: basic=***" in output
    assert "[pod] half: ***" in output  # the split value is masked as one
    assert leaked(everything_airflow_kept(env)) == []
    # The audit trail names the exposure (the secret, never a value).
    launch_id = xcom_of(env, ti)["launch_id"]
    exposed = [e for kind, e in audit_of(leak_broker, launch_id) if kind == "secret_exposed"]
    assert [e["secret_names"] for e in exposed] == [["leaky-app"]]
    assert leaked(json.dumps(exposed), Path(leak_broker.log_path).read_text()) == []
