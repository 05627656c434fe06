"""Session-scoped real servers (OpenBao, Kubernetes control plane, PostgreSQL, Airflow
home). Each starts on first use and stops at the end of the session; tests isolate
themselves with unique names (namespaces, mounts, DAG ids), not restarts."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import hvac
import pytest
from kubernetes import client

from podbroker_devstack.airflow_api import AirflowApi, start_airflow_api
from podbroker_devstack.airflow_env import prepare_airflow_home
from podbroker_devstack.binaries import control_plane_binaries
from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.kube import ControlPlane, start_control_plane
from podbroker_devstack.openbao import OpenBao, start_openbao
from podbroker_devstack.postgres import Postgres, start_postgres
from podbroker_devstack.procs import reap_stale_processes
from podbroker_devstack.sources import SourceTree
from podbroker_devstack.stack import make_stack_folder

TESTS_DIR = Path(__file__).resolve().parent
# The checkout under test: where the dev stack takes policies, the chart and binaries from.
SOURCES = SourceTree.in_checkout(TESTS_DIR.parent)


@pytest.fixture(scope="session")
def sources() -> SourceTree:
    return SOURCES


@pytest.fixture(scope="session")
def stack_folder() -> Path:
    for stale in reap_stale_processes():
        print(f"stopped a leftover process from a crashed run: {stale}")
    return make_stack_folder("podbroker-test-")


@pytest.fixture(scope="session")
def vault(stack_folder: Path) -> Iterator[OpenBao]:
    server = start_openbao(stack_folder / "openbao")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kube(stack_folder: Path, sources: SourceTree) -> Iterator[ControlPlane]:
    plane = start_control_plane(stack_folder / "kube", control_plane_binaries(sources.build_script))
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def postgres(stack_folder: Path) -> Iterator[Postgres]:
    server = start_postgres(stack_folder / "postgres")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def airflow_env(stack_folder: Path) -> dict[str, str]:
    """Environment for `airflow` commands: SQLite home migrated, tests/dags as DAG folder."""
    return prepare_airflow_home(stack_folder / "airflow", TESTS_DIR / "dags")


@pytest.fixture
def vault_root(vault: OpenBao) -> hvac.Client:
    return hvac.Client(url=vault.url, token=vault.root_token)


@pytest.fixture
def kube_api(kube: ControlPlane) -> Iterator[client.ApiClient]:
    api = kube.api_client()
    yield api
    api.close()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for names (namespaces, mounts, DAG ids) in one test."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def namespace(kube_api: client.ApiClient, unique: str) -> Iterator[str]:
    """A fresh namespace, deleted after the test."""
    name = f"t-{unique}"
    core = client.CoreV1Api(kube_api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


def pytest_report_header() -> list[str]:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    return [f"control-plane binaries: {assets or 'built from pinned Go modules (cached)'}"]


@pytest.fixture(scope="session")
def broker(
    stack_folder: Path,
    kube: ControlPlane,
    vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
) -> Iterator[BrokerHandle]:
    """The real broker (`podbroker serve` subprocess) under its own ServiceAccount,
    logged in to OpenBao by Kubernetes auth, with the example policies applied and
    example secrets (values marked PLANTED-) in Vault. ``.token`` is a static dev token
    allowed for every DAG; ``.namespace`` is the task namespace."""
    handle = start_broker(stack_folder / "broker", kube, vault, postgres, sources)
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def airflow_api(stack_folder: Path, airflow_env: dict[str, str]) -> Iterator[AirflowApi]:
    """Airflow's own API server over the session's AIRFLOW_HOME (the database the
    `airflow dags test` runs write), with a viewer user for the broker."""
    server = start_airflow_api(stack_folder / "airflow-api", airflow_env)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def verified_broker(
    stack_folder: Path,
    kube: ControlPlane,
    vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
    airflow_api: AirflowApi,
) -> Iterator[BrokerHandle]:
    """A broker that checks every launch with the real Airflow API server
    (``airflow.verification: enforce``), in a task namespace of its own so its
    reconciler judges only launches made through it. It reads Airflow's task-instance
    list 2 per page, so a few task instances already take several pages."""
    handle = start_broker(
        stack_folder / "verified-broker",
        kube,
        vault,
        postgres,
        sources,
        task_namespace="tasks-verified",
        extra_settings={"airflow": {**airflow_api.settings("enforce"), "list_page_size": 2}},
    )
    yield handle
    handle.stop()
