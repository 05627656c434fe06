"""The control plane is real: tokens, RBAC, garbage collection and kwok pods with logs."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from podbroker_devstack.kube import EXIT_CODE_ANNOTATION, RUN_DURATION_ANNOTATION, ControlPlane
from tests.helpers import eventually


def make_service_account(api: client.ApiClient, namespace: str, name: str) -> None:
    client.CoreV1Api(api).create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
    )


def test_token_request_gives_a_token_that_token_review_authenticates(
    kube: ControlPlane,
    kube_api: client.ApiClient,
    namespace: str,
) -> None:
    make_service_account(kube_api, namespace, "worker")
    token = kube.mint_token(namespace, "worker", audiences=["podbroker"])
    review = client.AuthenticationV1Api(kube_api).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=["podbroker"]))
    )
    assert review.status.authenticated is True
    assert review.status.user.username == f"system:serviceaccount:{namespace}:worker"
    wrong_audience = client.AuthenticationV1Api(kube_api).create_token_review(
        client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=["other"]))
    )
    assert not wrong_audience.status.authenticated


def test_rbac_denies_a_service_account_get_secrets(
    kube: ControlPlane,
    kube_api: client.ApiClient,
    namespace: str,
    tmp_path: Path,
) -> None:
    make_service_account(kube_api, namespace, "worker")
    review = client.AuthorizationV1Api(kube_api).create_subject_access_review(
        client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=f"system:serviceaccount:{namespace}:worker",
                resource_attributes=client.V1ResourceAttributes(
                    namespace=namespace, verb="get", resource="secrets"
                ),
            )
        )
    )
    assert review.status.allowed is False

    token = kube.mint_token(namespace, "worker")
    kubeconfig = kube.user_kubeconfig(token, tmp_path / "worker.kubeconfig")
    from kubernetes import config

    with config.new_client_from_config(config_file=str(kubeconfig)) as worker_api:
        with pytest.raises(ApiException) as denied:
            client.CoreV1Api(worker_api).list_namespaced_secret(namespace)
        assert denied.value.status == 403
        # The same identity is authenticated (not anonymous): the denial is RBAC's.
        review = client.AuthenticationV1Api(kube_api).create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        )
        assert review.status.authenticated is True


def _pod(name: str, annotations: dict[str, str] | None = None) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, annotations=annotations or {}),
        spec=client.V1PodSpec(
            containers=[client.V1Container(name="main", image="busybox:1.36")],
            restart_policy="Never",
        ),
    )


def test_secret_owned_by_a_pod_is_garbage_collected_after_the_pod_is_deleted(
    kube_api: client.ApiClient,
    namespace: str,
) -> None:
    core = client.CoreV1Api(kube_api)
    pod = core.create_namespaced_pod(namespace, _pod("owner", {RUN_DURATION_ANNOTATION: "60s"}))
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(
                name="owned",
                owner_references=[
                    client.V1OwnerReference(
                        api_version="v1", kind="Pod", name="owner", uid=pod.metadata.uid
                    )
                ],
            ),
            string_data={"k": "v"},
            immutable=True,
        ),
    )
    assert core.read_namespaced_secret("owned", namespace).metadata.name == "owned"

    core.delete_namespaced_pod("owner", namespace, grace_period_seconds=0)

    def secret_gone() -> bool:
        try:
            core.read_namespaced_secret("owned", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    assert eventually(secret_gone, timeout=60), "garbage collector did not delete the Secret"


def _phase(core: client.CoreV1Api, namespace: str, name: str) -> str:
    return str(core.read_namespaced_pod(name, namespace).status.phase)


def test_pod_is_scheduled_runs_and_succeeds_with_its_logs_readable(
    kube: ControlPlane,
    kube_api: client.ApiClient,
    namespace: str,
) -> None:
    kube.simulate_logs(namespace, ["first line of the task", "second line of the task"])
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(namespace, _pod("ok", {RUN_DURATION_ANNOTATION: "3s"}))

    assert eventually(lambda: _phase(core, namespace, "ok") == "Running")
    pod = core.read_namespaced_pod("ok", namespace)
    assert pod.spec.node_name == "kwok-node-0"
    logs = core.read_namespaced_pod_log("ok", namespace, container="main")
    assert logs.splitlines() == ["first line of the task", "second line of the task"]

    assert eventually(lambda: _phase(core, namespace, "ok") == "Succeeded")
    state = core.read_namespaced_pod("ok", namespace).status.container_statuses[0].state
    assert state.terminated.exit_code == 0


def test_pod_fails_with_the_chosen_exit_code(kube_api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    core.create_namespaced_pod(
        namespace, _pod("bad", {RUN_DURATION_ANNOTATION: "1s", EXIT_CODE_ANNOTATION: "7"})
    )
    assert eventually(lambda: _phase(core, namespace, "bad") == "Failed")
    state = core.read_namespaced_pod("bad", namespace).status.container_statuses[0].state
    assert state.terminated.exit_code == 7
    assert state.terminated.reason == "Error"
