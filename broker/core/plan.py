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
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker.core import podmeta
from broker.core.api_models import (
    Affinity,
    DnsLabel,
    DnsName,
    LaunchRequest,
    NodeSelectorTerm,
    PodSecurity,
    Toleration,
    TopologySpreadConstraint,
    Volume,
    VolumeMount,
)
from broker.core.models import (
    ENV_VAR_PATTERN,
    PRINTABLE_PATTERN,
    EnvDelivery,
    FileDelivery,
    SecretRequest,
    TaskIdentity,
)
from broker.core.objects import CONTAINER_NAME
from broker.core.policy import DatabaseSecret, Decision, KvSecret, PolicySet
from broker.core.quantity import parse_quantity
from broker.core.secret_value import SecretValue
from broker.errors import InvalidRequestError

SECRET_NAME_PREFIX = "podbroker-"
SECRETS_VOLUME = "podbroker-secrets"

# Fields of a pod spec a caller might try to sneak in, and why each is refused.
_FORBIDDEN_OVERRIDES: Mapping[str, str] = {
    "volumes": "use the volumes and volume_mounts fields",
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


class SidecarSpec(BaseModel):
    """A native sidecar (an init container with ``restartPolicy: Always``) that only a
    platform template can define: hardened like the task container, no Secret refs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: DnsLabel
    image: Annotated[str, Field(min_length=1, max_length=500, pattern=PRINTABLE_PATTERN)]
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    env: dict[Annotated[str, Field(pattern=ENV_VAR_PATTERN)], str] = Field(default_factory=dict)
    resources: dict[Literal["requests", "limits"], dict[str, str]] = Field(default_factory=dict)
    volume_mounts: list[VolumeMount] = Field(default_factory=list)


class PodTemplate(BaseModel):
    """A platform-defined template a request may name (``pod_template``). It binds:
    ``resources`` are defaults and ceilings (a request may ask less, never more);
    ``service_account``, ``node_selector``, ``tolerations``, ``runtime_class_name``,
    ``priority_class_name``, ``affinity``, ``topology_spread_constraints`` and
    ``security_context`` are fixed when set (a request may repeat them, not change
    them); ``volumes`` and ``image_pull_secrets`` are added to every pod;
    ``persistent_volume_claims`` / ``config_maps`` (globs) widen what a request may
    mount; ``sidecars`` run beside the task container."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    node_selector: dict[str, str] | None = None
    tolerations: list[Toleration] | None = None
    resources: dict[Literal["requests", "limits"], dict[str, str]] = Field(default_factory=dict)
    service_account: str | None = None
    priority_class_name: str | None = None
    runtime_class_name: str | None = None
    affinity: Affinity | None = None
    topology_spread_constraints: list[TopologySpreadConstraint] | None = None
    security_context: PodSecurity | None = None
    image_pull_secrets: list[DnsName] = Field(default_factory=list)
    volumes: list[Volume] = Field(default_factory=list)
    persistent_volume_claims: list[str] = Field(default_factory=list)
    config_maps: list[str] = Field(default_factory=list)
    sidecars: list[SidecarSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _valid(self) -> PodTemplate:
        for section, values in self.resources.items():
            for key, text in values.items():
                try:
                    parse_quantity(text)
                except ValueError as exc:
                    raise ValueError(f"resources.{section}.{key}: {exc}") from None
        names = [v.name for v in self.volumes]
        if len(set(names)) != len(names) or any(n.startswith(SECRET_NAME_PREFIX) for n in names):
            raise ValueError("volume names must be unique and not start with 'podbroker-'")
        sidecars = [c.name for c in self.sidecars]
        if len(set(sidecars)) != len(sidecars) or CONTAINER_NAME in sidecars:
            raise ValueError(f"sidecar names must be unique and not {CONTAINER_NAME!r}")
        return self


class NamespaceRules(BaseModel):
    """What requests may name in one task namespace (globs, fnmatch, case-sensitive):
    claims, ConfigMaps, image pull Secrets, runtime and priority classes. Templates may
    widen the first two and fix the rest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    require_template: bool | None = None
    """Launches here must name a pod_template (None: ``kubernetes.require_template``)."""
    persistent_volume_claims: list[str] = Field(default_factory=list)
    config_maps: list[str] = Field(default_factory=list)
    image_pull_secrets: list[str] = Field(default_factory=list)
    runtime_classes: list[str] = Field(default_factory=list)
    priority_classes: list[str] = Field(default_factory=list)


@dataclass(frozen=True)
class PlanPolicy:
    """The settings that bound what a request may ask for."""

    namespaces: Sequence[str]
    allowed_service_accounts: Sequence[str] = ("default",)
    templates: Mapping[str, PodTemplate] = field(default_factory=dict)
    run_as_non_root: bool = False
    require_template: bool = False
    namespace_rules: Mapping[str, NamespaceRules] = field(default_factory=dict)
    allowed_labels: Sequence[str] = ()
    """Globs over the label keys a request may set (reserved keys never pass)."""
    allowed_annotations: Sequence[str] = ()
    """Globs over the annotation keys a request may set (confinement ones never pass)."""

    def rules_for(self, namespace: str) -> NamespaceRules:
        return self.namespace_rules.get(namespace) or NamespaceRules()


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
    deliveries, template, scheduling, ...). Fields added later are left out while unset,
    so a launch made before them still reattaches after an upgrade."""
    unset_later = (
        {"termination_grace_period_seconds"}
        if request.termination_grace_period_seconds is None
        else None
    )
    return hashlib.sha256(request.model_dump_json(exclude=unset_later).encode()).hexdigest()


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


_DATA_KEY_INDEX = re.compile(r"^s(\d+)\.")


def secret_data_key(index: int, key: str) -> str:
    """The launch Secret's data key of ``key`` of the ``index``-th requested secret."""
    return f"s{index}.{re.sub(r'[^A-Za-z0-9._-]', '_', key)}"


def values_by_secret(
    data: Mapping[str, SecretValue], secret_names: Sequence[str]
) -> dict[str, list[SecretValue]]:
    """A launch Secret's data grouped by the secret each value was issued for (the
    inverse of :func:`secret_data_key`; "?" for a key of no known secret)."""
    values: dict[str, list[SecretValue]] = {}
    for key, value in data.items():
        match = _DATA_KEY_INDEX.match(key)
        index = int(match.group(1)) if match else -1
        name = secret_names[index] if 0 <= index < len(secret_names) else "?"
        values.setdefault(name, []).append(value)
    return values


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
                data_key = secret_data_key(index, key)
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
            pod["spec"].setdefault("volumes", []).append(
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
            )
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
            container.setdefault("volumeMounts", []).extend(mounts)
        return pod


def _merge(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    merged = dict(base)
    merged.update(extra)
    return merged


# Annotations that change a container's confinement (the API server turns the AppArmor
# one into securityContext.appArmorProfile), and placement onto control-plane nodes.
_UNSAFE_ANNOTATION_PARTS = ("apparmor", "seccomp")
_CONTROL_PLANE_PREFIX = "node-role.kubernetes.io/"
# Where a mount could reach the node's or the API's credentials.
_RESERVED_MOUNT_PATHS = ("/var/run/secrets", "/run/secrets")


def _allow_volume_source(kind: str, name: str, allowed: list[str], namespace: str) -> None:
    if not _matches_any(name, allowed):
        raise InvalidRequestError(
            f"volumes: {kind} {name!r} is not allowed in namespace {namespace!r} "
            "(kubernetes.namespace_rules or the pod template)"
        )


def _matches_any(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatchcase(name, glob) for glob in globs)


def _check_metadata_keys(request: LaunchRequest, policy: PlanPolicy) -> None:
    """Request labels and annotations pass the settings' allow-lists; reserved and
    confinement keys never pass, whatever the allow-list says."""
    for key in request.scheduling.labels:
        if podmeta.is_reserved(key):
            raise InvalidRequestError(f"label {key!r} is reserved for the broker")
        if not _matches_any(key, policy.allowed_labels):
            raise InvalidRequestError(
                f"scheduling.labels: {key!r} is not allowed (kubernetes.allowed_labels)"
            )
    for key in request.scheduling.annotations:
        if podmeta.is_reserved(key):
            raise InvalidRequestError(f"annotation {key!r} is reserved for the broker")
        if any(part in key.lower() for part in _UNSAFE_ANNOTATION_PARTS):
            raise InvalidRequestError(
                f"annotation {key!r} would change the container's confinement; the broker "
                "sets seccomp (and AppArmor comes from the node's runtime default)"
            )
        if not _matches_any(key, policy.allowed_annotations):
            raise InvalidRequestError(
                f"scheduling.annotations: {key!r} is not allowed (kubernetes.allowed_annotations)"
            )


def _check_placement(request: LaunchRequest) -> None:
    scheduling = request.scheduling
    for key in scheduling.node_selector:
        if key.startswith(_CONTROL_PLANE_PREFIX):
            raise InvalidRequestError(
                f"node_selector {key!r}: task pods never run on control-plane nodes"
            )
    for toleration in scheduling.tolerations:
        if not toleration.key:
            raise InvalidRequestError(
                "a toleration without a key tolerates every taint; name the taint"
            )
        if toleration.key.startswith(_CONTROL_PLANE_PREFIX):
            raise InvalidRequestError(
                f"toleration {toleration.key!r}: task pods never run on control-plane nodes"
            )
    node = scheduling.affinity.node_affinity if scheduling.affinity else None
    if node is None:
        return
    required = node.required_during_scheduling_ignored_during_execution
    terms: list[NodeSelectorTerm] = [
        *(required.node_selector_terms if required else []),
        *(p.preference for p in node.preferred_during_scheduling_ignored_during_execution),
    ]
    for term in terms:
        for expression in term.match_expressions:
            attracted = expression.operator in ("In", "Exists")
            if attracted and expression.key.startswith(_CONTROL_PLANE_PREFIX):
                raise InvalidRequestError(
                    f"scheduling.affinity {expression.key!r}: task pods never run on "
                    "control-plane nodes"
                )


def _fixed(field_name: str, fixed: object, asked: object, *, unset: object = None) -> None:
    """A template's fixed value: the request may leave it out or repeat it."""
    if fixed is not None and asked != unset and asked != fixed:
        raise InvalidRequestError(
            f"{field_name} is fixed by the pod template; the request may not change it"
        )


def _resources(request: LaunchRequest, template: PodTemplate) -> dict[str, dict[str, str]]:
    """The template's resources are defaults and ceilings: a request may ask less,
    never more (a request also never exceeds the template's limit of the same kind)."""
    asked = {
        "requests": request.container.resources.requests,
        "limits": request.container.resources.limits,
    }
    limits = template.resources.get("limits", {})
    ceilings = {
        "requests": {**limits, **template.resources.get("requests", {})},
        "limits": limits,
    }
    for section, values in asked.items():
        for key, text in values.items():
            try:
                value = parse_quantity(text)
            except ValueError as exc:
                raise InvalidRequestError(f"container.resources.{section}.{key}: {exc}") from None
            ceiling = ceilings[section].get(key)
            if ceiling is not None and value > parse_quantity(ceiling):
                raise InvalidRequestError(
                    f"container.resources.{section}.{key}: {text} is over the pod "
                    f"template's ceiling {ceiling}"
                )
    return {
        "requests": _merge(template.resources.get("requests", {}), asked["requests"]),
        "limits": _merge(limits, asked["limits"]),
    }


def _volumes(
    request: LaunchRequest,
    template: PodTemplate,
    rules: NamespaceRules,
    namespace: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's non-secret volumes (template's, then the request's) and the task
    container's mounts. Claims and ConfigMaps must be allowed for the namespace or by
    the template; mounts may not cover the secret files or the token paths."""
    names = {v.name for v in template.volumes}
    for volume in request.volumes:
        if volume.name in names or volume.name.startswith(SECRET_NAME_PREFIX):
            raise InvalidRequestError(
                f"volumes: {volume.name!r} is used twice or reserved for the broker"
            )
        names.add(volume.name)
        claim = volume.persistent_volume_claim
        if claim is not None:
            _allow_volume_source(
                "persistent volume claim",
                claim.claim_name,
                [*rules.persistent_volume_claims, *template.persistent_volume_claims],
                namespace,
            )
        if volume.config_map is not None:
            _allow_volume_source(
                "ConfigMap",
                volume.config_map.name,
                [*rules.config_maps, *template.config_maps],
                namespace,
            )
    secret_dirs = [
        s.delivery.mount_path.rstrip("/") or "/"
        for s in request.secrets
        if isinstance(s.delivery, FileDelivery)
    ]
    mounts: list[dict[str, Any]] = []
    paths: set[str] = set()
    for mount in request.volume_mounts:
        if mount.name not in names:
            raise InvalidRequestError(f"volume_mounts: no volume named {mount.name!r}")
        path = mount.mount_path.rstrip("/") or "/"
        if path in paths:
            raise InvalidRequestError(f"volume_mounts: {path!r} is mounted twice")
        paths.add(path)
        for reserved in [*_RESERVED_MOUNT_PATHS, *secret_dirs]:
            if _overlaps(path, reserved):
                raise InvalidRequestError(
                    f"volume_mounts: {path!r} would cover or sit inside {reserved!r}, "
                    "where the broker mounts secrets"
                )
        mounts.append(mount.manifest())
    volumes = [v.manifest() for v in (*template.volumes, *request.volumes)]
    return volumes, mounts


def _overlaps(path: str, other: str) -> bool:
    """Is one of two absolute paths the other or inside it."""
    a, b = path.rstrip("/") + "/", other.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _hardened_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": False,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _sidecar(spec: SidecarSpec) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": spec.name,
        "image": spec.image,
        "restartPolicy": "Always",  # a native sidecar: it ends when the task container ends
        "env": [{"name": k, "value": v} for k, v in spec.env.items()],
        "resources": {k: dict(v) for k, v in spec.resources.items() if v},
        "securityContext": _hardened_security(),
    }
    if spec.command:
        container["command"] = list(spec.command)
    if spec.args:
        container["args"] = list(spec.args)
    if spec.volume_mounts:
        container["volumeMounts"] = [m.manifest() for m in spec.volume_mounts]
    return container


def _pod_security(
    request: LaunchRequest, template: PodTemplate, policy: PlanPolicy
) -> dict[str, Any]:
    _fixed(
        "security_context",
        template.security_context,
        request.security_context,
    )
    chosen = template.security_context or request.security_context or PodSecurity()
    security: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}, **chosen.manifest()}
    if policy.run_as_non_root:
        if chosen.run_as_non_root is False:
            raise InvalidRequestError("security_context.run_as_non_root: the broker requires true")
        if chosen.run_as_user == 0:
            raise InvalidRequestError(
                "security_context.run_as_user: 0 is root, and the broker requires run_as_non_root"
            )
        security["runAsNonRoot"] = True
    return security


def _template_for(request: LaunchRequest, policy: PlanPolicy, namespace: str) -> PodTemplate:
    rules = policy.rules_for(namespace)
    required = rules.require_template
    if required is None:
        required = policy.require_template
    if request.pod_template is None:
        if required:
            raise InvalidRequestError(
                f"pod_template: namespace {namespace!r} requires one "
                f"(defined: {', '.join(sorted(policy.templates)) or 'none'})"
            )
        return PodTemplate()
    if request.pod_template not in policy.templates:
        raise InvalidRequestError(
            f"unknown pod_template {request.pod_template!r} "
            f"(defined: {', '.join(sorted(policy.templates)) or 'none'})"
        )
    return policy.templates[request.pod_template]


def _scheduling(
    request: LaunchRequest, template: PodTemplate, rules: NamespaceRules, namespace: str
) -> dict[str, Any]:
    """The pod's placement: the template's fixed values, else the request's, each
    request-chosen class and pull Secret checked against the namespace's rules."""
    asked = request.scheduling
    _fixed("scheduling.node_selector", template.node_selector, asked.node_selector, unset={})
    _fixed(
        "scheduling.tolerations",
        template.tolerations,
        list(asked.tolerations),
        unset=[],
    )
    _fixed("scheduling.runtime_class_name", template.runtime_class_name, asked.runtime_class_name)
    _fixed(
        "scheduling.priority_class_name", template.priority_class_name, asked.priority_class_name
    )
    _fixed("scheduling.affinity", template.affinity, asked.affinity)
    _fixed(
        "scheduling.topology_spread_constraints",
        template.topology_spread_constraints,
        list(asked.topology_spread_constraints),
        unset=[],
    )
    for value, allowed, what in (
        (asked.runtime_class_name, rules.runtime_classes, "runtime_class_name"),
        (asked.priority_class_name, rules.priority_classes, "priority_class_name"),
    ):
        fixed_by_template = getattr(template, what) is not None
        if value is not None and not fixed_by_template and not _matches_any(value, allowed):
            raise InvalidRequestError(
                f"scheduling.{what}: {value!r} is not allowed in namespace {namespace!r} "
                "(kubernetes.namespace_rules)"
            )
    for name in request.image_pull_secrets:
        if name not in template.image_pull_secrets and not _matches_any(
            name, rules.image_pull_secrets
        ):
            raise InvalidRequestError(
                f"image_pull_secrets: {name!r} is not allowed in namespace {namespace!r} "
                "(kubernetes.namespace_rules or the pod template)"
            )
    node_selector = (
        template.node_selector if template.node_selector is not None else asked.node_selector
    )
    tolerations = template.tolerations if template.tolerations is not None else asked.tolerations
    spec: dict[str, Any] = {
        "nodeSelector": dict(node_selector),
        "tolerations": [t.model_dump(exclude_none=True, mode="json") for t in tolerations],
    }
    for toleration in spec["tolerations"]:
        if "toleration_seconds" in toleration:
            toleration["tolerationSeconds"] = toleration.pop("toleration_seconds")
    affinity = template.affinity or asked.affinity
    if affinity is not None:
        spec["affinity"] = affinity.manifest()
    spread = template.topology_spread_constraints or asked.topology_spread_constraints
    if spread:
        spec["topologySpreadConstraints"] = [c.manifest() for c in spread]
    runtime_class = template.runtime_class_name or asked.runtime_class_name
    if runtime_class:
        spec["runtimeClassName"] = runtime_class
    priority_class = template.priority_class_name or asked.priority_class_name
    if priority_class:
        spec["priorityClassName"] = priority_class
    pull_secrets = list(dict.fromkeys([*template.image_pull_secrets, *request.image_pull_secrets]))
    if pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in pull_secrets]
    return spec


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
    template = _template_for(request, policy, namespace)
    rules = policy.rules_for(namespace)
    _fixed("service_account", template.service_account, request.service_account)
    service_account = template.service_account or request.service_account or "default"
    if service_account not in policy.allowed_service_accounts:
        raise InvalidRequestError(
            f"service_account {service_account!r} is not allowed for task pods "
            f"(allowed: {', '.join(policy.allowed_service_accounts)})"
        )
    names = [s.name for s in request.secrets]
    duplicates = sorted(name for name, n in Counter(names).items() if n > 1)
    if duplicates:
        raise InvalidRequestError(f"secrets requested more than once: {', '.join(duplicates)}")
    _check_metadata_keys(request, policy)
    _check_placement(request)
    placement = _scheduling(request, template, rules, namespace)
    volumes, mounts = _volumes(request, template, rules, namespace)
    resources = _resources(request, template)
    pod_security = _pod_security(request, template, policy)

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
        podmeta.pod_annotations(
            names,
            caller_identity,
            task,
            request_digest(request),
            grace_seconds=request.termination_grace_period_seconds,
        )
    )
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": request.container.image,
        "env": [{"name": k, "value": v} for k, v in request.container.env.items()],
        "resources": {k: v for k, v in resources.items() if v},
        "securityContext": _hardened_security(),
    }
    if request.container.command:
        container["command"] = list(request.container.command)
    if request.container.args:
        container["args"] = list(request.container.args)
    if request.container.working_dir:
        container["workingDir"] = request.container.working_dir
    if request.container.image_pull_policy:
        container["imagePullPolicy"] = request.container.image_pull_policy
    if mounts:
        container["volumeMounts"] = mounts
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "activeDeadlineSeconds": request.timeout_seconds,
        "securityContext": pod_security,
        "containers": [container],
        **placement,
    }
    if request.termination_grace_period_seconds is not None:
        spec["terminationGracePeriodSeconds"] = request.termination_grace_period_seconds
    if template.sidecars:
        spec["initContainers"] = [_sidecar(sidecar) for sidecar in template.sidecars]
    if volumes:
        spec["volumes"] = volumes
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
