"""OpenBao's Kubernetes auth method against this kube-apiserver: the bound ServiceAccount
logs in, another ServiceAccount's token is refused."""

from __future__ import annotations

import hvac
import pytest
from hvac.exceptions import Forbidden, InvalidRequest
from kubernetes import client

from podbroker_devstack.kube import ControlPlane
from podbroker_devstack.openbao import OpenBao


def test_kubernetes_auth_accepts_bound_service_account_only(
    vault: OpenBao,
    vault_root: hvac.Client,
    kube: ControlPlane,
    kube_api: client.ApiClient,
    namespace: str,
    unique: str,
) -> None:
    core = client.CoreV1Api(kube_api)
    for name in ("reviewer", "broker", "intruder"):
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
        )
    client.RbacAuthorizationV1Api(kube_api).create_cluster_role_binding(
        client.V1ClusterRoleBinding(
            metadata=client.V1ObjectMeta(name=f"reviewer-{unique}"),
            role_ref=client.V1RoleRef(
                api_group="rbac.authorization.k8s.io",
                kind="ClusterRole",
                name="system:auth-delegator",
            ),
            subjects=[
                client.RbacV1Subject(kind="ServiceAccount", name="reviewer", namespace=namespace)
            ],
        )
    )
    mount = f"k8s-{unique}"
    vault_root.sys.enable_auth_method("kubernetes", path=mount)
    vault_root.auth.kubernetes.configure(
        kubernetes_host=kube.server,
        kubernetes_ca_cert=kube.ca_cert.read_text(),
        token_reviewer_jwt=kube.mint_token(namespace, "reviewer"),
        mount_point=mount,
    )
    vault_root.auth.kubernetes.create_role(
        name="broker",
        bound_service_account_names=["broker"],
        bound_service_account_namespaces=[namespace],
        policies=["default"],
        ttl="5m",
        mount_point=mount,
    )

    login = hvac.Client(url=vault.url).auth.kubernetes.login(
        role="broker", jwt=kube.mint_token(namespace, "broker"), mount_point=mount
    )
    assert login["auth"]["metadata"]["service_account_name"] == "broker"
    assert login["auth"]["client_token"]

    with pytest.raises((Forbidden, InvalidRequest)):
        hvac.Client(url=vault.url).auth.kubernetes.login(
            role="broker", jwt=kube.mint_token(namespace, "intruder"), mount_point=mount
        )
