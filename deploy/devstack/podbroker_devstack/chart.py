"""The podbroker Helm chart rendered by the real `helm template`, so the dev stack runs
with the objects a cluster install gets instead of a copy that can drift."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from podbroker_devstack.procs import StackError

RBAC_KINDS = frozenset(
    {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
)
"""The broker's identity and permissions: what the dev broker takes from the chart."""


def render_chart(
    helm: Path,
    chart: Path,
    *,
    release: str,
    namespace: str,
    values: dict[str, Any],
    values_file: Path,
) -> list[dict[str, Any]]:
    """`helm template RELEASE CHART --namespace NAMESPACE --values VALUES_FILE` (``values``
    are written to ``values_file`` first, which stays for reference). Offline: no cluster."""
    values_file.write_text(yaml.safe_dump(values, sort_keys=False))
    result = subprocess.run(
        [
            str(helm),
            "template",
            release,
            str(chart),
            "--namespace",
            namespace,
            "--values",
            str(values_file),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"helm template {chart} failed:\n{result.stderr[-3000:]}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
