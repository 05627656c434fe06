"""A real Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC on, a
ServiceAccount token issuer), kube-controller-manager (garbage collector, token
controller), kube-scheduler, and kwok for a fake node that runs pods through Stages.

The caller passes the folder of binaries (binaries.control_plane_binaries finds it)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from podbroker_devstack.pki import LocalCA, write_service_account_keys
from podbroker_devstack.procs import ManagedProcess, free_port, wait_until

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
KWOK_NODE_NAME = "kwok-node-0"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
# Annotations the kwok stages read to end a pod (see kwok-stages.yaml).
RUN_DURATION_ANNOTATION = "kwok.podbroker.dev/run-duration"
EXIT_CODE_ANNOTATION = "kwok.podbroker.dev/exit-code"


def _kubeconfig(server: str, ca: Path, cert: Path, key: Path, user: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "devstack",
        "clusters": [
            {"name": "devstack", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [
            {"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}
        ],
        "contexts": [{"name": "devstack", "context": {"cluster": "devstack", "user": user}}],
    }


def _open_crd(plural: str, kind: str, scope: str) -> dict[str, Any]:
    """A schemaless CRD for kwok's log simulation objects (kwok validates them itself)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kwok.x-k8s.io"},
        "spec": {
            "group": "kwok.x-k8s.io",
            "scope": scope,
            "names": {
                "plural": plural,
                "singular": kind.lower(),
                "kind": kind,
                "listKind": f"{kind}List",
            },
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                        }
                    },
                }
            ],
        },
    }


@dataclass
class ControlPlane:
    """A running control plane. ``kubeconfig`` is the admin's (system:masters)."""

    folder: Path
    server: str
    ca_cert: Path
    kubeconfig: Path
    binaries: Path
    processes: list[ManagedProcess] = field(default_factory=list)

    def api_client(self) -> client.ApiClient:
        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def kubectl(
        self, *args: str, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binaries / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input_text,
            capture_output=True,
            text=True,
            check=False,
        )

    def mint_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audiences: list[str] | None = None,
        expiration_seconds: int = 3600,
    ) -> str:
        """A ServiceAccount token from the TokenRequest API (what a projected volume holds)."""
        with self.api_client() as api:
            request = client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(
                    audiences=audiences or [], expiration_seconds=expiration_seconds
                )
            )
            response = client.CoreV1Api(api).create_namespaced_service_account_token(
                service_account, namespace, request
            )
            return str(response.status.token)

    def user_kubeconfig(self, token: str, path: Path) -> Path:
        """A kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's)."""
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "token",
                    "clusters": [
                        {
                            "name": "devstack",
                            "cluster": {
                                "server": self.server,
                                "certificate-authority": str(self.ca_cert),
                            },
                        }
                    ],
                    "users": [{"name": "token", "user": {"token": token}}],
                    "contexts": [
                        {"name": "token", "context": {"cluster": "devstack", "user": "token"}}
                    ],
                }
            )
        )
        path.chmod(0o600)
        return path

    def simulate_logs(self, namespace: str, lines: list[str]) -> Path:
        """Make every pod in ``namespace`` print ``lines`` (kwok ClusterLogs, CRI format)."""
        log_file = self.folder / "pod-logs" / f"{namespace}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        log_file.write_text(
            "".join(f"{stamp}.{i:09d}Z stdout F {line}\n" for i, line in enumerate(lines))
        )
        body = {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "ClusterLogs",
            "metadata": {"name": f"logs-{namespace}"},
            "spec": {
                "selector": {"matchNamespaces": [namespace]},
                "logs": [{"logsFile": str(log_file), "follow": False}],
            },
        }
        with self.api_client() as api:
            objects = client.CustomObjectsApi(api)
            try:
                objects.create_cluster_custom_object(
                    "kwok.x-k8s.io", "v1alpha1", "clusterlogs", body
                )
            except ApiException as exc:
                if exc.status != 409:
                    raise
                objects.patch_cluster_custom_object(
                    "kwok.x-k8s.io", "v1alpha1", "clusterlogs", f"logs-{namespace}", body
                )
        return log_file

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def start_control_plane(folder: Path, binaries: Path) -> ControlPlane:
    """Start every component from ``binaries`` and return once a kwok node is Ready and
    the default ServiceAccount controller works. Stops what it started if any step fails."""
    folder.mkdir(parents=True, exist_ok=True)
    pki = folder / "pki"
    ca = LocalCA(pki)
    apiserver_cert = ca.issue("apiserver", common_name="kube-apiserver", server=True)
    admin_cert = ca.issue(
        "admin", common_name="devstack-admin", organizations=("system:masters",), client=True
    )
    kubelet_client = ca.issue(
        "apiserver-kubelet-client",
        common_name="kube-apiserver-kubelet",
        organizations=("system:masters",),
        client=True,
    )
    kwok_serving = ca.issue("kwok", common_name=KWOK_NODE_NAME, server=True)
    sa_keys = write_service_account_keys(pki)

    etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
    kwok_port = free_port()
    server = f"https://127.0.0.1:{api_port}"
    kubeconfig = folder / "admin.kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(_kubeconfig(server, ca.cert_path, admin_cert.cert, admin_cert.key, "admin"))
    )
    kubeconfig.chmod(0o600)
    logs = folder / "logs"
    plane = ControlPlane(folder, server, ca.cert_path, kubeconfig, binaries)

    def launch(name: str, argv: list[str]) -> ManagedProcess:
        process = ManagedProcess(name, argv, logs / f"{name}.log").start()
        plane.processes.append(process)
        return process

    try:
        etcd = launch(
            "etcd",
            [
                str(binaries / "etcd"),
                f"--data-dir={folder / 'etcd'}",
                "--name=devstack",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=devstack=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        apiserver = launch(
            "kube-apiserver",
            [
                str(binaries / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--cert-dir={pki}",
                f"--tls-cert-file={apiserver_cert.cert}",
                f"--tls-private-key-file={apiserver_cert.key}",
                f"--client-ca-file={ca.cert_path}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={sa_keys.cert}",
                f"--service-account-signing-key-file={sa_keys.key}",
                f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
                "--service-cluster-ip-range=10.96.0.0/16",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
                "--v=1",
            ],
        )
        api = plane.api_client()
        version = client.VersionApi(api)
        wait_until(
            lambda: bool(version.get_code()), timeout=90, what="kube-apiserver", alive=apiserver
        )
        wait_until(
            lambda: bool(client.CoreV1Api(api).list_namespace()),
            timeout=60,
            what="kube-apiserver namespaces",
            alive=apiserver,
        )
        _ = etcd
        extensions = client.ApiextensionsV1Api(api)
        for plural, kind, scope in (
            ("logs", "Logs", "Namespaced"),
            ("clusterlogs", "ClusterLogs", "Cluster"),
        ):
            extensions.create_custom_resource_definition(_open_crd(plural, kind, scope))
        common = [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
        ]
        launch(
            "kube-controller-manager",
            [
                str(binaries / "kube-controller-manager"),
                *common,
                f"--secure-port={free_port()}",
                f"--service-account-private-key-file={sa_keys.key}",
                f"--root-ca-file={ca.cert_path}",
                "--use-service-account-credentials=false",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller",
                "--concurrent-gc-syncs=5",
                "--v=1",
            ],
        )
        launch(
            "kube-scheduler",
            [
                str(binaries / "kube-scheduler"),
                *common,
                f"--secure-port={free_port()}",
                "--v=1",
            ],
        )
        stages = resources.files("podbroker_devstack").joinpath("kwok-stages.yaml").read_text()
        stage_file = folder / "kwok-stages.yaml"
        stage_file.write_text(stages)
        kwok = launch(
            "kwok",
            [
                str(binaries / "kwok"),
                f"--kubeconfig={kubeconfig}",
                f"--config={stage_file}",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                "--enable-crds=Logs,ClusterLogs",
                f"--server-address=127.0.0.1:{kwok_port}",
                f"--node-port={kwok_port}",
                "--node-ip=127.0.0.1",
                "--cidr=10.244.0.0/16",
                f"--tls-cert-file={kwok_serving.cert}",
                f"--tls-private-key-file={kwok_serving.key}",
            ],
        )
        core = client.CoreV1Api(api)
        core.create_node(
            client.V1Node(
                metadata=client.V1ObjectMeta(
                    name=KWOK_NODE_NAME,
                    annotations={KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    labels={"kubernetes.io/hostname": KWOK_NODE_NAME, "type": "kwok"},
                )
            )
        )

        def node_ready() -> bool:
            node = core.read_node(KWOK_NODE_NAME)
            return any(
                c.type == "Ready" and c.status == "True" for c in (node.status.conditions or [])
            )

        wait_until(node_ready, timeout=60, what="kwok node Ready", alive=kwok)
        wait_until(
            lambda: bool(core.read_namespaced_service_account("default", "default")),
            timeout=60,
            what="kube-controller-manager (default ServiceAccount)",
        )
        api.close()
    except BaseException:
        plane.stop()
        raise
    return plane
