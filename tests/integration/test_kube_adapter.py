"""The Kubernetes adapter reads broker Secrets as metadata only: values never travel."""

from __future__ import annotations

import pytest
from kubernetes import client

from broker.kube.cluster import KubeCluster

pytestmark = pytest.mark.stack


def test_secret_reads_and_lists_carry_no_data(
    kube_api: client.ApiClient,
    namespace: str,
) -> None:
    assert KubeCluster(kube_api).list_managed_secrets(namespace) == []  # API sends items: null
    client.CoreV1Api(kube_api).create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(
                name="podbroker-meta", labels={"podbroker.dev/managed-by": "podbroker"}
            ),
            string_data={"password": "PLANTED-adapter"},
        ),
    )
    cluster = KubeCluster(kube_api)
    meta = cluster.read_secret_metadata(namespace, "podbroker-meta")
    assert meta is not None
    assert meta.name == "podbroker-meta" and meta.namespace == namespace
    assert meta.labels == {"podbroker.dev/managed-by": "podbroker"}
    assert meta.created_at is not None
    listed = cluster.list_managed_secrets(namespace)
    assert [item.name for item in listed] == ["podbroker-meta"]
    assert cluster.secret_exists(namespace, "podbroker-meta")
    assert not cluster.secret_exists(namespace, "podbroker-missing")
    assert cluster.read_secret_metadata(namespace, "podbroker-missing") is None
    # What the API server sent: partial metadata, no data field at all.
    raw = cluster.core.read_namespaced_secret(
        "podbroker-meta",
        namespace,
        _preload_content=False,
        _headers={"Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"},
    )
    assert b'"kind":"PartialObjectMetadata"' in raw.data
    assert b'"data"' not in raw.data
