"""Binaries the stack runs that do not come with Python packages: the control plane
(etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok) and helm.
deploy/devstack/build-binaries.sh builds them once from pinned Go modules into a cache
(or names $KUBEBUILDER_ASSETS); here it is only asked where they are."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from podbroker_devstack.procs import StackError

REQUIRED_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
)


def _run_build_script(build_script: Path, *args: str) -> Path:
    """The folder the script prints on its last line (building first if needed)."""
    result = subprocess.run(
        ["bash", str(build_script), *args],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        command = " ".join([str(build_script), *args])
        raise StackError(
            f"building binaries failed (exit {result.returncode}); run {command} to see why"
        )
    return Path(result.stdout.strip().splitlines()[-1])


def control_plane_binaries(build_script: Path) -> Path:
    """The folder holding every binary in REQUIRED_BINARIES, building them if needed."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        missing = [b for b in REQUIRED_BINARIES if not os.access(Path(assets) / b, os.X_OK)]
        if missing:
            raise StackError(f"KUBEBUILDER_ASSETS={assets} lacks: {', '.join(missing)}")
        return Path(assets)
    return _run_build_script(build_script)


def helm_binary(build_script: Path) -> Path:
    """The helm executable (built once from helm.sh/helm/v3, or $KUBEBUILDER_ASSETS/helm)."""
    return _run_build_script(build_script, "helm") / "helm"


def upstream_crds(build_script: Path) -> list[Path]:
    """The upstream CRD manifests of the chart's optional kinds (ServiceMonitor,
    PrometheusRule, Certificate), taken from their pinned Go modules."""
    return sorted(_run_build_script(build_script, "crds").glob("*.yaml"))
