"""The launch plan is pure: hardening, naming, idempotency keys and Secret layout."""

from __future__ import annotations

from typing import Any

import pytest

from broker.core.api_models import ContainerSpec, LaunchRequest, Scheduling
from broker.core.models import EnvDelivery, FileDelivery, SecretRequest, TaskIdentity
from broker.core.plan import (
    PlanPolicy,
    PodTemplate,
    build_plan,
    label_value,
    launch_id_for,
)
from broker.core.podmeta import (
    LAUNCH_ID_LABEL,
    MANAGED_BY_LABEL,
    SecretSource,
    VaultHoldings,
    holdings_of,
)
from broker.core.secret_value import SecretValue
from broker.errors import InvalidRequestError

POLICY = PlanPolicy(
    namespaces=("tasks",),
    allowed_service_accounts=("default", "etl"),
    templates={"small": PodTemplate(labels={"tier": "small"})},
)
TASK = TaskIdentity(dag_id="etl_daily", task_id="load", run_id="manual__2026-01-01", try_number=1)


def request(**changes: Any) -> LaunchRequest:
    base: dict[str, Any] = {"task": TASK, "container": ContainerSpec(image="python:3.12")}
    base.update(changes)
    return LaunchRequest(**base)


def test_pod_is_hardened_by_default() -> None:
    pod = build_plan(request(), POLICY, "static:dev").pod
    spec = pod["spec"]
    container = spec["containers"][0]
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    assert spec["activeDeadlineSeconds"] == 3600
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "volumes" not in spec
    assert pod["metadata"]["labels"][MANAGED_BY_LABEL] == "podbroker"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"volumes": [{"name": "x", "hostPath": {"path": "/"}}]}, "volumes"),
        ({"hostNetwork": True}, "hostNetwork"),
        ({"hostPID": True}, "hostPID"),
        ({"hostIPC": True}, "hostIPC"),
        ({"containers": [{"securityContext": {"privileged": True}}]}, "privileged"),
        ({"securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}, "capabilities"),
        ({"envFrom": [{"secretRef": {"name": "other"}}]}, "envFrom"),
        ({"env": [{"valueFrom": {"secretKeyRef": {"name": "other", "key": "k"}}}]}, "secretKeyRef"),
        ({"volumes": [{"projected": {"sources": []}}]}, "projected"),
        ({"serviceAccountName": "admin"}, "serviceAccountName"),
        ({"nodeName": "n1"}, "not supported"),
    ],
)
def test_unsafe_pod_fields_are_refused_with_the_field_named(
    overrides: dict[str, Any],
    needle: str,
) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        build_plan(request(pod_overrides=overrides), POLICY, "static:dev")


def test_service_account_outside_the_allow_list_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="service_account 'admin'"):
        build_plan(request(service_account="admin"), POLICY, "static:dev")
    assert (
        build_plan(request(service_account="etl"), POLICY, "x").pod["spec"]["serviceAccountName"]
        == "etl"
    )


def test_namespace_and_template_must_be_known() -> None:
    with pytest.raises(InvalidRequestError, match="namespace 'other'"):
        build_plan(request(namespace="other"), POLICY, "x")
    with pytest.raises(InvalidRequestError, match="unknown pod_template 'huge'"):
        build_plan(request(pod_template="huge"), POLICY, "x")
    pod = build_plan(request(pod_template="small"), POLICY, "x").pod
    assert pod["metadata"]["labels"]["tier"] == "small"


def test_reserved_labels_are_refused() -> None:
    scheduling = Scheduling(labels={LAUNCH_ID_LABEL: "forged"})
    with pytest.raises(InvalidRequestError, match="reserved"):
        build_plan(request(scheduling=scheduling), POLICY, "x")


def test_launch_id_is_stable_per_try_and_differs_between_tries() -> None:
    again = TaskIdentity(**TASK.model_dump())
    assert launch_id_for(TASK) == launch_id_for(again)
    assert launch_id_for(TASK) != launch_id_for(TASK.model_copy(update={"try_number": 2}))
    assert launch_id_for(TASK) != launch_id_for(TASK.model_copy(update={"map_index": 0}))


def test_label_values_are_valid_and_long_ones_keep_a_hash() -> None:
    assert label_value("manual__2026-01-01T00:00:00+00:00") == "manual__2026-01-01T00_00_00_00_00"
    long = label_value("x" * 100)
    assert len(long) <= 63
    assert long != label_value("x" * 99)


def test_env_and_file_delivery_wire_only_the_per_pod_secret() -> None:
    plan = build_plan(
        request(
            secrets=[
                SecretRequest(name="db", delivery=EnvDelivery(prefix="DB_")),
                SecretRequest(name="api", delivery=EnvDelivery(mapping={"key": "API_TOKEN"})),
                SecretRequest(name="cert", delivery=FileDelivery(mount_path="/etc/cert")),
            ]
        ),
        POLICY,
        "x",
    )
    keys = {"db": ["user", "password"], "api": ["key", "unused"], "cert": ["tls.crt"]}
    pod = plan.pod_with_secret_refs(keys)
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert set(env) == {"DB_USER", "DB_PASSWORD", "API_TOKEN"}
    assert {ref["name"] for ref in env.values()} == {plan.secret_name}
    (volume,) = pod["spec"]["volumes"]
    assert volume["secret"]["secretName"] == plan.secret_name
    assert volume["secret"]["defaultMode"] == 0o400
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/etc/cert/tls.crt"
    assert mount["readOnly"] is True

    values = {name: {k: SecretValue(f"v-{name}-{k}") for k in ks} for name, ks in keys.items()}
    sources = [SecretSource("db", "kv/data/db", 3)]
    manifest = plan.secret_manifest(
        values, "uid-1", sources, VaultHoldings(("database/creds/x/1",), "acc-1")
    )
    assert manifest["immutable"] is True
    assert holdings_of(manifest["metadata"]["annotations"]) == VaultHoldings(
        ("database/creds/x/1",), "acc-1"
    )
    assert manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    # Exactly the delivered keys: the unmapped "unused" key of "api" is not written.
    assert sorted(manifest["stringData"].values()) == sorted(
        ["v-db-user", "v-db-password", "v-api-key", "v-cert-tls.crt"]
    )


def test_colliding_env_vars_are_refused() -> None:
    plan = build_plan(
        request(
            secrets=[
                SecretRequest(name="a", delivery=EnvDelivery(prefix="X_")),
                SecretRequest(name="b", delivery=EnvDelivery(prefix="X_")),
            ]
        ),
        POLICY,
        "x",
    )
    with pytest.raises(InvalidRequestError, match="X_PASSWORD"):
        plan.pod_with_secret_refs({"a": ["password"], "b": ["password"]})


def test_secret_value_never_shows_in_repr_or_format() -> None:
    value = SecretValue("hunter2-planted")
    assert "hunter2" not in repr(value)
    assert "hunter2" not in f"{value}"
    assert "hunter2" not in str([value])
    assert value.reveal() == "hunter2-planted"


def test_default_env_names_carry_the_secret_name() -> None:
    plan = build_plan(
        request(secrets=[SecretRequest(name="orders-db"), SecretRequest(name="warehouse.ro")]),
        POLICY,
        "x",
    )
    pod = plan.pod_with_secret_refs({"orders-db": ["password"], "warehouse.ro": ["password"]})
    names = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
    assert names == {"ORDERS_DB_PASSWORD", "WAREHOUSE_RO_PASSWORD"}


@pytest.mark.parametrize(
    ("scheduling", "needle"),
    [
        (
            Scheduling(
                annotations={"container.apparmor.security.beta.kubernetes.io/base": "unconfined"}
            ),
            "confinement",
        ),
        (
            Scheduling(annotations={"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}),
            "confinement",
        ),
        (Scheduling(node_selector={"node-role.kubernetes.io/control-plane": ""}), "control-plane"),
        (Scheduling(tolerations=[{"operator": "Exists"}]), "every taint"),  # type: ignore[list-item]
        (
            Scheduling(
                tolerations=[
                    {
                        "key": "node-role.kubernetes.io/control-plane",  # type: ignore[list-item]
                        "operator": "Exists",
                    }
                ]
            ),
            "control-plane",
        ),
    ],
)
def test_scheduling_fields_cannot_loosen_confinement_or_placement(
    scheduling: Scheduling,
    needle: str,
) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        build_plan(request(scheduling=scheduling), POLICY, "x")


def test_template_labels_win_and_its_node_selector_is_fixed() -> None:
    policy = PlanPolicy(
        namespaces=("tasks",),
        templates={"pool": PodTemplate(labels={"tier": "batch"}, node_selector={"pool": "tasks"})},
        allowed_labels=("tier",),
    )
    pod = build_plan(
        request(pod_template="pool", scheduling=Scheduling(labels={"tier": "system"})),
        policy,
        "x",
    ).pod
    assert pod["metadata"]["labels"]["tier"] == "batch"
    assert pod["spec"]["nodeSelector"] == {"pool": "tasks"}
    with pytest.raises(InvalidRequestError, match="node_selector is fixed"):
        build_plan(
            request(
                pod_template="pool",
                scheduling=Scheduling(node_selector={"pool": "tasks", "zone": "a"}),
            ),
            policy,
            "x",
        )


def test_same_try_in_another_namespace_is_another_launch() -> None:
    assert launch_id_for(TASK, "a") != launch_id_for(TASK, "b")


def test_a_rejected_audit_event_does_not_quote_the_value() -> None:
    from broker.core import audit_events as ev

    with pytest.raises(ValueError, match="looks like a secret value") as rejected:
        ev.launch_event(ev.EventKind.LAUNCH_FAILED, launch_id="x", password="PLANTED-hunter2")
    assert "PLANTED-hunter2" not in str(rejected.value)
    assert "password" in str(rejected.value)
