"""The launch plan: everything the broker will create for one launch, computed as plain
data (Kubernetes manifests as dicts) from the request, the platform's pod template and
the settings. Hardening lives here: the pod spec is built, never passed through."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from broker.core import podmeta
from broker.core.api_models import LaunchRequest, Toleration
from broker.core.models import EnvDelivery, SecretRequest, TaskIdentity
from broker.core.objects import CONTAINER_NAME
from broker.core.policy import DatabaseSecret, Decision, KvSecret, PolicySet
from broker.core.secret_value import SecretValue
from broker.errors import InvalidRequestError

SECRET_NAME_PREFIX = "podbroker-"
SECRETS_VOLUME = "podbroker-secrets"

# Fields of a pod spec a caller might try to sneak in, and why each is refused.
_FORBIDDEN_OVERRIDES: Mapping[str, str] = {
    "volumes": "volumes are created by the broker only",
    "envFrom": "envFrom could read other Secrets or ConfigMaps",
    "env_from": "envFrom could read other Secrets or ConfigMaps",
    "secretKeyRef": "secretKeyRef could read other Secrets",
    "projected": "projected volumes could expose ServiceAccount tokens or Secrets",
    "hostPath": "hostPath exposes the node's filesystem",
    "hostNetwork": "host namespaces break pod isolation",
    "hostPID": "host namespaces break pod isolation",
    "hostIPC": "host namespaces break pod isolation",
    "privileged": "privileged containers can read every Secret on the node",
    "capabilities": "added capabilities are not allowed (all are dropped)",
    "allowPrivilegeEscalation": "privilege escalation is always off",
    "serviceAccountName": "use the service_account field (checked against an allow-list)",
    "automountServiceAccountToken": "the API token is never mounted into task pods",
    "initContainers": "only the broker-built container runs",
    "containers": "only the broker-built container runs",
    "ephemeralContainers": "only the broker-built container runs",
    "securityContext": "the security context is set by the broker",
}


class PodTemplate(BaseModel):
    """A platform-defined template a request may name (``pod_template``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    resources: dict[str, dict[str, str]] = Field(default_factory=dict)
    service_account: str | None = None
    priority_class_name: str | None = None


@dataclass(frozen=True)
class PlanPolicy:
    """The settings that bound what a request may ask for."""

    namespaces: Sequence[str]
    allowed_service_accounts: Sequence[str] = ("default",)
    templates: Mapping[str, PodTemplate] = field(default_factory=dict)
    run_as_non_root: bool = False


def _find_forbidden(value: Any, path: str, found: list[str]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in _FORBIDDEN_OVERRIDES:
                found.append(f"{where}: {_FORBIDDEN_OVERRIDES[key]}")
            _find_forbidden(item, where, found)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _find_forbidden(item, f"{path}[{index}]", found)


def reject_unsafe_overrides(pod_overrides: Mapping[str, Any]) -> None:
    """Refuse any pod field that could widen access; the message lists each one."""
    found: list[str] = []
    _find_forbidden(pod_overrides, "", found)
    if found:
        raise InvalidRequestError("pod_overrides not allowed: " + "; ".join(sorted(found)))
    if pod_overrides:
        raise InvalidRequestError(
            "pod_overrides is not supported; use container, scheduling and pod_template "
            f"(got: {', '.join(sorted(pod_overrides))})"
        )


_LABEL_VALUE_RE = re.compile(r"[^A-Za-z0-9._-]")


def label_value(value: str) -> str:
    """A valid label value (<=63 chars, alphanumeric ends); long values keep a hash."""
    cleaned = _LABEL_VALUE_RE.sub("_", value).strip("._-")
    if len(cleaned) > 63:
        digest = hashlib.sha256(value.encode()).hexdigest()[:8]
        cleaned = cleaned[:54].rstrip("._-") + "-" + digest
    return cleaned


def request_digest(request: LaunchRequest) -> str:
    """What a launch asked for, as one digest: a second launch of the same task try
    reattaches only when it asks for exactly the same (image, command, env, secrets,
    deliveries, template, scheduling, ...)."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()


def task_labels(task: TaskIdentity) -> dict[str, str]:
    """The labels every try of a task instance shares (KubernetesPodOperator's)."""
    labels = {
        "dag_id": label_value(task.dag_id),
        "task_id": label_value(task.task_id),
        "run_id": label_value(task.run_id),
    }
    if task.map_index >= 0:
        labels["map_index"] = str(task.map_index)
    return labels


def launch_id_for(task: TaskIdentity, namespace: str = "") -> str:
    """Deterministic id of a task try (in a namespace): the same identity always maps to
    the same launch, which makes POST /v1/launches idempotent across retries and broker
    replicas."""
    key = json.dumps(
        [task.dag_id, task.task_id, task.run_id, task.try_number, task.map_index, namespace]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _dns_part(value: str, limit: int) -> str:
    part = re.sub(r"[^a-z0-9-]", "-", value.lower()).strip("-")
    return re.sub(r"-+", "-", part)[:limit].strip("-") or "x"


def pod_name_for(task: TaskIdentity, launch_id: str) -> str:
    return f"{_dns_part(task.dag_id, 20)}-{_dns_part(task.task_id, 20)}-{launch_id[:12]}"


def secret_name_for(launch_id: str) -> str:
    return f"{SECRET_NAME_PREFIX}{launch_id}"


def _env_var_name(prefix: str, key: str) -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_]", "_", key).upper()


def _file_key(secret_index: int, key: str) -> str:
    return f"f{secret_index}.{re.sub(r'[^A-Za-z0-9._-]', '_', key)}"


@dataclass(frozen=True)
class SecretSlot:
    """Where one key of one secret lands: a Secret data key, then an env var or a file."""

    secret_name: str
    source_key: str
    data_key: str
    env_var: str | None = None
    mount_path: str | None = None
    file_name: str | None = None


DATABASE_KEYS = ("username", "password")  # what a database/creds read always returns


@dataclass(frozen=True)
class VaultRead:
    """One read the launch makes with its child token: KV v2 ``{mount}/data/{path}``
    (``version`` pinned or latest, ``keys`` a subset or all) or database
    ``{mount}/creds/{path}`` whose lease is capped at ``lease_cap`` seconds."""

    name: str
    kind: Literal["kv", "database"]
    mount: str
    path: str
    grant: str
    version: int | None = None
    keys: tuple[str, ...] | None = None
    lease_cap: int | None = None

    @property
    def vault_path(self) -> str:
        middle = "data" if self.kind == "kv" else "creds"
        return f"{self.mount}/{middle}/{self.path}"

    @property
    def where(self) -> str:
        """How errors name the read (no values, ever)."""
        if self.kind == "kv":
            return f"{self.mount}/{self.path}" + (f"@v{self.version}" if self.version else "")
        return self.vault_path


@dataclass(frozen=True)
class ChildToken:
    """The one token a launch reads with: only its grants' ACL policies, a TTL and a use
    count just large enough for its reads.

    ``token_type``: ``batch`` when no lease outlives the reads (KV only): Vault does not
    persist batch tokens, so such a launch writes nothing to Vault's storage (batch
    tokens have no accessor and no use count; they end with their short TTL).
    ``service`` for dynamic credentials: their leases live as long as the token, and its
    accessor lets the broker revoke them all at once."""

    policies: tuple[str, ...]
    ttl_seconds: int
    num_uses: int
    metadata: Mapping[str, str]
    display_name: str
    token_type: Literal["service", "batch"] = "service"


@dataclass(frozen=True)
class SecretLimits:
    """Broker settings that bound child tokens and leases."""

    kv_token_ttl: int = 30
    default_lease_ttl: int = 3600
    min_dynamic_token_ttl: int = 30
    max_dynamic_token_ttl: int = 8 * 3600
    """The token role's explicit max TTL (``vault bootstrap``'s default): no lease lives
    longer than the token that created it."""


@dataclass(frozen=True)
class SecretsPlan:
    """What a launch does in Vault, decided before anything is read."""

    teams: tuple[str, ...]
    reads: tuple[VaultRead, ...]
    token: ChildToken
    expected_keys: Mapping[str, tuple[str, ...]] | None
    """Secret -> key names known from the catalog, or None when a KV secret's keys are
    only learnt by reading it (the pod must then wait for Vault)."""

    @property
    def dynamic(self) -> bool:
        return any(read.kind == "database" for read in self.reads)


@dataclass(frozen=True)
class LaunchPlan:
    launch_id: str
    namespace: str
    pod_name: str
    secret_name: str
    task: TaskIdentity
    labels: dict[str, str]
    pod: dict[str, Any]
    requests: tuple[SecretRequest, ...]
    caller: str = ""
    secrets: SecretsPlan | None = None
    """Set by :func:`complete_plan` once policy allowed the request."""

    @property
    def secret_names(self) -> list[str]:
        return [r.name for r in self.requests]

    @property
    def teams(self) -> tuple[str, ...]:
        return self.secrets.teams if self.secrets else ()

    def initial_pod(self) -> dict[str, Any] | None:
        """The pod to create before Vault answers, or None when its secret refs depend
        on keys that only the read will tell."""
        if not self.requests:
            return self.pod
        if self.secrets is None or self.secrets.expected_keys is None:
            return None
        return self.pod_with_secret_refs(self.secrets.expected_keys)

    def slots(self, resolved_keys: Mapping[str, Sequence[str]]) -> list[SecretSlot]:
        """Map each resolved key to its destination. ``resolved_keys``: secret -> keys."""
        slots: list[SecretSlot] = []
        for index, request in enumerate(self.requests):
            keys = sorted(resolved_keys.get(request.name, ()))
            delivery = request.delivery
            for key in keys:
                data_key = f"s{index}.{re.sub(r'[^A-Za-z0-9._-]', '_', key)}"
                if isinstance(delivery, EnvDelivery):
                    if delivery.mapping is not None:
                        if key not in delivery.mapping:
                            continue
                        env_var = delivery.mapping[key]
                    else:
                        prefix = delivery.prefix
                        if prefix is None:  # default: the secret's own name, e.g. ORDERS_DB_
                            prefix = _env_var_name("", request.name) + "_"
                        env_var = _env_var_name(prefix, key)
                    slots.append(SecretSlot(request.name, key, data_key, env_var=env_var))
                else:
                    slots.append(
                        SecretSlot(
                            request.name,
                            key,
                            data_key,
                            mount_path=delivery.mount_path,
                            file_name=re.sub(r"[^A-Za-z0-9._-]", "_", key),
                        )
                    )
        return slots

    def secret_manifest(
        self,
        values: Mapping[str, Mapping[str, SecretValue]],
        pod_uid: str,
        sources: Sequence[podmeta.SecretSource],
        holdings: podmeta.VaultHoldings,
    ) -> dict[str, Any]:
        """The per-pod Secret: immutable, owned by the pod, labelled like it. Values are
        revealed here and only here, straight into the manifest sent to the API."""
        slots = self.slots({name: list(keys) for name, keys in values.items()})
        self._check_env_collisions(slots)
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "immutable": True,
            "metadata": {
                "name": self.secret_name,
                "namespace": self.namespace,
                "labels": dict(self.labels),
                "annotations": podmeta.secret_annotations(sources, holdings),
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": self.pod_name,
                        "uid": pod_uid,
                        "controller": False,
                        "blockOwnerDeletion": False,
                    }
                ],
            },
            "stringData": {
                slot.data_key: values[slot.secret_name][slot.source_key].reveal() for slot in slots
            },
        }

    @staticmethod
    def _check_env_collisions(slots: Sequence[SecretSlot]) -> None:
        seen: dict[str, str] = {}
        for slot in slots:
            if slot.env_var is None:
                continue
            if slot.env_var in seen and seen[slot.env_var] != slot.secret_name:
                raise InvalidRequestError(
                    f"environment variable {slot.env_var} would be set by both "
                    f"{seen[slot.env_var]!r} and {slot.secret_name!r}; use a prefix or mapping"
                )
            seen[slot.env_var] = slot.secret_name

    def pod_with_secret_refs(self, resolved_keys: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        """The pod manifest wired to the per-pod Secret (env vars and/or one volume).
        Keys are known from the catalog before values are read, so the pod can be
        created while Vault reads are still in flight."""
        pod = cast(dict[str, Any], json.loads(json.dumps(self.pod)))
        container = pod["spec"]["containers"][0]
        slots = self.slots(resolved_keys)
        self._check_env_collisions(slots)
        env = container.setdefault("env", [])
        declared = {item["name"] for item in env}
        for slot in slots:
            if slot.env_var is None:
                continue
            if slot.env_var in declared:
                raise InvalidRequestError(
                    f"environment variable {slot.env_var} is set both as plain env and by "
                    f"secret {slot.secret_name!r}"
                )
            env.append(
                {
                    "name": slot.env_var,
                    "valueFrom": {
                        "secretKeyRef": {
                            "name": self.secret_name,
                            "key": slot.data_key,
                            "optional": False,
                        }
                    },
                }
            )
        files = [slot for slot in slots if slot.mount_path is not None]
        if files:
            pod["spec"]["volumes"] = [
                {
                    "name": SECRETS_VOLUME,
                    "secret": {
                        "secretName": self.secret_name,
                        "defaultMode": 0o400,
                        "optional": False,
                        "items": [
                            {"key": s.data_key, "path": s.data_key, "mode": 0o400} for s in files
                        ],
                    },
                }
            ]
            mounts = []
            for slot in files:
                assert slot.mount_path is not None and slot.file_name is not None
                mounts.append(
                    {
                        "name": SECRETS_VOLUME,
                        "readOnly": True,
                        "mountPath": f"{slot.mount_path.rstrip('/')}/{slot.file_name}",
                        "subPath": slot.data_key,
                    }
                )
            container["volumeMounts"] = mounts
        return pod


def _merge(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    merged = dict(base)
    merged.update(extra)
    return merged


# Annotations that change a container's confinement (the API server turns the AppArmor
# one into securityContext.appArmorProfile), and placement onto control-plane nodes.
_UNSAFE_ANNOTATION_PARTS = ("apparmor", "seccomp")
_CONTROL_PLANE_PREFIX = "node-role.kubernetes.io/"


def _reject_unsafe_scheduling(request: LaunchRequest) -> None:
    for key in request.scheduling.annotations:
        if any(part in key.lower() for part in _UNSAFE_ANNOTATION_PARTS):
            raise InvalidRequestError(
                f"annotation {key!r} would change the container's confinement; the broker "
                "sets seccomp (and AppArmor comes from the node's runtime default)"
            )
    for key in request.scheduling.node_selector:
        if key.startswith(_CONTROL_PLANE_PREFIX):
            raise InvalidRequestError(
                f"node_selector {key!r}: task pods never run on control-plane nodes"
            )
    for toleration in request.scheduling.tolerations:
        if not toleration.key:
            raise InvalidRequestError(
                "a toleration without a key tolerates every taint; name the taint"
            )
        if toleration.key.startswith(_CONTROL_PLANE_PREFIX):
            raise InvalidRequestError(
                f"toleration {toleration.key!r}: task pods never run on control-plane nodes"
            )


def build_plan(request: LaunchRequest, policy: PlanPolicy, caller_identity: str) -> LaunchPlan:
    """Validate the request against the policy and build the plan; raise
    InvalidRequestError (422) naming the offending field otherwise."""
    reject_unsafe_overrides(request.pod_overrides)
    namespace = request.namespace or policy.namespaces[0]
    if namespace not in policy.namespaces:
        raise InvalidRequestError(
            f"namespace {namespace!r} is not a task namespace of this broker "
            f"(allowed: {', '.join(policy.namespaces)})"
        )
    template = PodTemplate()
    if request.pod_template is not None:
        if request.pod_template not in policy.templates:
            raise InvalidRequestError(
                f"unknown pod_template {request.pod_template!r} "
                f"(defined: {', '.join(sorted(policy.templates)) or 'none'})"
            )
        template = policy.templates[request.pod_template]
    service_account = request.service_account or template.service_account or "default"
    if service_account not in policy.allowed_service_accounts:
        raise InvalidRequestError(
            f"service_account {service_account!r} is not allowed for task pods "
            f"(allowed: {', '.join(policy.allowed_service_accounts)})"
        )
    names = [s.name for s in request.secrets]
    duplicates = sorted(name for name, n in Counter(names).items() if n > 1)
    if duplicates:
        raise InvalidRequestError(f"secrets requested more than once: {', '.join(duplicates)}")
    for key in request.scheduling.labels:
        if podmeta.is_reserved(key):
            raise InvalidRequestError(f"label {key!r} is reserved for the broker")
    for key in request.scheduling.annotations:
        if podmeta.is_reserved(key):
            raise InvalidRequestError(f"annotation {key!r} is reserved for the broker")
    _reject_unsafe_scheduling(request)

    task = request.task
    launch_id = launch_id_for(task, namespace)
    pod_name = pod_name_for(task, launch_id)
    labels = {
        podmeta.MANAGED_BY_LABEL: podmeta.MANAGED_BY_VALUE,
        podmeta.LAUNCH_ID_LABEL: launch_id,
        # like the KubernetesPodOperator's (map_index only on mapped tasks)
        **task_labels(task),
        "try_number": str(task.try_number),
    }
    # The platform's template wins over the request wherever both set a key.
    user_labels = _merge(request.scheduling.labels, template.labels)
    annotations = _merge(request.scheduling.annotations, template.annotations)
    annotations.update(
        podmeta.pod_annotations(names, caller_identity, task, request_digest(request))
    )
    resources = {
        "requests": _merge(
            template.resources.get("requests", {}), request.container.resources.requests
        ),
        "limits": _merge(template.resources.get("limits", {}), request.container.resources.limits),
    }
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": request.container.image,
        "env": [{"name": k, "value": v} for k, v in request.container.env.items()],
        "resources": {k: v for k, v in resources.items() if v},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": False,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if request.container.command:
        container["command"] = list(request.container.command)
    if request.container.args:
        container["args"] = list(request.container.args)
    if request.container.working_dir:
        container["workingDir"] = request.container.working_dir
    pod_security: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    if policy.run_as_non_root:
        pod_security["runAsNonRoot"] = True
    tolerations = [*template.tolerations, *request.scheduling.tolerations]
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "activeDeadlineSeconds": request.timeout_seconds,
        "securityContext": pod_security,
        "containers": [container],
        "nodeSelector": _merge(request.scheduling.node_selector, template.node_selector),
        "tolerations": [
            t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in tolerations
        ],
    }
    if template.priority_class_name:
        spec["priorityClassName"] = template.priority_class_name
    for toleration in spec["tolerations"]:
        if "toleration_seconds" in toleration:
            toleration["tolerationSeconds"] = toleration.pop("toleration_seconds")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "namespace": namespace,
            "labels": _merge(user_labels, labels),
            "annotations": annotations,
        },
        "spec": spec,
    }
    return LaunchPlan(
        launch_id,
        namespace,
        pod_name,
        secret_name_for(launch_id),
        task,
        labels,
        pod,
        tuple(request.secrets),
        caller_identity,
    )


def teams_of(grant_ids: Sequence[str]) -> tuple[str, ...]:
    """The teams owning these grants (``team/grant`` ids)."""
    return tuple(sorted({grant_id.partition("/")[0] for grant_id in grant_ids}))


def complete_plan(
    plan: LaunchPlan, policy: PolicySet, decision: Decision, limits: SecretLimits
) -> LaunchPlan:
    """Add what the launch does in Vault to an allowed plan: one read per requested
    secret (from the catalog, capped by its grant), the child token's policies, TTL and
    uses, the teams whose grants matched, and the keys known before reading.

    Token: a batch token for ``kv_token_ttl`` when only KV is read (nothing outlives
    the reads). Otherwise a service token living as long as the largest lease cap
    (leases die with the token that created them, so renewing a lease up to its cap
    needs the token alive that long; each lease is still renewed only up to its own
    cap), bounded by ``max_dynamic_token_ttl``. Uses: one per read, plus one with dynamic
    credentials (Vault revokes leases created with a token's last use)."""
    decision.raise_for_denial()
    reads: list[VaultRead] = []
    expected: dict[str, tuple[str, ...]] | None = {}
    for name in dict.fromkeys(plan.secret_names):
        granted = decision.secrets.get(name)
        entry = policy.catalog.get(name)
        if granted is None or entry is None:
            raise InvalidRequestError(f"secret {name!r} is not covered by the decision")
        if isinstance(entry, DatabaseSecret):
            cap = granted.max_lease_ttl or limits.default_lease_ttl
            reads.append(
                VaultRead(name, "database", entry.mount, entry.role, granted.grant, lease_cap=cap)
            )
            if expected is not None:
                expected[name] = DATABASE_KEYS
            continue
        assert isinstance(entry, KvSecret)
        reads.append(
            VaultRead(
                name,
                "kv",
                entry.mount,
                entry.path,
                granted.grant,
                version=entry.version,
                keys=entry.keys,
            )
        )
        if expected is not None and entry.keys:
            expected[name] = tuple(entry.keys)
        else:
            expected = None
    caps = [read.lease_cap for read in reads if read.lease_cap is not None]
    if caps:
        ttl = min(max(max(caps), limits.min_dynamic_token_ttl), limits.max_dynamic_token_ttl)
    else:
        ttl = limits.kv_token_ttl
    task = plan.task
    token = ChildToken(
        policies=tuple(decision.grant_policies),
        ttl_seconds=ttl,
        num_uses=len(reads) + 1 if caps else 0,
        token_type="service" if caps else "batch",
        metadata={
            "dag_id": task.dag_id,
            "task_id": task.task_id,
            "run_id": task.run_id,
            "try_number": str(task.try_number),
            "map_index": str(task.map_index),
            "launch_id": plan.launch_id,
        },
        display_name=f"launch-{plan.launch_id}"[:100],
    )
    teams = teams_of([read.grant for read in reads])
    secrets = SecretsPlan(teams, tuple(reads), token, expected)
    return dataclasses.replace(plan, secrets=secrets)
