"""Templates that bind, allow-listed metadata, volumes and scheduling fields (issue 12
item 5, issue 13 items 1 and 6): pure checks in broker.core.plan."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from broker.core.api_models import LaunchRequest
from broker.core.models import TaskIdentity
from broker.core.plan import NamespaceRules, PlanPolicy, PodTemplate, build_plan
from broker.core.quantity import parse_quantity
from broker.errors import InvalidRequestError

TASK = {"dag_id": "etl_daily", "task_id": "load", "run_id": "manual__1", "try_number": 1}
BOUND = PodTemplate.model_validate(
    {
        "service_account": "etl",
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "node_selector": {"pool": "batch"},
        "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
        "runtime_class_name": "gvisor",
        "image_pull_secrets": ["registry"],
        "volumes": [{"name": "cache", "empty_dir": {"size_limit": "1Gi"}}],
        "config_maps": ["etl-*"],
        "sidecars": [
            {
                "name": "proxy",
                "image": "proxy:1",
                "volume_mounts": [{"name": "cache", "mount_path": "/c"}],
            }
        ],
    }
)
POLICY = PlanPolicy(
    namespaces=("tasks", "strict"),
    allowed_service_accounts=("default", "etl"),
    templates={"bound": BOUND, "free": PodTemplate()},
    namespace_rules={
        "tasks": NamespaceRules(
            persistent_volume_claims=["shared-*"],
            config_maps=["settings"],
            image_pull_secrets=["regcred"],
            priority_classes=["batch-low"],
            runtime_classes=["kata"],
        ),
        "strict": NamespaceRules(require_template=True),
    },
    allowed_labels=("team", "app.kubernetes.io/*"),
    allowed_annotations=("example.com/*",),
    run_as_non_root=True,
)


def plan(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"task": TASK, "container": {"image": "python:3.12"}}
    body.update(fields)
    return build_plan(LaunchRequest.model_validate(body), POLICY, "x").pod


def refused(needle: str, **fields: Any) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        plan(**fields)


# -- templates bind ---------------------------------------------------------------------


def test_template_resources_are_defaults() -> None:
    resources = plan(pod_template="bound")["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}


def test_a_request_may_ask_less_than_the_template() -> None:
    pod = plan(
        pod_template="bound",
        container={"image": "x", "resources": {"requests": {"cpu": "0.25", "memory": "512Mi"}}},
    )
    assert pod["spec"]["containers"][0]["resources"]["requests"] == {
        "cpu": "0.25",
        "memory": "512Mi",
    }


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"requests": {"cpu": "1"}}, "container.resources.requests.cpu"),
        ({"requests": {"memory": "1.5Gi"}}, "container.resources.requests.memory"),
        ({"limits": {"memory": "3G"}}, "container.resources.limits.memory"),
    ],
)
def test_a_request_never_asks_more_than_the_template(resources: dict[str, Any], field: str) -> None:
    refused(field, pod_template="bound", container={"image": "x", "resources": resources})


def test_unparsable_quantity_is_named() -> None:
    refused(
        "resources.requests.cpu",
        pod_template="bound",
        container={"image": "x", "resources": {"requests": {"cpu": "lots"}}},
    )


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"service_account": "default"}, "service_account is fixed"),
        ({"scheduling": {"node_selector": {"pool": "gpu"}}}, "node_selector is fixed"),
        ({"scheduling": {"tolerations": [{"key": "gpu", "operator": "Exists"}]}}, "tolerations"),
        ({"scheduling": {"runtime_class_name": "kata"}}, "runtime_class_name is fixed"),
    ],
)
def test_fixed_template_values_cannot_be_changed(fields: dict[str, Any], needle: str) -> None:
    refused(needle, pod_template="bound", **fields)


def test_fixed_values_may_be_repeated_and_are_applied() -> None:
    pod = plan(pod_template="bound", service_account="etl")
    spec = pod["spec"]
    assert spec["serviceAccountName"] == "etl"
    assert spec["nodeSelector"] == {"pool": "batch"}
    assert spec["tolerations"] == [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["runtimeClassName"] == "gvisor"
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert spec["volumes"] == [{"name": "cache", "emptyDir": {"medium": "", "sizeLimit": "1Gi"}}]


def test_sidecars_come_from_templates_only_and_are_hardened() -> None:
    (sidecar,) = plan(pod_template="bound")["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["volumeMounts"] == [{"name": "cache", "mountPath": "/c", "readOnly": False}]
    with pytest.raises(ValidationError):
        LaunchRequest.model_validate(
            {"task": TASK, "container": {"image": "x"}, "sidecars": [{"name": "a"}]}
        )


def test_a_namespace_can_require_a_template() -> None:
    refused("pod_template: namespace 'strict' requires one", namespace="strict")
    assert plan(namespace="strict", pod_template="free")["metadata"]["namespace"] == "strict"


# -- labels and annotations pass an allow-list ----------------------------------------


def test_allowed_labels_and_annotations_pass() -> None:
    pod = plan(
        scheduling={
            "labels": {"team": "a", "app.kubernetes.io/name": "etl"},
            "annotations": {"example.com/owner": "me"},
        }
    )
    assert pod["metadata"]["labels"]["team"] == "a"
    assert pod["metadata"]["annotations"]["example.com/owner"] == "me"


@pytest.mark.parametrize(
    ("scheduling", "needle"),
    [
        ({"labels": {"app": "payments"}}, "scheduling.labels: 'app' is not allowed"),
        ({"annotations": {"other.io/x": "1"}}, "scheduling.annotations: 'other.io/x'"),
        (
            {"annotations": {"example.com/seccomp": "unconfined"}},
            "confinement",  # never passes, even when a glob covers it
        ),
    ],
)
def test_other_labels_and_annotations_are_refused(scheduling: dict[str, Any], needle: str) -> None:
    refused(needle, scheduling=scheduling)


# -- volumes ----------------------------------------------------------------------------


def test_scratch_claims_config_maps_and_ephemeral_volumes_are_mounted() -> None:
    volumes = [
        {"name": "scratch", "empty_dir": {}},
        {"name": "data", "persistent_volume_claim": {"claim_name": "shared-data"}},
        {"name": "conf", "config_map": {"name": "settings", "items": [{"key": "a", "path": "a"}]}},
        {
            "name": "tmp",
            "ephemeral": {
                "volume_claim_template": {
                    "spec": {
                        "access_modes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": "1Gi"}},
                    }
                }
            },
        },
    ]
    mounts = [
        {"name": "scratch", "mount_path": "/scratch"},
        {"name": "data", "mount_path": "/data", "read_only": True},
        {"name": "conf", "mount_path": "/etc/app"},
        {"name": "tmp", "mount_path": "/tmp/work", "sub_path": "x"},
    ]
    pod = plan(volumes=volumes, volume_mounts=mounts)
    spec = pod["spec"]
    assert [v["name"] for v in spec["volumes"]] == ["scratch", "data", "conf", "tmp"]
    assert spec["volumes"][1] == {
        "name": "data",
        "persistentVolumeClaim": {"claimName": "shared-data", "readOnly": False},
    }
    assert spec["volumes"][3]["ephemeral"]["volumeClaimTemplate"]["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]
    assert spec["containers"][0]["volumeMounts"][3] == {
        "name": "tmp",
        "mountPath": "/tmp/work",
        "subPath": "x",
        "readOnly": False,
    }


def test_secret_files_are_added_beside_request_volumes() -> None:
    body: dict[str, Any] = {
        "task": TASK,
        "container": {"image": "x"},
        "secrets": [{"name": "db", "delivery": {"type": "file", "mount_path": "/secrets/db"}}],
        "volumes": [{"name": "scratch", "empty_dir": {}}],
        "volume_mounts": [{"name": "scratch", "mount_path": "/scratch"}],
    }
    built = build_plan(LaunchRequest.model_validate(body), POLICY, "x")
    pod = built.pod_with_secret_refs({"db": ["password"]})
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["scratch", "podbroker-secrets"]
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert [m["mountPath"] for m in mounts] == ["/scratch", "/secrets/db/password"]


@pytest.mark.parametrize(
    ("volume", "needle"),
    [
        ({"host_path": {"path": "/"}}, "host_path volumes are refused"),
        ({"hostPath": {"path": "/"}}, "host_path volumes are refused"),
        ({"secret": {"secret_name": "other"}}, "secret volumes are refused"),
        ({"projected": {"sources": []}}, "projected volumes are refused"),
        ({"csi": {"driver": "secrets-store.csi.k8s.io"}}, "csi volumes are refused"),
        ({}, "exactly one"),
        ({"empty_dir": {}, "config_map": {"name": "settings"}}, "exactly one"),
    ],
)
def test_unsafe_volume_kinds_are_refused(volume: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        LaunchRequest.model_validate(
            {"task": TASK, "container": {"image": "x"}, "volumes": [{"name": "v", **volume}]}
        )


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        (
            {"volumes": [{"name": "d", "persistent_volume_claim": {"claim_name": "payroll"}}]},
            "persistent volume claim 'payroll' is not allowed",
        ),
        (
            {"volumes": [{"name": "d", "config_map": {"name": "kube-root-ca.crt"}}]},
            "ConfigMap 'kube-root-ca.crt' is not allowed",
        ),
        (
            {"volumes": [{"name": "podbroker-secrets", "empty_dir": {}}]},
            "reserved for the broker",
        ),
        ({"volume_mounts": [{"name": "nope", "mount_path": "/x"}]}, "no volume named 'nope'"),
        (
            {
                "volumes": [{"name": "s", "empty_dir": {}}],
                "volume_mounts": [{"name": "s", "mount_path": "/var/run/secrets/kubernetes.io"}],
            },
            "where the broker mounts secrets",
        ),
        (
            {
                "secrets": [{"name": "db", "delivery": {"type": "file", "mount_path": "/etc/db"}}],
                "volumes": [{"name": "s", "empty_dir": {}}],
                "volume_mounts": [{"name": "s", "mount_path": "/etc"}],
            },
            "would cover or sit inside '/etc/db'",
        ),
        (
            {
                "secrets": [{"name": "db", "delivery": {"type": "file", "mount_path": "/etc/db"}}],
                "volumes": [{"name": "s", "empty_dir": {}}],
                "volume_mounts": [{"name": "s", "mount_path": "/etc/db/password"}],
            },
            "would cover or sit inside",
        ),
    ],
)
def test_volume_rules(fields: dict[str, Any], needle: str) -> None:
    refused(needle, **fields)


def test_a_template_may_allow_config_maps() -> None:
    pod = plan(
        pod_template="bound",
        volumes=[{"name": "c", "config_map": {"name": "etl-settings"}}],
        volume_mounts=[{"name": "c", "mount_path": "/etc/etl"}],
    )
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["cache", "c"]


def test_mount_paths_must_be_clean() -> None:
    for path in ("relative", "/a/../b", "/a//b", "/a/./b"):
        with pytest.raises(ValidationError):
            LaunchRequest.model_validate(
                {
                    "task": TASK,
                    "container": {"image": "x"},
                    "volume_mounts": [{"name": "s", "mount_path": path}],
                }
            )


# -- scheduling and identity fields ------------------------------------------------------


def test_scheduling_fields_reach_the_pod() -> None:
    pod = plan(
        container={"image": "x", "image_pull_policy": "Always"},
        image_pull_secrets=["regcred"],
        security_context={"run_as_user": 1000, "run_as_group": 1000, "fs_group": 2000},
        scheduling={
            "priority_class_name": "batch-low",
            "runtime_class_name": "kata",
            "affinity": {
                "node_affinity": {
                    "required_during_scheduling_ignored_during_execution": {
                        "node_selector_terms": [
                            {
                                "match_expressions": [
                                    {"key": "zone", "operator": "In", "values": ["a"]}
                                ]
                            }
                        ]
                    }
                },
                "pod_anti_affinity": {
                    "preferred_during_scheduling_ignored_during_execution": [
                        {
                            "weight": 10,
                            "pod_affinity_term": {
                                "topology_key": "kubernetes.io/hostname",
                                "label_selector": {"match_labels": {"dag_id": "etl_daily"}},
                            },
                        }
                    ]
                },
            },
            "topology_spread_constraints": [
                {"max_skew": 1, "topology_key": "zone", "when_unsatisfiable": "ScheduleAnyway"}
            ],
        },
    )
    spec = pod["spec"]
    assert spec["containers"][0]["imagePullPolicy"] == "Always"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["priorityClassName"] == "batch-low"
    assert spec["runtimeClassName"] == "kata"
    assert spec["securityContext"] == {
        "seccompProfile": {"type": "RuntimeDefault"},
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 2000,
        "runAsNonRoot": True,
    }
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchExpressions"][0]["key"] == "zone"
    weighted = spec["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert weighted[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == {"dag_id": "etl_daily"}
    assert spec["topologySpreadConstraints"][0]["whenUnsatisfiable"] == "ScheduleAnyway"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"image_pull_secrets": ["vault-admin"]}, "image_pull_secrets: 'vault-admin'"),
        ({"scheduling": {"priority_class_name": "system-node-critical"}}, "priority_class_name"),
        ({"scheduling": {"runtime_class_name": "runc-privileged"}}, "runtime_class_name"),
        ({"security_context": {"run_as_user": 0}}, "run_as_user: 0 is root"),
        ({"security_context": {"run_as_non_root": False}}, "run_as_non_root"),
        (
            {
                "scheduling": {
                    "affinity": {
                        "node_affinity": {
                            "required_during_scheduling_ignored_during_execution": {
                                "node_selector_terms": [
                                    {
                                        "match_expressions": [
                                            {
                                                "key": "node-role.kubernetes.io/control-plane",
                                                "operator": "Exists",
                                            }
                                        ]
                                    }
                                ]
                            }
                        }
                    }
                }
            },
            "control-plane",
        ),
    ],
)
def test_unsafe_scheduling_values_are_refused(fields: dict[str, Any], needle: str) -> None:
    refused(needle, **fields)


def test_a_boolean_is_no_user_id() -> None:
    with pytest.raises(ValidationError):
        LaunchRequest.model_validate(
            {"task": TASK, "container": {"image": "x"}, "security_context": {"run_as_user": True}}
        )


@pytest.mark.parametrize(
    ("text", "value"),
    [("100m", "0.1"), ("1Gi", str(2**30)), ("1.5", "1.5"), ("2e3", "2000"), ("1k", "1000")],
)
def test_quantities(text: str, value: str) -> None:
    assert parse_quantity(text) == parse_quantity(value)


def test_task_identity_still_first() -> None:
    assert TaskIdentity.model_validate(TASK).dag_id == "etl_daily"
