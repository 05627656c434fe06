"""The Helm chart: lint, values schema, cross-field checks, the config it renders loads in
the broker's own settings, and the API server accepts every object (server-side dry run)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.core.plan import SECRET_NAME_PREFIX
from broker.core.podmeta import MANAGED_BY_LABEL
from broker.settings import load_settings
from podbroker_devstack.binaries import upstream_crds
from podbroker_devstack.sources import SourceTree
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
    # Every optional part on (the CRD-backed kinds are checked apart, against the
    # upstream CRDs installed for that test only).
    "everything-on": {
        "nameOverride": "broker",
        "commonLabels": {"team": "platform"},
        "serviceAccount": {"create": False},
        # OpenShift: null drops the chart's fixed ids so the SCC assigns them.
        "podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None},
        "probes": {"readiness": {"periodSeconds": 7}},
        "terminationGracePeriodSeconds": 45,
        "priorityClassName": "system-cluster-critical",
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
            }
        ],
        "extraVolumes": [{"name": "scratch", "emptyDir": {}}],
        "extraVolumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        "extraContainers": [{"name": "sidecar", "image": "busybox:1.37", "args": ["sleep", "1d"]}],
        "extraObjects": [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "{{ .Release.Name }}-extra"},
                "data": {"release": "{{ .Release.Name }}"},
            }
        ],
        "tls": {"certManager": {"enabled": True, "issuerRef": {"name": "internal-ca"}}},
        "podTemplates": {
            "small": {"resources": {"requests": {"cpu": "100m"}}, "node_selector": {"a": "b"}}
        },
        "config": {"airflow": {"api_url": "http://airflow-api-server.airflow.svc:8080"}},
        "metrics": {
            "authProxy": {"enabled": True},
            "scrapeNamespaceSelector": {"matchLabels": {"team": "monitoring"}},
            "serviceMonitor": {
                "enabled": True,
                "relabelings": [{"action": "labeldrop", "regex": "pod_template_hash"}],
            },
            "prometheusRule": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
        },
        "networkPolicy": {
            "egress": {
                "enabled": True,
                "apiServer": {"cidrs": ["10.0.0.1/32"]},
                "vault": {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "vault"}
                            }
                        }
                    ]
                },
                "auditDatabase": {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}]},
            }
        },
    },
}
# Kinds whose CRDs the test API server does not serve unless a test installs them.
CRD_KINDS = {"Certificate", "ServiceMonitor", "PrometheusRule"}
MONITORING = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule")


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
        # podTemplates and config are typed by the broker's own settings model.
        ({"podTemplates": {"small": {"nodeSelector": {"a": "b"}}}}, "/podTemplates/small"),
        ({"podTemplates": {"small": {"tolerations": "all"}}}, "/podTemplates/small"),
        ({"config": {"server": {"prot": 8080}}}, "/config"),
        ({"config": {"airflow": {"verification": "always"}}}, "/config"),
        ({"metrics": {"serviceMonitor": {"scrapeTimeout": "ten"}}}, "scrapeTimeout"),
    ],
)
def test_schema_rejects_bad_values(
    helm: Helm, values: dict[str, Any], complaint: str, tmp_path: Path
) -> None:
    result = helm.template("pb", "podbroker", values, tmp_path)
    assert result.returncode != 0
    assert "don't meet the specifications of the schema" in result.stderr
    assert complaint in result.stderr


def test_schema_accepts_the_keys_helm_injects_into_a_subchart(helm: Helm, tmp_path: Path) -> None:
    """As a dependency the chart receives `global` and its condition key `enabled`."""
    values = {"global": {"imageRegistry": "mirror.example"}, "enabled": True}
    result = helm.template("pb", "podbroker", _deep_merge(_values("default"), values), tmp_path)
    assert result.returncode == 0, result.stderr


def test_committed_schema_is_generated_from_the_settings_model() -> None:
    from podbroker_devstack.chart_schema import CHART_SCHEMA, generate, render

    committed = CHART_SCHEMA.read_text()
    assert committed == render(generate(json.loads(committed))), (
        "run: python -m podbroker_devstack.chart_schema"
    )


@pytest.mark.parametrize(
    ("values", "namespace", "complaint"),
    [
        ({"audit": {"store": "sqlite"}}, "podbroker", "set replicaCount=1"),
        ({"taskNamespaces": ["podbroker"]}, "podbroker", "release namespace"),
        ({"taskNamespaces": ["airflow"]}, "podbroker", "Airflow namespace"),
        ({"vault": {"auth": {"method": "approle"}}}, "podbroker", "approle needs"),
        ({"tls": {"enabled": True, "secretName": ""}}, "podbroker", "schema"),
        (
            {"tls": {"enabled": False}, "metrics": {"authProxy": {"enabled": True}}},
            "podbroker",
            "needs tls.enabled",
        ),
        ({"tls": {"certManager": {"enabled": True}}}, "podbroker", "issuerRef.name"),
        ({"networkPolicy": {"egress": {"enabled": True}}}, "podbroker", "apiServer.cidrs"),
        ({"metrics": {"port": 8443}}, "podbroker", "metrics.port must differ"),
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
    name = "pb-broker" if variant == "everything-on" else "pb-podbroker"
    (configmap,) = find(docs, "ConfigMap", f"{name}-config")
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
        f"system:serviceaccount:podbroker:{name}-test",  # the helm test pod, one fake DAG
    ]
    assert settings.auth.callers[-1].dag_ids == ["podbroker-helm-test"]
    # Airflow's API server reads the report (Secret usage page) and launches nothing.
    assert settings.auth.report_readers == ["system:serviceaccount:airflow:airflow-api-server"]
    assert settings.server.metrics_port == 9090
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == 9090
    assert settings.audit.signing_key_file == Path("/etc/podbroker/audit-key/signing.key")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/etc/podbroker/audit-key" in mounts
    port = container["ports"][0]["containerPort"]
    if variant == "everything-on":
        assert settings.pod_templates["small"].node_selector == {"a": "b"}
        assert settings.airflow.api_url == "http://airflow-api-server.airflow.svc:8080"
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
    (rule,) = policy["spec"]["ingress"]  # no metrics scrapers unless configured
    airflow, helm_test = rule["from"]  # nothing else
    assert airflow["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "airflow"}
    }
    assert airflow["podSelector"]["matchExpressions"] == [
        {"key": MANAGED_BY_LABEL, "operator": "DoesNotExist"}
    ]
    assert helm_test == {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/instance": "pb",
                "app.kubernetes.io/component": "test",
            }
        }
    }
    assert rule["ports"] == [{"port": "api", "protocol": "TCP"}]
    assert "egress" not in policy["spec"]


def test_scrapers_reach_the_metrics_port_only_and_egress_is_limited(
    helm: Helm, tmp_path: Path
) -> None:
    docs = helm.render("pb", "podbroker", _values("everything-on"), tmp_path)
    (policy,) = find(docs, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    api, scrape = policy["spec"]["ingress"]
    assert api["ports"] == [{"port": "api", "protocol": "TCP"}]
    assert scrape["ports"] == [{"port": "metrics-https", "protocol": "TCP"}]
    assert scrape["from"][0]["namespaceSelector"] == {"matchLabels": {"team": "monitoring"}}
    dns, api_server, vault, database, airflow = policy["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert api_server == {
        "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
        "ports": [{"port": 6443, "protocol": "TCP"}],
    }
    assert vault["ports"] == [{"port": 8200, "protocol": "TCP"}]
    assert database["to"] == [{"ipBlock": {"cidr": "10.1.2.3/32"}}]
    assert airflow["to"][0]["podSelector"] == {"matchLabels": {"component": "api-server"}}
    assert airflow["ports"] == [{"port": 8080, "protocol": "TCP"}]


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
    rendered = helm.render("pb", release.namespace, values, tmp_path, api_versions=MONITORING)
    docs = [d for d in rendered if d["kind"] not in CRD_KINDS]
    # `helm test` creates its ServiceAccount first (hook weight -1); admission wants it.
    hooks = [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    release.apply([d for d in hooks if d["kind"] == "ServiceAccount"])
    result = release.kube.kubectl(
        "apply", "--dry-run=server", "-f", "-", input_text=yaml.safe_dump_all(docs)
    )
    assert result.returncode == 0, result.stderr
    for doc in docs:
        assert f"{doc['kind'].lower()}" in result.stdout.lower()
    assert result.stdout.count("(server dry run)") == len(docs)
    if variant == "everything-on":
        assert {d["kind"] for d in rendered} >= CRD_KINDS


@pytest.mark.stack
def test_api_server_accepts_crd_backed_kinds(
    helm: Helm, release: Release, sources: SourceTree, tmp_path: Path
) -> None:
    """ServiceMonitor, PrometheusRule and Certificate against the upstream CRDs (from
    their pinned Go modules), installed for this test only: a server-side dry run with
    strict field validation accepts what the chart renders and refuses a broken field."""
    crds = upstream_crds(sources.build_script)
    names = [yaml.safe_load(path.read_text())["metadata"]["name"] for path in crds]
    kubectl = release.kube.kubectl
    try:
        for path in crds:  # create, not apply: the last-applied annotation would not fit
            created = kubectl("create", "-f", str(path))
            assert created.returncode == 0, created.stderr
        ready = kubectl(
            "wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in names]
        )
        assert ready.returncode == 0, ready.stderr
        values = _deep_merge(_values("everything-on"), release.values())
        rendered = helm.render("pb", release.namespace, values, tmp_path, api_versions=MONITORING)
        docs = [d for d in rendered if d["kind"] in CRD_KINDS]
        assert {d["kind"] for d in docs} == CRD_KINDS
        strict = ("apply", "--dry-run=server", "--validate=strict", "-f", "-")
        accepted = kubectl(*strict, input_text=yaml.safe_dump_all(docs))
        assert accepted.returncode == 0, accepted.stderr
        assert accepted.stdout.count("(server dry run)") == len(docs)

        # The check can fail: a malformed duration and an unknown field are refused.
        (monitor,) = find(docs, "ServiceMonitor")
        monitor["spec"]["endpoints"][0]["scrapeTimeout"] = "ten seconds"
        refused = kubectl(*strict, input_text=yaml.safe_dump(monitor))
        assert refused.returncode != 0 and "scrapeTimeout" in refused.stderr
        (certificate,) = find(docs, "Certificate")
        certificate["spec"]["dnsNamez"] = ["typo.example"]
        refused = kubectl(*strict, input_text=yaml.safe_dump(certificate))
        assert refused.returncode != 0 and "dnsNamez" in refused.stderr
    finally:
        kubectl("delete", "--ignore-not-found", "--wait=true", *[f"crd/{n}" for n in names])


@pytest.mark.stack
def test_service_monitor_only_where_the_cluster_serves_its_crd(
    helm: Helm, release: Release, tmp_path: Path
) -> None:
    """The test API server (like many clusters) has no Prometheus Operator CRDs: `helm
    install` there skips the ServiceMonitor and PrometheusRule instead of failing."""
    values = release.values(
        metrics={"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
    )
    assert not find(helm.render("pb", release.namespace, values, tmp_path), "ServiceMonitor")
    docs = helm.render("pb", release.namespace, values, tmp_path, api_versions=MONITORING)
    (monitor,) = find(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] == "metrics" and endpoint["scheme"] == "http"
    assert endpoint["scrapeTimeout"] == "10s"
    assert find(docs, "PrometheusRule")
    rejected = release.kube.kubectl(
        "apply", "--dry-run=server", "-f", "-", input_text=yaml.safe_dump(monitor)
    )
    assert rejected.returncode != 0
    # "no matches for kind", or NotFound where kubectl's discovery cache still lists it.
    assert "servicemonitor" in rejected.stderr.lower()


def test_metrics_behind_the_authorizing_proxy(helm: Helm, tmp_path: Path) -> None:
    docs = helm.render(
        "pb", "podbroker", _values("everything-on"), tmp_path, api_versions=MONITORING
    )
    (deployment,) = find(docs, "Deployment")
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    proxy = containers["metrics-proxy"]
    assert "--upstream=http://127.0.0.1:9090/" in proxy["args"]
    assert "--allow-paths=/metrics" in proxy["args"]
    (service,) = find(docs, "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"https", "metrics-https"}  # the plain metrics port is not exposed
    (monitor,) = find(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"]["ca"] == {"secret": {"name": "podbroker-tls", "key": "ca.crt"}}
    assert endpoint["tlsConfig"]["serverName"] == "pb-broker.podbroker.svc"
    assert endpoint["relabelings"] == [{"action": "labeldrop", "regex": "pod_template_hash"}]
    (reader,) = [
        r for r in find(docs, "ClusterRole") if r["metadata"]["name"].endswith("-metrics-reader")
    ]
    assert reader["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]
    (tokenreview,) = [
        r for r in find(docs, "ClusterRole") if r["metadata"]["name"].endswith("-tokenreview")
    ]
    assert {r["resources"][0] for r in tokenreview["rules"]} == {
        "tokenreviews",
        "subjectaccessreviews",
    }


def test_the_values_people_expect(helm: Helm, tmp_path: Path) -> None:
    docs = helm.render("pb", "podbroker", _values("everything-on"), tmp_path)
    assert not find(docs, "ServiceAccount", "podbroker")  # serviceAccount.create=false
    for doc in docs:
        if doc["metadata"]["name"] == "pb-extra":  # extraObjects are passed through
            continue
        assert doc["metadata"]["labels"]["team"] == "platform", doc["kind"]
    (deployment,) = find(docs, "Deployment", "pb-broker")
    assert deployment["spec"]["revisionHistoryLimit"] == 5
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 45
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }  # OpenShift: no fixed UIDs
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/name"] == "broker"
    broker = pod["containers"][0]
    assert broker["readinessProbe"]["periodSeconds"] == 7
    assert broker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "scratch", "mountPath": "/scratch"} in broker["volumeMounts"]
    assert {"broker", "metrics-proxy", "sidecar"} == {c["name"] for c in pod["containers"]}
    assert {"name": "scratch", "emptyDir": {}} in pod["volumes"]
    (extra,) = find(docs, "ConfigMap", "pb-extra")
    assert extra["data"] == {"release": "pb"}
    (certificate,) = find(docs, "Certificate")
    assert certificate["spec"]["secretName"] == "podbroker-tls"
    assert "pb-broker.podbroker.svc" in certificate["spec"]["dnsNames"]
    assert certificate["spec"]["issuerRef"]["name"] == "internal-ca"
    result = helm.template(
        "pb", "podbroker", _deep_merge(_values("default"), {"fullnameOverride": "pb"}), tmp_path
    )
    assert "name: pb-config" in result.stdout


def test_rbac_is_what_the_kubernetes_adapter_calls(helm: Helm, tmp_path: Path) -> None:
    """Every verb is one broker/kube/cluster.py uses (or reading Events for pending
    reasons); rbac.create=false leaves RBAC to the cluster admin."""
    docs = helm.render("pb", "podbroker", _values("default"), tmp_path)
    role = find(docs, "Role")[0]
    rules = {tuple(r["resources"]): r["verbs"] for r in role["rules"]}
    assert rules == {
        ("secrets",): ["create", "get", "list", "delete"],
        ("pods",): ["create", "get", "list", "watch", "patch", "delete"],
        ("pods/log",): ["get"],
        ("events",): ["list", "watch"],
    }
    values = _deep_merge(_values("default"), {"rbac": {"create": False}})
    docs = helm.render("pb", "podbroker", values, tmp_path)
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"} & {
        d["kind"] for d in docs
    }


def test_helm_test_hook_checks_readiness_and_one_authenticated_read(
    helm: Helm, tmp_path: Path
) -> None:
    docs = helm.render("pb", "podbroker", _values("default"), tmp_path)
    (pod,) = find(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["serviceAccountName"] == "pb-podbroker-test"
    script = pod["spec"]["containers"][0]["args"][0]
    assert "https://pb-podbroker.podbroker.svc:443/readyz" in script
    assert "/v1/launches/00000000000000000000" in script
    (projected,) = [v for v in pod["spec"]["volumes"] if "projected" in v]
    token = projected["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "podbroker"
    off = helm.render(
        "pb", "podbroker", _deep_merge(_values("default"), {"tests": {"enabled": False}}), tmp_path
    )
    assert not find(off, "Pod")
    (configmap,) = find(off, "ConfigMap")
    assert "podbroker-helm-test" not in configmap["data"]["config.yaml"]


def test_notes_name_files_that_exist() -> None:
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    mentioned = set(re.findall(r"\b((?:docs|deploy)/[\w./-]+\.(?:md|yaml))", notes))
    assert mentioned
    for path in mentioned:
        assert (REPO_ROOT / path).is_file(), path


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
