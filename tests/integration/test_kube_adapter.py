"""The Kubernetes adapter reads broker Secrets as metadata only: values never travel."""

from __future__ import annotations

from typing import Any

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
    # What the API server sent: partial metadata, no data field at all; also in its
    # answers to the adapter's own create and delete of a Secret (which would echo it).
    answers: list[bytes] = []
    real_open = cluster._open

    def spying(*args: Any, **kwargs: Any) -> Any:
        response = real_open(*args, **kwargs)
        answers.append(response.data)  # read once; urllib3 keeps it for the caller
        return response

    cluster._open = spying  # type: ignore[method-assign]
    cluster.read_secret_metadata(namespace, "podbroker-meta")
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "podbroker-made", "namespace": namespace},
        "stringData": {"password": "PLANTED-adapter"},
    }
    cluster.create_secret(manifest)
    assert cluster.delete_secret(namespace, "podbroker-made")
    assert not cluster.delete_secret(namespace, "podbroker-made")
    assert len(answers) == 3  # the second delete is a 404: raised, not answered
    read, created, deleted = answers
    assert (
        b'"kind":"PartialObjectMetadata"' in read and b'"kind":"PartialObjectMetadata"' in created
    )
    assert b'"kind":"Status"' in deleted  # a Secret's delete answers with a Status
    # Counted, not compared: a failing comparison would print the answer, value included.
    carrying = sum(b'"data"' in answer or b"PLANTED" in answer for answer in answers)
    assert carrying == 0, f"{carrying} answer(s) carried Secret data"
