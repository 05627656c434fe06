"""The chart's RBAC applied to the real API server, checked as an access matrix with
SubjectAccessReview: the broker may handle Secrets and pods only in its task namespaces
and create TokenReviews cluster-wide, nothing else; an Airflow worker reads no Secret."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.deploy.conftest import REPO_ROOT, Helm, Release

pytestmark = pytest.mark.stack

WORKER_RBAC = REPO_ROOT / "deploy" / "manifests" / "airflow-worker-rbac.yaml"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def _groups(user: str) -> list[str]:
    namespace = user.split(":")[2]
    return ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]


def allowed(
    api: client.ApiClient,
    user: str,
    verb: str,
    resource: str,
    namespace: str = "",
    group: str = "",
) -> bool:
    """POST subjectaccessreviews: may ``user`` do ``verb`` on ``resource`` (``pods/log``
    style names carry the subresource) in ``namespace`` ("" = cluster-wide / all)?"""
    name, _, sub = resource.partition("/")
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(
            user=user,
            groups=_groups(user),
            resource_attributes=client.V1ResourceAttributes(
                verb=verb,
                resource=name,
                subresource=sub or None,
                namespace=namespace or None,
                group=group,
            ),
        )
    )
    status = client.AuthorizationV1Api(api).create_subject_access_review(review).status
    return bool(status.allowed)


@pytest.fixture
def installed(helm: Helm, release: Release, tmp_path: Path) -> Release:
    """The chart's ServiceAccount and RBAC objects plus the worker identities, applied."""
    docs = helm.render("pb", release.namespace, release.values(), tmp_path)
    release.apply([d for d in docs if d["kind"] in RBAC_KINDS])
    worker_docs = [d for d in yaml.safe_load_all(WORKER_RBAC.read_text()) if d]
    for doc in worker_docs:
        doc["metadata"]["namespace"] = release.airflow
        for subject in doc.get("subjects", []):
            subject["namespace"] = release.airflow
    release.apply(worker_docs)
    return release


def test_broker_handles_secrets_only_in_task_namespaces(
    installed: Release, kube_api: client.ApiClient
) -> None:
    broker = installed.broker_user
    for namespace in installed.tasks:
        for verb in ("create", "get", "list", "delete"):
            assert allowed(kube_api, broker, verb, "secrets", namespace), (verb, namespace)
        # Broker Secrets are immutable: no update/patch, not even in task namespaces; the
        # broker never watches them either.
        for verb in ("update", "patch", "deletecollection", "watch"):
            assert not allowed(kube_api, broker, verb, "secrets", namespace), (verb, namespace)
    elsewhere = [installed.namespace, installed.airflow, installed.other, "default", "kube-system"]
    for namespace in elsewhere:
        for verb in ("create", "get", "list", "watch", "delete"):
            assert not allowed(kube_api, broker, verb, "secrets", namespace), (verb, namespace)
    for verb in ("get", "list", "watch"):
        assert not allowed(kube_api, broker, verb, "secrets"), f"cluster-wide {verb}"


def test_broker_pod_verbs_are_the_launchers_and_nothing_more(
    installed: Release, kube_api: client.ApiClient
) -> None:
    broker = installed.broker_user
    task = installed.tasks[0]
    for verb in ("create", "get", "list", "watch", "patch", "delete"):
        assert allowed(kube_api, broker, verb, "pods", task), verb
    assert allowed(kube_api, broker, "get", "pods/log", task)
    for verb in ("list", "watch"):  # pending reasons
        assert allowed(kube_api, broker, verb, "events", task), verb
    assert not allowed(kube_api, broker, "create", "events", task)
    denied_in_task = [
        ("create", "pods/exec"),
        ("create", "pods/attach"),
        ("create", "pods/portforward"),
        ("patch", "pods/ephemeralcontainers"),
        ("create", "serviceaccounts/token"),
        ("create", "configmaps"),
        ("create", "rolebindings"),
    ]
    for verb, resource in denied_in_task:
        group = "rbac.authorization.k8s.io" if resource == "rolebindings" else ""
        assert not allowed(kube_api, broker, verb, resource, task, group), (verb, resource)
    for namespace in (installed.airflow, installed.namespace, installed.other):
        assert not allowed(kube_api, broker, "create", "pods", namespace), namespace


def test_broker_cluster_wide_rights_are_only_tokenreview(
    installed: Release, kube_api: client.ApiClient
) -> None:
    broker = installed.broker_user
    assert allowed(kube_api, broker, "create", "tokenreviews", group="authentication.k8s.io")
    denied = [
        ("create", "subjectaccessreviews", "authorization.k8s.io"),
        ("list", "namespaces", ""),
        ("list", "nodes", ""),
        ("list", "pods", ""),
        ("create", "clusterrolebindings", "rbac.authorization.k8s.io"),
        ("create", "validatingadmissionpolicies", "admissionregistration.k8s.io"),
        ("create", "certificatesigningrequests", "certificates.k8s.io"),
    ]
    for verb, resource, group in denied:
        assert not allowed(kube_api, broker, verb, resource, group=group), (verb, resource)


def test_airflow_worker_reads_no_secret_anywhere(
    installed: Release, kube_api: client.ApiClient, tmp_path: Path
) -> None:
    worker = f"system:serviceaccount:{installed.airflow}:airflow-worker"
    namespaces = [installed.airflow, *installed.tasks, installed.namespace, installed.other, ""]
    for namespace in namespaces:
        for verb in ("get", "list", "watch", "create", "update", "delete"):
            assert not allowed(kube_api, worker, verb, "secrets", namespace), (verb, namespace)
    for task in installed.tasks:  # nor can it launch or enter pods where secrets live
        for verb, resource in (("create", "pods"), ("get", "pods"), ("create", "pods/exec")):
            assert not allowed(kube_api, worker, verb, resource, task), (verb, resource)
    assert not allowed(kube_api, worker, "create", "tokenreviews", group="authentication.k8s.io")
    # The optional pod-launcher role is the only thing it has (and it is in Airflow's namespace).
    assert allowed(kube_api, worker, "create", "pods", installed.airflow)

    # The same with a real token on a real request, not just the authorizer's opinion.
    token = installed.kube.mint_token(installed.airflow, "airflow-worker", audiences=None)
    with installed.client_as(token, tmp_path, "worker") as api:
        for namespace in (installed.airflow, installed.tasks[0]):
            with pytest.raises(ApiException) as denied:
                client.CoreV1Api(api).list_namespaced_secret(namespace)
            assert denied.value.status == 403
