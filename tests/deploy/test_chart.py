"""The Helm chart: lint, values schema, cross-field checks, the config it renders loads in
the broker's own settings, and the API server accepts every object (server-side dry run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.core.plan import SECRET_NAME_PREFIX
from broker.core.podmeta import MANAGED_BY_LABEL
from broker.settings import load_settings
from tests.deploy.conftest import CHART, REPO_ROOT, Helm, Release, find

# Value sets a user would really install with (beyond the defaults).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "sqlite-single": {"replicaCount": 1, "audit": {"store": "sqlite"}},
    "approle-plain-http": {
        "tls": {"enabled": False},
        "vault": {
            "address": "https://vault.example:8200",
            "caSecret": "vault-ca",
            "auth": {
                "method": "approle",
                "approle": {"roleId": "r-123", "secretIdSecret": {"name": "pb-approle"}},
            },
        },
    },
    "vault-audience-hard-anti-affinity": {
        "antiAffinity": "hard",
        "vault": {"auth": {"kubernetes": {"audience": "vault"}}},
        "metrics": {"scrapeNamespaceSelector": {"matchLabels": {"team": "monitoring"}}},
    },
}


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _values(variant: str) -> dict[str, Any]:
    base: dict[str, Any] = {"taskNamespaces": ["tasks-a", "tasks-b"]}
    return _deep_merge(base, VARIANTS[variant])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint_passes(helm: Helm, variant: str, tmp_path: Path) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(_values(variant)))
    result = helm.run("lint", "--strict", str(CHART), "--values", str(values_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCount": 0}, "/replicaCount"),
        ({"audit": {"store": "mysql"}}, "/audit/store"),
        ({"vault": {"auth": {"method": "userpass"}}}, "/vault/auth/method"),
        ({"vault": {"address": "vault:8200"}}, "/vault/address"),
        ({"taskNamespaces": []}, "/taskNamespaces"),
        ({"taskNamespaces": ["Not_A_Namespace"]}, "/taskNamespaces/0"),
        ({"callers": [{"identity": "system:serviceaccount:airflow:w"}]}, "/callers/0"),
        ({"staticTokens": [{"name": "dev", "sha256": "plaintext", "dagIds": ["*"]}]}, "sha256"),
        ({"tokenAudience": ""}, "/tokenAudience"),
        ({"admissionPolicy": {"validationActions": ["Allow"]}}, "/admissionPolicy"),
        ({"replicas": 3}, "replicas"),  # a typo of replicaCount is an error, not ignored
    ],
)
def test_schema_rejects_bad_values(
    helm: Helm, values: dict[str, Any], complaint: str, tmp_path: Path
) -> None:
    result = helm.template("pb", "podbroker", values, tmp_path)
    assert result.returncode != 0
    assert "don't meet the specifications of the schema" in result.stderr
    assert complaint in result.stderr


@pytest.mark.parametrize(
    ("values", "namespace", "complaint"),
    [
        ({"audit": {"store": "sqlite"}}, "podbroker", "set replicaCount=1"),
        ({"taskNamespaces": ["podbroker"]}, "podbroker", "release namespace"),
        ({"taskNamespaces": ["airflow"]}, "podbroker", "Airflow namespace"),
        ({"vault": {"auth": {"method": "approle"}}}, "podbroker", "approle needs"),
        ({"tls": {"enabled": True, "secretName": ""}}, "podbroker", "schema"),
    ],
)
def test_inconsistent_values_fail_with_a_reason(
    helm: Helm, values: dict[str, Any], namespace: str, complaint: str, tmp_path: Path
) -> None:
    result = helm.template("pb", namespace, values, tmp_path)
    assert result.returncode != 0
    assert complaint in result.stderr


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_config_loads_in_broker_settings(
    helm: Helm, variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = helm.render("pb", "podbroker", _values(variant), tmp_path)
    (configmap,) = find(docs, "ConfigMap", "pb-podbroker-config")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(configmap["data"]["config.yaml"])
    (deployment,) = find(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env_names = {e["name"] for e in container.get("env", [])}
    postgres_url = "postgresql+psycopg://podbroker@db.example:5432/podbroker"
    if "PODBROKER_AUDIT__URL" in env_names:
        monkeypatch.setenv("PODBROKER_AUDIT__URL", postgres_url)

    settings = load_settings(config_file)

    assert settings.kubernetes.task_namespaces == ["tasks-a", "tasks-b"]
    assert settings.kubernetes.kubeconfig is None  # in-cluster credentials
    assert settings.auth.token_audience == "podbroker"
    assert [c.identity for c in settings.auth.callers] == [
        "system:serviceaccount:airflow:airflow-worker",
        "system:serviceaccount:airflow:airflow-triggerer",
    ]
    assert settings.audit.signing_key_file == Path("/etc/podbroker/audit-key/signing.key")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/etc/podbroker/audit-key" in mounts
    port = container["ports"][0]["containerPort"]
    assert settings.server.port == port
    if variant == "approle-plain-http":
        assert port == 8080 and settings.server.tls_cert_file is None
        assert settings.vault.auth.method == "approle"
        assert settings.vault.auth.secret_id_file == Path("/etc/podbroker/vault-auth/secret-id")
        assert settings.vault.ca_file == Path("/etc/podbroker/vault-ca/ca.crt")
        assert {"/etc/podbroker/vault-auth", "/etc/podbroker/vault-ca"} <= mounts
    else:
        assert port == 8443
        assert settings.server.tls_cert_file == Path("/etc/podbroker/tls/tls.crt")
        assert "/etc/podbroker/tls" in mounts
        assert settings.vault.auth.method == "kubernetes"
        assert settings.vault.auth.role == "podbroker-broker"
    if variant == "vault-audience-hard-anti-affinity":
        assert settings.vault.auth.jwt_file == Path("/var/run/secrets/podbroker/vault/token")
        assert "/var/run/secrets/podbroker/vault" in mounts
    if variant == "sqlite-single":
        assert settings.audit.url == "sqlite:////var/lib/podbroker/audit.db"
        assert "/var/lib/podbroker" in mounts
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        assert find(docs, "PersistentVolumeClaim")
    else:
        assert settings.audit.url == postgres_url


def test_deployment_is_hardened_and_highly_available(helm: Helm, tmp_path: Path) -> None:
    docs = helm.render("pb", "podbroker", _values("default"), tmp_path)
    (deployment,) = find(docs, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 2
    assert container["args"] == ["serve", "--config", "/etc/podbroker/config.yaml"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert container["resources"]["requests"].keys() == {"cpu", "memory"}
    assert pod["serviceAccountName"] == "podbroker"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    }
    anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    (pdb,) = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    (service,) = find(docs, "Service")
    assert service["spec"]["ports"][0]["port"] == 443
    assert service["spec"]["ports"][0]["targetPort"] == "api"
    # No secret value is ever rendered: the chart only names existing Secrets.
    assert not find(docs, "Secret")


def test_network_policy_admits_only_airflow_pods_not_broker_pods(
    helm: Helm, tmp_path: Path
) -> None:
    docs = helm.render("pb", "podbroker", _values("default"), tmp_path)
    (policy,) = find(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]  # nothing else, no metrics scrapers unless configured
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "airflow"}}
    assert peer["podSelector"]["matchExpressions"] == [
        {"key": MANAGED_BY_LABEL, "operator": "DoesNotExist"}
    ]
    assert rule["ports"] == [{"port": "api", "protocol": "TCP"}]


def test_admission_policy_uses_the_broker_secret_prefix(helm: Helm, tmp_path: Path) -> None:
    """The pod guard recognises broker Secrets by name; the name must be the broker's."""
    docs = helm.render("pb", "podbroker", _values("default"), tmp_path)
    policies = find(docs, "ValidatingAdmissionPolicy")
    assert len(policies) == 2
    text = yaml.safe_dump_all(policies)
    assert f"startsWith('{SECRET_NAME_PREFIX}')" in text
    assert "system:serviceaccount:podbroker:podbroker" in text
    for binding in find(docs, "ValidatingAdmissionPolicyBinding"):
        (expr,) = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
        assert expr["values"] == ["tasks-a", "tasks-b"]
        assert binding["spec"]["validationActions"] == ["Deny"]


@pytest.mark.stack
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_api_server_accepts_rendered_manifests(
    helm: Helm, release: Release, variant: str, tmp_path: Path
) -> None:
    values = _deep_merge(_values(variant), release.values())
    docs = helm.render("pb", release.namespace, values, tmp_path)
    result = release.kube.kubectl(
        "apply", "--dry-run=server", "-f", "-", input_text=yaml.safe_dump_all(docs)
    )
    assert result.returncode == 0, result.stderr
    for doc in docs:
        assert f"{doc['kind'].lower()}" in result.stdout.lower()
    assert result.stdout.count("(server dry run)") == len(docs)


@pytest.mark.stack
def test_service_monitor_renders_but_needs_the_operator_crd(
    helm: Helm, release: Release, tmp_path: Path
) -> None:
    """ServiceMonitor is off by default: the test API server (like many clusters) has no
    Prometheus Operator CRD, so the server rejects that one object and accepts the rest."""
    values = release.values(metrics={"serviceMonitor": {"enabled": True}})
    docs = helm.render("pb", release.namespace, values, tmp_path)
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    rejected = release.kube.kubectl(
        "apply", "--dry-run=server", "-f", "-", input_text=yaml.safe_dump(monitor)
    )
    assert rejected.returncode != 0
    assert "ServiceMonitor" in rejected.stderr
    rest = [d for d in docs if d["kind"] != "ServiceMonitor"]
    accepted = release.kube.kubectl(
        "apply", "--dry-run=server", "-f", "-", input_text=yaml.safe_dump_all(rest)
    )
    assert accepted.returncode == 0, accepted.stderr


def test_standalone_admission_policy_manifest_matches_the_chart(helm: Helm) -> None:
    """deploy/manifests/admission-policy.yaml is the chart's rendering for default names."""
    standalone = REPO_ROOT / "deploy" / "manifests" / "admission-policy.yaml"
    result = helm.run(
        "template", "podbroker", str(CHART), "--namespace", "podbroker",
        "--show-only", "templates/admission-policy.yaml",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    committed = [d for d in yaml.safe_load_all(standalone.read_text()) if d]
    assert committed == [d for d in yaml.safe_load_all(result.stdout) if d], (
        "re-render deploy/manifests/admission-policy.yaml (command in its header)"
    )
