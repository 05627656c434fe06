"""Everything around a real broker in the local stack: its least-privilege Kubernetes
identity, Vault bootstrap with Kubernetes-auth login, example secrets (including a
dynamic PostgreSQL role), the example policies applied, and `podbroker serve` running
as a separate process. Used by the pytest `broker` fixture and by `make demo`."""

from __future__ import annotations

import hashlib
import os
import secrets
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import hvac
import psycopg
import yaml
from kubernetes import client

from broker.cli.policy_folder import load_policy_dir
from broker.vault.bootstrap import BootstrapOptions, KubernetesAuthOptions, bootstrap
from broker.vault.layout import VaultLayout
from broker.vault.policy_store import apply_plan, plan
from podbroker_devstack.binaries import helm_binary
from podbroker_devstack.chart import RBAC_KINDS, render_chart
from podbroker_devstack.kube import ControlPlane
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.procs import ManagedProcess, StackError, free_port, wait_until
from podbroker_devstack.sources import SourceTree

SYSTEM_NAMESPACE = "podbroker-system"
TASK_NAMESPACE = "podbroker-tasks"
AIRFLOW_NAMESPACE = "airflow"
BROKER_SERVICE_ACCOUNT = "podbroker"
WORKER_SERVICE_ACCOUNT = "airflow-worker"
TOKEN_AUDIENCE = "podbroker"
CHART_RELEASE = "podbroker"
DEMO_POD_LOG = [
    "podbroker-demo: connecting to the warehouse",
    "podbroker-demo: loaded 1200 rows",
    "podbroker-demo: done",
]


def _planted(label: str) -> str:
    """A recognisable random value: tests scan outputs for the PLANTED- marker."""
    return f"PLANTED-{label}-{secrets.token_hex(8)}"


# One set of planted values per OpenBao: a second broker started on the same server must
# not re-seed it with new values behind the first broker's (and its tests') back.
_PLANTED_BY_VAULT: dict[str, dict[str, dict[str, str]]] = {}


def example_secret_values() -> dict[str, dict[str, str]]:
    """Values for every KV secret of the example catalog (random, marked PLANTED-)."""
    return {
        "analytics/warehouse-readonly": {
            "host": "warehouse.internal",
            "username": "reader",
            "password": _planted("warehouse-ro"),
        },
        "analytics/warehouse-loader": {
            "host": "warehouse.internal",
            "username": "loader",
            "password": _planted("warehouse-loader"),
        },
        "analytics/s3-reports": {
            "access_key_id": "AKIAEXAMPLE",
            "secret_access_key": _planted("s3"),
        },
        "analytics/tableau": {"token": _planted("tableau")},
        "payments/provider-api": {"api_key": _planted("payments-api")},
        "payments/settlement-sftp": {
            "host": "sftp.bank.example",
            "private_key": _planted("sftp-key"),
        },
        "ml/feature-store": {
            "endpoint": "https://features.internal",
            "token": _planted("feature-store"),
        },
        "ml/model-registry": {"url": "https://models.internal", "token": _planted("registry")},
        "shared/slack-webhook": {"url": "https://hooks.example/" + _planted("slack")},
    }


def _apply(api: client.ApiClient, manifests: list[dict[str, Any]]) -> None:
    """Create each object, tolerating ones that exist (a second start in one stack)."""
    from kubernetes import utils
    from kubernetes.utils import FailToCreateError

    for manifest in manifests:
        try:
            utils.create_from_dict(api, manifest)
        except FailToCreateError as exc:
            if not all(getattr(e, "status", None) == 409 for e in exc.api_exceptions):
                raise


def dev_namespaces(task_namespaces: list[str]) -> list[dict[str, Any]]:
    """What a cluster has before the chart is installed: the namespaces, and the Airflow
    worker's ServiceAccount (the Airflow side's, not the chart's)."""
    names = [SYSTEM_NAMESPACE, AIRFLOW_NAMESPACE, *task_namespaces]
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}} for name in names
    ]
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": WORKER_SERVICE_ACCOUNT, "namespace": AIRFLOW_NAMESPACE},
        }
    )
    return objects


def broker_rbac(
    sources: SourceTree, task_namespaces: list[str], folder: Path
) -> list[dict[str, Any]]:
    """The broker's ServiceAccount and the only permissions it has, exactly as the chart
    grants them in a cluster: `helm template` of ``sources.chart`` for the dev namespaces,
    keeping only the identity and RBAC objects."""
    docs = render_chart(
        helm_binary(sources.build_script),
        sources.chart,
        release=CHART_RELEASE,
        namespace=SYSTEM_NAMESPACE,
        values={
            "serviceAccount": {"name": BROKER_SERVICE_ACCOUNT},
            "taskNamespaces": task_namespaces,
            "airflow": {"namespace": AIRFLOW_NAMESPACE},
        },
        values_file=folder / "chart-values.yaml",
    )
    return [doc for doc in docs if doc["kind"] in RBAC_KINDS]


def seed_vault(vault: OpenBao, postgres: Postgres, values: dict[str, dict[str, str]]) -> None:
    """KV values for the example catalog, and the database engine issuing per-launch
    PostgreSQL logins for `orders-db` (role orders-readonly on database `orders`)."""
    root = hvac.Client(url=vault.url, token=vault.root_token)
    for path, data in values.items():
        root.secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point="secret")
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'orders'").fetchone()
        if not exists:
            conn.execute("CREATE DATABASE orders")
    if "database/" not in root.sys.list_mounted_secrets_engines()["data"]:
        root.sys.enable_secrets_engine("database", path="database")
    root.secrets.database.configure(
        name="orders",
        plugin_name="postgresql-database-plugin",
        connection_url=(
            f"postgresql://{{{{username}}}}:{{{{password}}}}@{postgres.host}:"
            f"{postgres.port}/orders?sslmode=disable"
        ),
        username=postgres.superuser,
        password=postgres.password,
        allowed_roles=["orders-readonly"],
        mount_point="database",
    )
    root.secrets.database.create_role(
        name="orders-readonly",
        db_name="orders",
        default_ttl="10m",
        max_ttl="1h",
        creation_statements=[
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
            "VALID UNTIL '{{expiration}}';",
            'GRANT CONNECT ON DATABASE orders TO "{{name}}";',
        ],
        mount_point="database",
    )


def apply_example_policies(vault: OpenBao, folder: Path, *, prune: bool = False) -> None:
    """`podbroker policies apply FOLDER [--prune]`, in process."""
    root = hvac.Client(url=vault.url, token=vault.root_token)
    apply_plan(root, plan(root, VaultLayout(), load_policy_dir(folder), prune=prune))


@dataclass
class BrokerHandle:
    """A running `podbroker serve` process and how to reach it."""

    url: str
    token: str = field(repr=False)
    namespace: str
    config_path: Path
    log_path: Path
    process: ManagedProcess
    kube: ControlPlane
    vault: OpenBao
    planted: dict[str, dict[str, str]] = field(repr=False, default_factory=dict)
    verify: ssl.SSLContext | bool = True
    """TLS trust for an HTTPS broker."""
    audit_url: str = ""
    """Where this broker writes its audit trail."""
    etl_token: str = field(repr=False, default="")
    """A static token allowed for ``analytics_etl_*`` DAGs only."""

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(
            lambda: (
                httpx.get(f"{self.url}/readyz", timeout=2, verify=self.verify).status_code == 200
            ),
            timeout=timeout,
            what="broker /readyz",
            alive=self.process,
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def stop(self) -> None:
        self.process.stop()

    def restart(self) -> None:
        self.process.stop()
        self.process = ManagedProcess(
            self.process.name, self.process.argv, self.log_path, env=self.process.env
        ).start()
        self.wait_ready()

    def planted_values(self) -> list[str]:
        return [v for data in self.planted.values() for v in data.values() if "PLANTED-" in v]


def serve_broker(config_path: Path, log_path: Path) -> ManagedProcess:
    """`podbroker serve --config CONFIG` as its own process, with an environment free of
    PODBROKER_*/VAULT_* variables so the file alone configures it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PODBROKER_", "VAULT_"))}
    argv = [
        sys.executable,
        "-m",
        "broker",
        "serve",
        "--config",
        str(config_path),
        "--dev-generate-key",
    ]
    return ManagedProcess("podbroker", argv, log_path, env=env).start()


def start_broker(
    folder: Path,
    kube: ControlPlane,
    vault: OpenBao,
    postgres: Postgres,
    sources: SourceTree,
    *,
    extra_settings: dict[str, Any] | None = None,
    task_namespace: str = TASK_NAMESPACE,
    tls_ca_file: str | None = None,
) -> BrokerHandle:
    """Provision and start a broker that runs with its own ServiceAccount and the chart's
    RBAC (never the admin kubeconfig), logs in to Vault through the Kubernetes auth method,
    and enforces the policies of ``sources.policies``."""
    folder.mkdir(parents=True, exist_ok=True)
    with kube.api_client() as api:
        _apply(api, dev_namespaces([task_namespace]))
        _apply(api, broker_rbac(sources, [task_namespace], folder))
    kube.simulate_logs(task_namespace, DEMO_POD_LOG)
    planted = _PLANTED_BY_VAULT.setdefault(vault.url, example_secret_values())
    seed_vault(vault, postgres, planted)

    jwt_file = folder / "broker-sa.token"
    jwt_file.write_text(
        kube.mint_token(SYSTEM_NAMESPACE, BROKER_SERVICE_ACCOUNT, expiration_seconds=24 * 3600)
    )
    jwt_file.chmod(0o600)
    root = hvac.Client(url=vault.url, token=vault.root_token)
    bootstrap(
        root,
        BootstrapOptions(
            kubernetes=KubernetesAuthOptions(
                service_account=BROKER_SERVICE_ACCOUNT,
                namespace=SYSTEM_NAMESPACE,
                configure_method=True,
                kubernetes_host=kube.server,
                kubernetes_ca_pem=kube.ca_cert.read_text(),
                token_reviewer_jwt=jwt_file.read_text(),
            )
        ),
    )
    apply_example_policies(vault, sources.policies)

    kubeconfig = kube.user_kubeconfig(jwt_file.read_text(), folder / "broker.kubeconfig")
    static_token = "dev-" + secrets.token_hex(16)
    etl_token = "etl-" + secrets.token_hex(16)  # may launch analytics_etl_* DAGs only
    port = free_port()
    settings: dict[str, Any] = {
        "vault": {
            "address": vault.url,
            "policy_cache_seconds": 2,
            "auth": {"method": "kubernetes", "jwt_file": str(jwt_file)},
        },
        "kubernetes": {
            "kubeconfig": str(kubeconfig),
            "task_namespaces": [task_namespace],
            "orphan_grace_seconds": 5,
            "reconcile_interval_seconds": 5,
            "pod_retention_seconds": 600,
            # What the tests' and example DAGs' requests set (kwok's run duration).
            # bench*: the benchmarks label their pods by round
            "allowed_labels": ["team", "app.kubernetes.io/*", "bench*"],
            "allowed_annotations": ["kwok.podbroker.dev/*"],
        },
        "auth": {
            "token_audience": TOKEN_AUDIENCE,
            "callers": [
                {"identity": f"system:serviceaccount:{AIRFLOW_NAMESPACE}:*", "dag_ids": ["*"]}
            ],
            "static_tokens": [
                {
                    "name": "dev",
                    "sha256": hashlib.sha256(static_token.encode()).hexdigest(),
                    "dag_ids": ["*"],
                },
                {
                    "name": "etl-only",
                    "sha256": hashlib.sha256(etl_token.encode()).hexdigest(),
                    "dag_ids": ["analytics_etl_*"],
                },
            ],
        },
        "audit": {
            "url": f"sqlite:///{folder / 'audit.db'}",
            "signing_key_file": str(folder / "audit-signing.pem"),
        },
        "server": {"host": "127.0.0.1", "port": port},
        "pod_templates": {
            "small": {
                "resources": {
                    "requests": {"cpu": "100m", "memory": "128Mi"},
                    "limits": {"memory": "256Mi"},
                }
            }
        },
    }
    for section, values in (extra_settings or {}).items():
        settings.setdefault(section, {}).update(values)
    config_path = folder / "broker.yaml"
    config_path.write_text(yaml.safe_dump(settings, sort_keys=False))
    process = serve_broker(config_path, folder / "broker.log")
    tls = settings["server"].get("tls_cert_file")
    handle = BrokerHandle(
        f"{'https' if tls else 'http'}://{'localhost' if tls else '127.0.0.1'}:{port}",
        static_token,
        task_namespace,
        config_path,
        folder / "broker.log",
        process,
        kube,
        vault,
        planted,
        verify=ssl.create_default_context(cafile=tls_ca_file) if tls_ca_file else True,
        etl_token=etl_token,
        audit_url=settings["audit"]["url"],
    )
    try:
        handle.wait_ready()
    except StackError:
        process.stop()
        raise
    return handle
