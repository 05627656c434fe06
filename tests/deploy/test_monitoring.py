"""A real `podbroker serve` as the chart runs it: every metric the chart's alerts and
dashboard use is exported on its own metrics port, that port serves nothing else, and a
rotated TLS certificate is served without a restart."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509

from podbroker_devstack.broker_env import BrokerHandle, serve_broker
from podbroker_devstack.pki import CertPair, LocalCA
from podbroker_devstack.procs import free_port, wait_until
from tests.deploy.conftest import CHART, Helm, find

pytestmark = pytest.mark.stack

MONITORING = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")
_METRIC = re.compile(r"\bpodbroker_[a-z0-9_]+\b")
_SUFFIXES = ("_bucket", "_count", "_sum", "_created")


@dataclass(frozen=True)
class ServedBroker:
    port: int
    metrics_url: str
    ca: LocalCA
    tls: CertPair
    """The files the broker serves (replaced in place to rotate)."""


def _swap_in(source: CertPair, target: CertPair) -> None:
    """Replace both files atomically (new inodes), as a Secret volume update does."""
    for src, dst in ((source.cert, target.cert), (source.key, target.key)):
        shutil.copyfile(src, dst.with_suffix(".new"))
        os.replace(dst.with_suffix(".new"), dst)


@pytest.fixture(scope="module")
def served(
    broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedBroker]:
    """A second `podbroker serve` with the session broker's settings plus its own ports,
    audit store and TLS certificate, and ``server.metrics_port`` set."""
    folder = tmp_path_factory.mktemp("metrics-broker")
    ca = LocalCA(folder / "ca")
    tls = CertPair(cert=folder / "tls.crt", key=folder / "tls.key")
    _swap_in(ca.issue("first", common_name="podbroker", server=True), tls)
    settings: dict[str, Any] = yaml.safe_load(broker.config_path.read_text())
    port, metrics_port = free_port(), free_port()
    settings["server"] = {
        "host": "127.0.0.1",
        "port": port,
        "metrics_port": metrics_port,
        "tls_cert_file": str(tls.cert),
        "tls_key_file": str(tls.key),
    }
    settings["audit"] = {
        "url": f"sqlite:///{folder / 'audit.db'}",
        "signing_key_file": str(folder / "audit-signing.pem"),
    }
    config = folder / "broker.yaml"
    config.write_text(yaml.safe_dump(settings))
    process = serve_broker(config, folder / "broker.log")
    trust = ssl.create_default_context(cafile=str(ca.cert_path))
    try:
        wait_until(
            lambda: (
                httpx.get(f"https://localhost:{port}/readyz", timeout=2, verify=trust).status_code
                == 200
            ),
            timeout=60,
            what="second broker /readyz",
            alive=process,
        )
        yield ServedBroker(port, f"http://127.0.0.1:{metrics_port}", ca, tls)
    finally:
        process.stop()


@pytest.fixture
def metrics_url(served: ServedBroker) -> str:
    return served.metrics_url


def _served_serial(served: ServedBroker) -> int:
    trust = ssl.create_default_context(cafile=str(served.ca.cert_path))
    with (
        socket.create_connection(("127.0.0.1", served.port), timeout=5) as raw,
        trust.wrap_socket(raw, server_hostname="localhost") as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_rotated_certificate_is_served_without_a_restart(served: ServedBroker) -> None:
    first = x509.load_pem_x509_certificate(served.tls.cert.read_bytes()).serial_number
    assert _served_serial(served) == first
    second = served.ca.issue("second", common_name="podbroker", server=True)
    _swap_in(second, served.tls)
    wanted = x509.load_pem_x509_certificate(second.cert.read_bytes()).serial_number
    # Checked at most once a second, on a handshake.
    wait_until(lambda: _served_serial(served) == wanted, timeout=10, what="the new certificate")
    trust = ssl.create_default_context(cafile=str(served.ca.cert_path))
    response = httpx.get(f"https://localhost:{served.port}/readyz", timeout=5, verify=trust)
    assert response.status_code == 200


def _exported(text: str) -> set[str]:
    """Metric names in a Prometheus text exposition, with the sample names of histograms
    and counters (families appear in # TYPE even before their first sample)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "counter":
                names.add(f"{name}_total")
            if kind == "histogram":
                names.update(f"{name}{suffix}" for suffix in _SUFFIXES)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_the_metrics_port_serves_only_metrics(metrics_url: str) -> None:
    response = httpx.get(f"{metrics_url}/metrics", timeout=5)
    assert response.status_code == 200
    assert "podbroker_launches_total" in response.text
    assert 'podbroker_dependency_up{dependency="vault"} 1.0' in response.text
    for path in ("/v1/launches/00000000000000000000", "/readyz", "/openapi.json", "/"):
        assert httpx.get(f"{metrics_url}{path}", timeout=5).status_code == 404, path
    assert httpx.post(f"{metrics_url}/v1/launches", json={}, timeout=5).status_code == 404


def test_alerts_and_dashboard_use_only_exported_metrics(
    helm: Helm, metrics_url: str, tmp_path: Path
) -> None:
    values = {
        "taskNamespaces": ["tasks-a"],
        "metrics": {"prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}},
    }
    docs = helm.render("pb", "podbroker", values, tmp_path, api_versions=MONITORING)
    (rule,) = find(docs, "PrometheusRule")
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "PodbrokerLaunchErrors",
        "PodbrokerDenialsSpike",
        "PodbrokerVaultUnavailable",
        "PodbrokerCleanupBacklog",
        "PodbrokerAuditStoreErrors",
        "PodbrokerOrphansFound",
    }
    (dashboard_map,) = find(docs, "ConfigMap", "pb-podbroker-dashboard")
    dashboard = json.loads(dashboard_map["data"]["podbroker.json"])
    assert dashboard == json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = [a["expr"] for a in alerts] + [
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    ]
    used = {name for expr in exprs for name in _METRIC.findall(expr)}
    exported = _exported(httpx.get(f"{metrics_url}/metrics", timeout=5).text)
    assert used, "no metric found in the rules"
    assert used <= exported, f"not exported by the broker: {sorted(used - exported)}"
