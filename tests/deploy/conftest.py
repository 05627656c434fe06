"""Fixtures for the deployment tests: helm (built from its Go module and cached by
deploy/devstack/build-binaries.sh) and a chart release applied to the real control plane
under unique namespaces."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from podbroker_devstack.binaries import helm_binary
from podbroker_devstack.kube import ControlPlane
from podbroker_devstack.sources import SourceTree

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "deploy" / "helm" / "podbroker"
# Kinds that live outside any namespace: deleted explicitly after a test.
CLUSTER_KINDS = {
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


@dataclass(frozen=True)
class Helm:
    binary: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args], capture_output=True, text=True, check=False
        )

    def template(
        self,
        release: str,
        namespace: str,
        values: dict[str, Any],
        tmp: Path,
        *,
        api_versions: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        """`helm template` with ``values`` written to a file (so lists and dicts stay typed);
        ``api_versions`` are what the chart's `.Capabilities.APIVersions` should report."""
        values_file = tmp / f"values-{release}-{len(list(tmp.iterdir()))}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        extra = [arg for version in api_versions for arg in ("--api-versions", version)]
        return self.run(
            "template", release, str(CHART), "--namespace", namespace,
            "--values", str(values_file), *extra,
        )  # fmt: skip

    def render(
        self,
        release: str,
        namespace: str,
        values: dict[str, Any],
        tmp: Path,
        *,
        api_versions: tuple[str, ...] = (),
    ) -> list[dict[str, Any]]:
        result = self.template(release, namespace, values, tmp, api_versions=api_versions)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def helm(sources: SourceTree) -> Helm:
    return Helm(helm_binary(sources.build_script))


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


@dataclass
class Release:
    """Unique namespaces for one chart release on the test control plane."""

    kube: ControlPlane
    unique: str
    namespace: str  # the release (broker) namespace
    airflow: str
    tasks: list[str]
    other: str
    docs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def broker_user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:podbroker"

    def values(self, **extra: Any) -> dict[str, Any]:
        base: dict[str, Any] = {
            "taskNamespaces": self.tasks,
            "airflow": {"namespace": self.airflow},
            "callers": [
                {
                    "identity": f"system:serviceaccount:{self.airflow}:airflow-worker",
                    "dagIds": ["*"],
                }
            ],
        }
        base.update(extra)
        return base

    def apply(self, docs: list[dict[str, Any]]) -> None:
        """`kubectl apply` for real; remembered for cleanup."""
        result = self.kube.kubectl("apply", "-f", "-", input_text=yaml.safe_dump_all(docs))
        assert result.returncode == 0, result.stderr
        self.docs.extend(docs)

    def client_as(self, token: str, tmp: Path, name: str) -> client.ApiClient:
        path = self.kube.user_kubeconfig(token, tmp / f"{name}.kubeconfig")
        return config.new_client_from_config(config_file=str(path))


@pytest.fixture
def release(kube: ControlPlane, kube_api: client.ApiClient, unique: str) -> Iterator[Release]:
    rel = Release(
        kube=kube,
        unique=unique,
        namespace=f"pb-{unique}",
        airflow=f"af-{unique}",
        tasks=[f"tk1-{unique}", f"tk2-{unique}"],
        other=f"ot-{unique}",
    )
    core = client.CoreV1Api(kube_api)
    names = [rel.namespace, rel.airflow, *rel.tasks, rel.other]
    for name in names:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield rel
    # Policies first: they would stop the namespace controller's clean-up otherwise.
    for doc in sorted(
        (d for d in rel.docs if d["kind"] in CLUSTER_KINDS),
        key=lambda d: d["kind"] != "ValidatingAdmissionPolicyBinding",
    ):
        rel.kube.kubectl(
            "delete", doc["kind"].lower(), doc["metadata"]["name"], "--ignore-not-found"
        )
    for name in names:
        try:
            core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
