"""The broker stays small at rest: it talks to the API server through the kubernetes
client's ApiClient but never loads the generated API classes (``CoreV1Api`` alone was
80 of an idle broker's 180 MB; docs/benchmarks.md). Checked in a fresh interpreter that
builds the Kubernetes adapter as `podbroker serve` does."""

from __future__ import annotations

import subprocess
import sys
import textwrap

HEAVY_MODULES = (
    "kubernetes.client.api.core_v1_api",
    "kubernetes.client.api.authentication_v1_api",
    "kubernetes.client.models.v1_pod",
)


def test_serving_loads_none_of_the_generated_kubernetes_api_classes() -> None:
    script = textwrap.dedent(
        """
        import sys
        import broker.cli.main
        from broker.api.app import create_app
        from broker.service.runtime import build_runtime
        from broker.kube.cluster import KubeCluster
        from kubernetes import client
        KubeCluster(client.ApiClient())
        print(",".join(sorted(m for m in sys.modules if m.startswith("kubernetes.client."))))
        """
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()
    assert "kubernetes.client.api_client" in loaded.split(",")  # the check can see modules
    for module in HEAVY_MODULES:
        assert module not in loaded.split(","), module
