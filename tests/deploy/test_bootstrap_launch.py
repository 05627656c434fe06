"""Issue 7, end to end with the chart's own objects: the chart's ServiceAccount, RBAC and
admission policies applied to the real API server; a fresh OpenBao prepared by the real
`podbroker vault bootstrap` CLI (idempotent); then `podbroker serve`, configured from the
chart's rendered config.yaml, logs in to Vault with its ServiceAccount token and launches
a pod with a per-pod Secret in a task namespace as that ServiceAccount, and tears it down."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from broker.core.podmeta import CALLER_ANNOTATION, LAUNCH_ID_LABEL, MANAGED_BY_LABEL
from broker.vault import names
from podbroker_devstack.broker_env import (
    apply_example_policies,
    example_secret_values,
    seed_vault,
    serve_broker,
)
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import OpenBao, start_openbao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.procs import free_port, wait_until
from podbroker_devstack.sources import SourceTree
from tests.deploy.conftest import REPO_ROOT, Helm, Release, find

pytestmark = pytest.mark.stack

CHART_KINDS = {
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}
SERVICE_ACCOUNT = "podbroker"  # the chart's default serviceAccount.name


@pytest.fixture
def fresh_vault(tmp_path: Path) -> Iterator[OpenBao]:
    """An OpenBao of its own, so bootstrap starts from nothing and changes nothing shared."""
    bao = start_openbao(tmp_path / "openbao")
    yield bao
    bao.stop()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PODBROKER_", "VAULT_"))}
    env.update(extra)
    return env


def _bootstrap(
    vault: OpenBao, kube: ControlPlane, release: Release
) -> subprocess.CompletedProcess[str]:
    """The operator's command, exactly as docs/ describe it (no token reviewer JWT: Vault
    reviews each login with the logging-in token, which the chart lets create TokenReviews)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "vault",
            "bootstrap",
            "--kubernetes-host",
            kube.server,
            "--kubernetes-ca-file",
            str(kube.ca_cert),
            "--service-account",
            SERVICE_ACCOUNT,
            "--namespace",
            release.namespace,
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
        env=_clean_env(VAULT_ADDR=vault.url, VAULT_TOKEN=vault.root_token),
        timeout=60,
    )


def _broker_pod_probe(launch_pod: client.V1Pod, api: client.ApiClient) -> dict[str, Any]:
    """The launched pod as a manifest another identity could submit (a fresh name, same
    broker labels and Secret references)."""
    body: dict[str, Any] = api.sanitize_for_serialization(launch_pod)
    probe = copy.deepcopy(body)
    probe["metadata"] = {
        "name": f"copy-{body['metadata']['name']}",
        "labels": body["metadata"]["labels"],
    }
    probe.pop("status", None)
    probe["spec"].pop("nodeName", None)
    return probe


def _denied_by_policy(exc: ApiException) -> bool:
    return exc.status in (403, 422) and "ValidatingAdmissionPolicy" in str(exc.body)


def _admin_denied(admin: client.CoreV1Api, namespace: str, pod: dict[str, Any]) -> bool:
    """Server-side dry run of ``pod`` as the cluster admin: True when an admission policy
    refuses it (only the broker's ServiceAccount may create such a pod)."""
    try:
        admin.create_namespaced_pod(namespace, pod, dry_run="All")
    except ApiException as exc:
        if _denied_by_policy(exc):
            return True
        raise
    return False


def _exists(read: Any, name: str, namespace: str) -> bool:
    try:
        read(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _digests(values: list[str]) -> list[str]:
    return sorted(hashlib.sha256(v.encode()).hexdigest()[:12] for v in values)


def _kubernetes_logins(vault: OpenBao) -> list[dict[str, Any]]:
    """Successful auth/kubernetes/login responses in OpenBao's file audit log (auth
    metadata is not HMAC'd, tokens are)."""
    logins = []
    for line in vault.audit_log.read_text().splitlines():
        entry = json.loads(line)
        request = entry.get("request") or {}
        auth = entry.get("auth") or {}
        if (
            entry.get("type") == "response"
            and request.get("path") == "auth/kubernetes/login"
            and auth.get("metadata")
        ):
            logins.append(auth)
    return logins


def test_bootstrapped_broker_logs_in_as_its_service_account_and_launches(
    helm: Helm,
    release: Release,
    kube: ControlPlane,
    kube_api: client.ApiClient,
    postgres: Postgres,
    fresh_vault: OpenBao,
    sources: SourceTree,
    tmp_path: Path,
) -> None:
    task_ns = release.tasks[0]
    admin = client.CoreV1Api(kube_api)
    dev_token = "dev-" + uuid.uuid4().hex
    values = release.values(
        replicaCount=1,
        tests={"enabled": False},  # only the broker's own ServiceAccount below
        tls={"enabled": False},
        audit={"store": "sqlite"},
        vault={"address": fresh_vault.url},
        allowedAnnotations=["kwok.podbroker.dev/*"],  # the fake nodes' run duration
        staticTokens=[
            {
                "name": "bootstrap-test",
                "sha256": hashlib.sha256(dev_token.encode()).hexdigest(),
                "dagIds": ["analytics_etl_*"],
            }
        ],
    )
    docs = helm.render("pb", release.namespace, values, tmp_path)

    # 1. The chart's identity, RBAC and admission policies, for real.
    release.apply([d for d in docs if d["kind"] in CHART_KINDS])
    (service_account,) = find(docs, "ServiceAccount")
    assert service_account["metadata"]["name"] == SERVICE_ACCOUNT
    wait_until(
        lambda: _exists(admin.read_namespaced_service_account, "default", task_ns),
        timeout=30,
        what=f"default ServiceAccount in {task_ns}",
    )

    # 2. Fresh Vault: example secrets, then the operator's bootstrap, then the policies.
    planted = example_secret_values()
    seed_vault(fresh_vault, postgres, planted)
    first = _bootstrap(fresh_vault, kube, release)
    assert first.returncode == 0, first.stderr
    assert f"wrote kubernetes auth role {names.KUBERNETES_AUTH_ROLE} for " in first.stdout
    assert f"{release.namespace}/{SERVICE_ACCOUNT}" in first.stdout
    assert "enabled kubernetes auth at auth/kubernetes/" in first.stdout
    second = _bootstrap(fresh_vault, kube, release)
    assert second.returncode == 0, second.stderr
    assert "changed:" not in second.stdout, second.stdout
    assert "no changes" in second.stdout
    apply_example_policies(fresh_vault, sources.policies)
    for output in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert fresh_vault.root_token not in output

    # 3. The chart's config.yaml, with only the in-pod file paths and the listener moved
    # to this machine; the Vault address and dev token came in through chart values.
    (configmap,) = find(docs, "ConfigMap")
    settings: dict[str, Any] = yaml.safe_load(configmap["data"]["config.yaml"])
    assert settings["vault"]["auth"]["method"] == "kubernetes"
    assert settings["vault"]["auth"]["role"] == names.KUBERNETES_AUTH_ROLE
    assert settings["vault"]["address"] == fresh_vault.url
    assert settings["kubernetes"]["task_namespaces"] == release.tasks
    sa_token = kube.mint_token(release.namespace, SERVICE_ACCOUNT)
    jwt_file = tmp_path / "serviceaccount-token"
    jwt_file.write_text(sa_token)
    jwt_file.chmod(0o600)
    kubeconfig = kube.user_kubeconfig(sa_token, tmp_path / "broker.kubeconfig")
    port = free_port()
    settings["vault"]["auth"]["jwt_file"] = str(jwt_file)
    settings["kubernetes"]["kubeconfig"] = str(kubeconfig)
    settings["kubernetes"]["task_namespaces"] = [task_ns]
    settings["audit"] = {
        "url": f"sqlite:///{tmp_path / 'audit.db'}",
        "signing_key_file": str(tmp_path / "audit-signing.pem"),
    }
    settings["server"] = {"host": "127.0.0.1", "port": port}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(settings, sort_keys=False))

    log_path = tmp_path / "broker.log"
    broker = serve_broker(config_path, log_path)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {dev_token}"}
    try:
        wait_until(
            lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200,
            timeout=45,
            what="broker /readyz",
            alive=broker,
        )
        # It is in Vault as the chart's ServiceAccount, through the bootstrapped role.
        logins = _kubernetes_logins(fresh_vault)
        assert logins, "no auth/kubernetes/login in OpenBao's audit log"
        for auth in logins:
            assert auth["metadata"]["role"] == names.KUBERNETES_AUTH_ROLE
            assert auth["metadata"]["service_account_name"] == SERVICE_ACCOUNT
            assert auth["metadata"]["service_account_namespace"] == release.namespace
            assert names.BROKER_POLICY in auth["policies"]

        # The policies are enforced before the launch, so the launch proves who created it.
        dag_id = f"analytics_etl_bootstrap_{uuid.uuid4().hex[:6]}"
        squat = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "squat", "labels": {MANAGED_BY_LABEL: "podbroker"}},
            "spec": {"containers": [{"name": "base", "image": "busybox:1.36"}]},
        }
        wait_until(
            lambda: _admin_denied(admin, task_ns, squat),
            timeout=30,
            what=f"admission policies enforced in {task_ns}",
        )

        # 4. A launch, as an Airflow worker would ask for it.
        response = httpx.post(
            f"{url}/v1/launches",
            json={
                "task": {
                    "dag_id": dag_id,
                    "task_id": "load",
                    "run_id": f"manual__{uuid.uuid4().hex}",
                    "try_number": 1,
                },
                "container": {"image": "python:3.12-slim", "command": ["python", "-c", "1"]},
                "secrets": [
                    {"name": "warehouse-readonly", "delivery": {"type": "env", "prefix": "WH_"}}
                ],
                "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "30s"}},
            },
            headers=headers,
            timeout=30,
        )
        assert response.status_code == 201, response.text
        view = response.json()
        launch_id, pod_name = view["launch_id"], view["pod_name"]
        assert view["namespace"] == task_ns
        secret_name = f"podbroker-{launch_id}"

        pod = admin.read_namespaced_pod(pod_name, task_ns)
        assert pod.metadata.labels[LAUNCH_ID_LABEL] == launch_id
        assert pod.metadata.annotations[CALLER_ANNOTATION] == "static:bootstrap-test"
        refs = {
            e.value_from.secret_key_ref.name for e in pod.spec.containers[0].env if e.value_from
        }
        assert refs == {secret_name}
        secret = admin.read_namespaced_secret(secret_name, task_ns)
        assert secret.immutable is True
        assert secret.metadata.owner_references[0].uid == pod.metadata.uid
        decoded = [base64.b64decode(v).decode() for v in secret.data.values()]
        # Read from the fresh OpenBao with a child token; compared by digest, never printed.
        assert _digests(decoded) == _digests(list(planted["analytics/warehouse-readonly"].values()))

        # Who made them: the cluster admin itself may not submit this pod (labelled, using
        # a broker Secret), so only the broker's ServiceAccount can have created the one
        # that exists, and the guard let that one through to run.
        assert _admin_denied(admin, task_ns, _broker_pod_probe(pod, kube_api))
        wait_until(
            lambda: admin.read_namespaced_pod(pod_name, task_ns).status.phase == "Running",
            timeout=30,
            what="the broker's pod running under the chart's admission policies",
        )

        # 5. DELETE: the broker removes the pod and its Secret with its own rights.
        killed = httpx.delete(f"{url}/v1/launches/{launch_id}", headers=headers, timeout=30)
        assert killed.status_code == 200, killed.text
        assert killed.json()["phase"] == "Deleted"
        assert not _exists(admin.read_namespaced_secret, secret_name, task_ns)
        wait_until(
            lambda: not _exists(admin.read_namespaced_pod, pod_name, task_ns),
            timeout=30,
            what="the launched pod deleted",
        )
    finally:
        broker.stop()
    log = log_path.read_text(errors="replace")
    for data in planted.values():
        for value in data.values():
            if "PLANTED-" in value:
                assert value not in log, "a secret value reached the broker log"
