"""The chart's CEL ValidatingAdmissionPolicies applied to the real API server. An "editor"
identity with full RBAC on pods and Secrets in the task namespaces (the worst realistic
mistake) still cannot mount, create, change or delete broker Secrets, nor alter broker
pods; the broker can; the garbage collector still cleans up; other names are untouched."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from broker.core.plan import SECRET_NAME_PREFIX
from broker.core.podmeta import LAUNCH_ID_LABEL, MANAGED_BY_LABEL
from podbroker_devstack.procs import wait_until
from tests.deploy.conftest import Helm, Release

pytestmark = pytest.mark.stack

# The test stack's controller-manager (garbage collector, namespace controller) runs with
# the admin kubeconfig (--use-service-account-credentials=false), so this is its username.
STACK_CONTROLLER_USER = "devstack-admin"


@dataclass
class Guarded:
    release: Release
    task: str
    broker: client.CoreV1Api
    editor: client.CoreV1Api
    admin: client.CoreV1Api
    broker_secret: str
    broker_pod: str


def _pod(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"containers": [{"name": "base", "image": "busybox:1.36"}]},
    }
    body["spec"].update(spec)
    return body


def _secret(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": labels or {}},
        "type": "Opaque",
        "immutable": True,
        "stringData": {"password": "planted-value-not-real"},
    }


def _denied_by_policy(exc: ApiException) -> bool:
    return exc.status in (403, 422) and "ValidatingAdmissionPolicy" in str(exc.body)


def _wait_for_enforcement(admin: client.CoreV1Api, namespace: str, unique: str) -> None:
    """Policies take effect once the API server's informers see them (about a second):
    probe with server-side dry runs until both deny."""
    squat = _secret(f"{SECRET_NAME_PREFIX}probe-{unique}")
    pod = _pod(f"probe-{unique}", {MANAGED_BY_LABEL: "podbroker"})

    def enforced() -> bool:
        for create, body in (
            (admin.create_namespaced_secret, squat),
            (admin.create_namespaced_pod, pod),
        ):
            try:
                create(namespace, body, dry_run="All")
            except ApiException as exc:
                if not _denied_by_policy(exc):
                    raise
            else:
                return False
        return True

    wait_until(enforced, timeout=30, what=f"admission policies enforced in {namespace}")


@pytest.fixture
def guarded(
    helm: Helm, release: Release, kube_api: client.ApiClient, tmp_path: Path, unique: str
) -> Iterator[Guarded]:
    values = release.values(
        admissionPolicy={
            "controllerIdentities": [
                "system:serviceaccount:kube-system:generic-garbage-collector",
                STACK_CONTROLLER_USER,
            ]
        }
    )
    docs = helm.render("pb", release.namespace, values, tmp_path)
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    kinds |= {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    release.apply([d for d in docs if d["kind"] in kinds])
    task = release.tasks[0]
    admin = client.CoreV1Api(kube_api)
    for namespace in release.tasks:
        _wait_for_enforcement(admin, namespace, unique)
    # "editor": someone given full pod and Secret rights in the task namespace.
    release.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": "editor", "namespace": release.other}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "editor", "namespace": task},
             "rules": [{"apiGroups": [""], "verbs": ["*"],
                        "resources": ["pods", "pods/ephemeralcontainers", "secrets"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "editor", "namespace": task},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                         "name": "editor"},
             "subjects": [{"kind": "ServiceAccount", "name": "editor",
                           "namespace": release.other}]},
        ]
    )  # fmt: skip
    broker_api = release.client_as(
        release.kube.mint_token(release.namespace, "podbroker"), tmp_path, "broker"
    )
    editor_api = release.client_as(
        release.kube.mint_token(release.other, "editor"), tmp_path, "editor"
    )
    broker = client.CoreV1Api(broker_api)
    launch = f"l{unique}"
    labels = {MANAGED_BY_LABEL: "podbroker", LAUNCH_ID_LABEL: launch}
    secret_name = f"{SECRET_NAME_PREFIX}{launch}"
    pod = _pod(
        f"task-{launch}",
        labels,
        volumes=[{"name": "podbroker-secrets", "secret": {"secretName": secret_name}}],
    )
    pod["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": secret_name}}]
    created = broker.create_namespaced_pod(task, pod)
    secret = _secret(secret_name, labels)
    secret["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Pod", "name": created.metadata.name,
         "uid": created.metadata.uid}
    ]  # fmt: skip
    broker.create_namespaced_secret(task, secret)
    yield Guarded(
        release, task, broker, client.CoreV1Api(editor_api), client.CoreV1Api(kube_api),
        secret_name, created.metadata.name,
    )  # fmt: skip
    broker_api.close()
    editor_api.close()


def _secret_refs(name: str) -> dict[str, dict[str, Any]]:
    """Every pod field that can carry a Secret reference, each pointing at ``name``."""
    env = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": name, "key": "password"}}}]
    init = [{"name": "init", "image": "busybox:1.36", "env": env}]
    return {
        "secret-volume": _pod("p", volumes=[{"name": "s", "secret": {"secretName": name}}]),
        "projected-volume": _pod("p", volumes=[{"name": "s", "projected": {
            "sources": [{"secret": {"name": name}}]}}]),
        "csi-publish-secret": _pod("p", volumes=[{"name": "s", "csi": {
            "driver": "x.example.com", "nodePublishSecretRef": {"name": name}}}]),
        "env-secretKeyRef": _pod("p", containers=[
            {"name": "base", "image": "busybox:1.36", "env": env}]),
        "envFrom-secretRef": _pod("p", containers=[
            {"name": "base", "image": "busybox:1.36", "envFrom": [{"secretRef": {"name": name}}]}]),
        "init-container-env": _pod("p", initContainers=init),
        "image-pull-secret": _pod("p", imagePullSecrets=[{"name": name}]),
    }  # fmt: skip


@pytest.mark.parametrize("field", sorted(_secret_refs("x")))
def test_other_identity_cannot_run_a_pod_using_a_broker_secret(
    guarded: Guarded, field: str, unique: str
) -> None:
    pod = copy.deepcopy(_secret_refs(guarded.broker_secret)[field])
    pod["metadata"]["name"] = f"steal-{unique}"
    for api in (guarded.editor, guarded.admin):  # even system:masters is not exempt
        with pytest.raises(ApiException) as denied:
            api.create_namespaced_pod(guarded.task, pod)
        assert _denied_by_policy(denied.value), denied.value.body
        assert "only system:serviceaccount:" in str(denied.value.body)
    # The same pod using an ordinary Secret name is none of the policy's business.
    ordinary = copy.deepcopy(_secret_refs("app-settings")[field])
    ordinary["metadata"]["name"] = f"ordinary-{unique}"
    guarded.editor.create_namespaced_pod(guarded.task, ordinary)


def test_broker_pod_with_its_secret_runs(guarded: Guarded) -> None:
    def running() -> bool:
        pod = guarded.broker.read_namespaced_pod(guarded.broker_pod, guarded.task)
        return pod.status.phase in ("Running", "Succeeded")

    # kwok (like a kubelet) only writes pods/status, which the policy leaves alone.
    wait_until(running, timeout=60, what="broker pod running under the admission policy")


def test_other_identity_cannot_pose_as_or_alter_broker_pods(guarded: Guarded, unique: str) -> None:
    fake = _pod(f"fake-{unique}", {MANAGED_BY_LABEL: "podbroker"})
    with pytest.raises(ApiException) as denied:
        guarded.editor.create_namespaced_pod(guarded.task, fake)
    assert _denied_by_policy(denied.value)

    changes = {
        "image swap": {"spec": {"containers": [{"name": "base", "image": "evil:latest"}]}},
        "relabel": {"metadata": {"labels": {MANAGED_BY_LABEL: None, LAUNCH_ID_LABEL: None}}},
    }
    for what, patch in changes.items():
        with pytest.raises(ApiException) as denied:
            guarded.editor.patch_namespaced_pod(guarded.broker_pod, guarded.task, patch)
        assert _denied_by_policy(denied.value), what
    # `kubectl debug`: an ephemeral container could mount the pod's Secret volume.
    debug = {"spec": {"ephemeralContainers": [{
        "name": "debug", "image": "busybox:1.36", "targetContainerName": "base",
        "volumeMounts": [{"name": "podbroker-secrets", "mountPath": "/steal"}]}]}}  # fmt: skip
    with pytest.raises(ApiException) as denied:
        guarded.editor.patch_namespaced_pod_ephemeralcontainers(
            guarded.broker_pod, guarded.task, debug
        )
    assert _denied_by_policy(denied.value)
    # The broker itself may annotate its pod (it records lease ids that way).
    guarded.broker.patch_namespaced_pod(
        guarded.broker_pod, guarded.task, {"metadata": {"annotations": {"podbroker.dev/x": "1"}}}
    )


def test_only_the_broker_creates_or_changes_broker_secrets(guarded: Guarded, unique: str) -> None:
    squat = _secret(f"{SECRET_NAME_PREFIX}squat-{unique}")
    for api in (guarded.editor, guarded.admin):
        with pytest.raises(ApiException) as denied:
            api.create_namespaced_secret(guarded.task, squat)
        assert _denied_by_policy(denied.value)
    labelled = _secret(f"plain-{unique}", {MANAGED_BY_LABEL: "podbroker"})
    with pytest.raises(ApiException) as denied:
        guarded.editor.create_namespaced_secret(guarded.task, labelled)
    assert _denied_by_policy(denied.value)
    # Label theft on an existing broker Secret, and deleting it, are refused too.
    patch = {"metadata": {"labels": {MANAGED_BY_LABEL: None}}}
    with pytest.raises(ApiException) as denied:
        guarded.editor.patch_namespaced_secret(guarded.broker_secret, guarded.task, patch)
    assert _denied_by_policy(denied.value)
    with pytest.raises(ApiException) as denied:
        guarded.editor.delete_namespaced_secret(guarded.broker_secret, guarded.task)
    assert _denied_by_policy(denied.value)
    # Ordinary Secrets stay the editor's business.
    guarded.editor.create_namespaced_secret(guarded.task, _secret(f"plain-{unique}"))
    guarded.editor.delete_namespaced_secret(f"plain-{unique}", guarded.task)


def test_broker_secrets_must_carry_the_prefix(guarded: Guarded, unique: str) -> None:
    """Even the broker cannot label an unprefixed Secret as its own: that keeps
    'broker Secret' and 'Secret named podbroker-*' the same set, which the pod guard needs."""
    unprefixed = _secret(f"launch-{unique}", {MANAGED_BY_LABEL: "podbroker"})
    with pytest.raises(ApiException) as denied:
        guarded.broker.create_namespaced_secret(guarded.task, unprefixed)
    assert _denied_by_policy(denied.value)
    assert "must be named" in str(denied.value.body)


def test_garbage_collector_removes_the_secret_with_its_pod(guarded: Guarded) -> None:
    guarded.broker.delete_namespaced_pod(guarded.broker_pod, guarded.task, grace_period_seconds=0)

    def secret_gone() -> bool:
        try:
            guarded.admin.read_namespaced_secret(guarded.broker_secret, guarded.task)
        except ApiException as exc:
            return bool(exc.status == 404)
        return False

    wait_until(secret_gone, timeout=60, what="garbage collector deleting the broker Secret")


def test_policy_is_bound_to_task_namespaces_only(guarded: Guarded, unique: str) -> None:
    release = guarded.release
    name = f"{SECRET_NAME_PREFIX}elsewhere-{unique}"
    guarded.admin.create_namespaced_secret(release.other, _secret(name))
    guarded.admin.delete_namespaced_secret(name, release.other)
    with pytest.raises(ApiException) as denied:  # the second task namespace is guarded too
        guarded.admin.create_namespaced_secret(release.tasks[1], _secret(name))
    assert _denied_by_policy(denied.value)
