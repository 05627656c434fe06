"""Request and response bodies of the broker's HTTP API (/v1). Shared with the Airflow
hook, which builds requests and reads responses without importing any broker adapter."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AliasChoices,
    AliasGenerator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from broker.core.models import (
    AIRFLOW_KEY_PATTERN,
    ENV_VAR_PATTERN,
    NO_LAX_INTEGER,
    NO_NUL_PATTERN,
    PRINTABLE_PATTERN,
    SecretRequest,
    Strict,
    TaskIdentity,
    Timestamp,
)

# Upper bounds of one launch request (README "Limits"). Each is far above what a task
# needs and keeps one request's work, pod and audit record small; a request over one is
# refused with 422 naming the field.
MAX_SECRETS = 64
MAX_ENV_VARS = 256
MAX_ARGS = 256  # items of ``command`` and of ``args`` each
MAX_ARG_LENGTH = 16 * 1024
MAX_ENV_VALUE_LENGTH = 32 * 1024
MAX_LABELS = 64  # labels, node_selector entries
MAX_ANNOTATIONS = 64
MAX_ANNOTATION_VALUE_LENGTH = 16 * 1024
MAX_TOLERATIONS = 32
MAX_RESOURCES = 16  # entries of ``requests`` and of ``limits`` each
MAX_OVERRIDES = 32
# A Kubernetes qualified name: an optional DNS-subdomain prefix (253) and "/" and a name (63).
MAX_KEY_LENGTH = 317
MAX_LABEL_VALUE_LENGTH = 63
MAX_VOLUMES = 16
MAX_VOLUME_MOUNTS = 32
MAX_PULL_SECRETS = 8
MAX_TERMS = 8  # affinity terms, topology spread constraints
MAX_EXPRESSIONS = 16  # match expressions / labels in one selector or term
MAX_VALUES = 32  # values of one match expression
MAX_EVENTS = 10  # pod events in a LaunchView, most recent first
MAX_EVENT_MESSAGE = 500
MAX_GRACE_SECONDS = 3600
"""Longest termination grace period a request may ask for: a stopped task never keeps
running, its values in memory, for more than an hour after the broker stopped it."""
# Kubernetes object names: a DNS label (volumes, containers) or a DNS subdomain.
DNS_LABEL_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$"
# An absolute path without "..", "." or empty segments (checked again by _clean_path).
MOUNT_PATH_PATTERN = r"^(/[A-Za-z0-9_][A-Za-z0-9._-]*)+/?$|^/$"
RELATIVE_PATH_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$"

Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY_LENGTH, pattern=PRINTABLE_PATTERN)]
LabelValue = Annotated[str, Field(max_length=MAX_LABEL_VALUE_LENGTH, pattern=PRINTABLE_PATTERN)]
ShortText = Annotated[str, Field(max_length=253, pattern=PRINTABLE_PATTERN)]
Quantity = Annotated[str, Field(min_length=1, max_length=64, pattern=PRINTABLE_PATTERN)]
Arg = Annotated[str, Field(max_length=MAX_ARG_LENGTH, pattern=NO_NUL_PATTERN)]
DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
DnsName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
MountPath = Annotated[str, Field(min_length=1, max_length=1024, pattern=MOUNT_PATH_PATTERN)]
RelativePath = Annotated[str, Field(min_length=1, max_length=1024, pattern=RELATIVE_PATH_PATTERN)]
FileMode = Annotated[int, Field(ge=0, le=0o777), NO_LAX_INTEGER]
Weight = Annotated[int, Field(ge=1, le=100), NO_LAX_INTEGER]
LinuxId = Annotated[int, Field(ge=0, le=2**31 - 1), NO_LAX_INTEGER]


def _snake_or_camel(name: str) -> AliasChoices:
    return AliasChoices(name, to_camel(name))


class KubeShaped(Strict):
    """A Kubernetes object part: snake_case on the wire (as the Python client names
    fields; the Kubernetes camelCase spelling KubernetesPodOperator users pass is accepted
    too), camelCase in the manifest (``model_dump(by_alias=True)``)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=AliasGenerator(
            serialization_alias=to_camel, validation_alias=_snake_or_camel
        ),
    )

    def manifest(self) -> dict[str, Any]:
        """The Kubernetes (camelCase) form, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ResourceRequirements(Strict):
    requests: Annotated[dict[ShortText, Quantity], Field(max_length=MAX_RESOURCES)] = Field(
        default_factory=dict
    )
    limits: Annotated[dict[ShortText, Quantity], Field(max_length=MAX_RESOURCES)] = Field(
        default_factory=dict
    )


class ContainerSpec(Strict):
    """The task container. Non-secret env only; secrets come through ``secrets``."""

    image: Annotated[str, Field(min_length=1, max_length=500, pattern=PRINTABLE_PATTERN)]
    command: Annotated[list[Arg], Field(max_length=MAX_ARGS)] = Field(default_factory=list)
    args: Annotated[list[Arg], Field(max_length=MAX_ARGS)] = Field(default_factory=list)
    env: Annotated[
        dict[
            Annotated[str, Field(max_length=256, pattern=ENV_VAR_PATTERN)],
            Annotated[str, Field(max_length=MAX_ENV_VALUE_LENGTH, pattern=NO_NUL_PATTERN)],
        ],
        Field(max_length=MAX_ENV_VARS),
    ] = Field(default_factory=dict)
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    working_dir: Annotated[str, Field(max_length=1024, pattern=PRINTABLE_PATTERN)] | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None


class Toleration(Strict):
    key: Key | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    # A JSON integer (3 or 3.0), never a boolean or a string, like every other count.
    toleration_seconds: Annotated[int, Field(ge=0, le=10 * 365 * 86400), NO_LAX_INTEGER] | None = (
        None
    )


# -- volumes ---------------------------------------------------------------------------


class EmptyDirVolume(KubeShaped):
    medium: Literal["", "Memory"] = ""
    size_limit: Quantity | None = None


class KeyToPath(KubeShaped):
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
    path: RelativePath
    mode: FileMode | None = None


class ConfigMapVolume(KubeShaped):
    """A ConfigMap by name, allowed per namespace (settings) or by the pod template."""

    name: DnsName
    items: Annotated[list[KeyToPath], Field(max_length=64)] | None = None
    default_mode: FileMode | None = None
    optional: bool = False


class PersistentVolumeClaimVolume(KubeShaped):
    """An existing claim by name, allowed per namespace (settings) or by the template."""

    claim_name: DnsName
    read_only: bool = False


class StorageRequest(KubeShaped):
    requests: Annotated[dict[Literal["storage"], Quantity], Field(min_length=1)]


class EphemeralClaimSpec(KubeShaped):
    access_modes: Annotated[
        list[Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]],
        Field(min_length=1, max_length=4),
    ]
    resources: StorageRequest
    storage_class_name: DnsName | None = None
    volume_mode: Literal["Filesystem", "Block"] | None = None


class EphemeralClaimTemplate(KubeShaped):
    spec: EphemeralClaimSpec


class EphemeralVolume(KubeShaped):
    """A generic ephemeral volume: a claim made for the pod and deleted with it."""

    volume_claim_template: EphemeralClaimTemplate


# Volume kinds that are refused, and why (the caller sees the reason in the 422).
REFUSED_VOLUME_KINDS: dict[str, str] = {
    "secret": "Secrets reach a task only through its secrets list",
    "projected": "projected volumes could expose ServiceAccount tokens or Secrets",
    "host_path": "hostPath exposes the node's filesystem",
    "csi": "CSI volumes can read secrets (secrets-store drivers) or node resources",
    "service_account_token": "the API token is never mounted into task pods",
    "downward_api": "not supported (the broker sets the pod's metadata)",
    "nfs": "network volumes are not supported",
    "iscsi": "network volumes are not supported",
    "rbd": "network volumes are not supported",
    "flex_volume": "flexVolume drivers run with node privileges",
    "git_repo": "gitRepo is deprecated and runs git on the node",
}


VOLUME_SOURCES = ("empty_dir", "config_map", "persistent_volume_claim", "ephemeral")


class Volume(KubeShaped):
    """One pod volume: exactly one of ``empty_dir``, ``config_map``,
    ``persistent_volume_claim`` or ``ephemeral``."""

    # The schema says "exactly one" too (a source given as null is not given).
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": [source], "properties": {source: {"type": "object"}}}
                for source in VOLUME_SOURCES
            ]
        }
    )

    name: DnsLabel
    empty_dir: EmptyDirVolume | None = None
    config_map: ConfigMapVolume | None = None
    persistent_volume_claim: PersistentVolumeClaimVolume | None = None
    ephemeral: EphemeralVolume | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_kinds(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                kind = str(key)
                snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in kind)
                if snake in REFUSED_VOLUME_KINDS:
                    raise ValueError(f"{snake} volumes are refused: {REFUSED_VOLUME_KINDS[snake]}")
        return data

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        given = [
            s
            for s in (self.empty_dir, self.config_map, self.persistent_volume_claim, self.ephemeral)
            if s is not None
        ]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(VOLUME_SOURCES)}")
        return self


class VolumeMount(KubeShaped):
    name: DnsLabel
    mount_path: MountPath
    sub_path: RelativePath | None = None
    read_only: bool = False


# -- scheduling ------------------------------------------------------------------------


class LabelSelectorRequirement(KubeShaped):
    key: Key
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: Annotated[list[LabelValue], Field(max_length=MAX_VALUES)] = Field(default_factory=list)


class LabelSelector(KubeShaped):
    match_labels: Annotated[dict[Key, LabelValue], Field(max_length=MAX_EXPRESSIONS)] = Field(
        default_factory=dict
    )
    match_expressions: Annotated[
        list[LabelSelectorRequirement], Field(max_length=MAX_EXPRESSIONS)
    ] = Field(default_factory=list)


class NodeSelectorRequirement(KubeShaped):
    key: Key
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: Annotated[list[LabelValue], Field(max_length=MAX_VALUES)] = Field(default_factory=list)


class NodeSelectorTerm(KubeShaped):
    match_expressions: Annotated[
        list[NodeSelectorRequirement], Field(max_length=MAX_EXPRESSIONS)
    ] = Field(default_factory=list)
    match_fields: Annotated[list[NodeSelectorRequirement], Field(max_length=MAX_EXPRESSIONS)] = (
        Field(default_factory=list)
    )


class NodeSelector(KubeShaped):
    node_selector_terms: Annotated[
        list[NodeSelectorTerm], Field(min_length=1, max_length=MAX_TERMS)
    ]


class PreferredSchedulingTerm(KubeShaped):
    weight: Weight
    preference: NodeSelectorTerm


class NodeAffinity(KubeShaped):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    preferred_during_scheduling_ignored_during_execution: Annotated[
        list[PreferredSchedulingTerm], Field(max_length=MAX_TERMS)
    ] = Field(default_factory=list)


class PodAffinityTerm(KubeShaped):
    topology_key: Key
    label_selector: LabelSelector | None = None
    namespaces: Annotated[list[DnsLabel], Field(max_length=MAX_TERMS)] = Field(default_factory=list)


class WeightedPodAffinityTerm(KubeShaped):
    weight: Weight
    pod_affinity_term: PodAffinityTerm


class PodAffinity(KubeShaped):
    required_during_scheduling_ignored_during_execution: Annotated[
        list[PodAffinityTerm], Field(max_length=MAX_TERMS)
    ] = Field(default_factory=list)
    preferred_during_scheduling_ignored_during_execution: Annotated[
        list[WeightedPodAffinityTerm], Field(max_length=MAX_TERMS)
    ] = Field(default_factory=list)


class Affinity(KubeShaped):
    node_affinity: NodeAffinity | None = None
    pod_affinity: PodAffinity | None = None
    pod_anti_affinity: PodAffinity | None = None


class TopologySpreadConstraint(KubeShaped):
    max_skew: Annotated[int, Field(ge=1, le=1000), NO_LAX_INTEGER]
    topology_key: Key
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"]
    label_selector: LabelSelector | None = None
    min_domains: Annotated[int, Field(ge=1, le=1000), NO_LAX_INTEGER] | None = None
    match_label_keys: Annotated[list[Key], Field(max_length=MAX_EXPRESSIONS)] = Field(
        default_factory=list
    )


class PodSecurity(KubeShaped):
    """Numeric identities for the pod. ``run_as_non_root`` stays on when the broker's
    settings set it (``run_as_user: 0`` is then refused)."""

    run_as_user: LinuxId | None = None
    run_as_group: LinuxId | None = None
    fs_group: LinuxId | None = None
    run_as_non_root: bool | None = None


class Scheduling(Strict):
    labels: Annotated[dict[Key, LabelValue], Field(max_length=MAX_LABELS)] = Field(
        default_factory=dict
    )
    annotations: Annotated[
        dict[
            Key,
            Annotated[str, Field(max_length=MAX_ANNOTATION_VALUE_LENGTH, pattern=NO_NUL_PATTERN)],
        ],
        Field(max_length=MAX_ANNOTATIONS),
    ] = Field(default_factory=dict)
    node_selector: Annotated[dict[Key, LabelValue], Field(max_length=MAX_LABELS)] = Field(
        default_factory=dict
    )
    tolerations: Annotated[list[Toleration], Field(max_length=MAX_TOLERATIONS)] = Field(
        default_factory=list
    )
    affinity: Affinity | None = None
    topology_spread_constraints: Annotated[
        list[TopologySpreadConstraint], Field(max_length=MAX_TERMS)
    ] = Field(default_factory=list)
    runtime_class_name: DnsName | None = None
    """Allowed by ``kubernetes.namespace_rules.NS.runtime_classes`` unless a template fixes it."""
    priority_class_name: DnsName | None = None
    """Allowed by ``kubernetes.namespace_rules.NS.priority_classes`` unless a template fixes it."""


class LaunchRequest(Strict):
    """POST /v1/launches. ``pod_overrides`` exists only so that unsafe pod fields are
    rejected with a clear 422 instead of being silently dropped."""

    task: TaskIdentity
    container: ContainerSpec
    secrets: Annotated[list[SecretRequest], Field(max_length=MAX_SECRETS)] = Field(
        default_factory=list
    )
    scheduling: Scheduling = Field(default_factory=Scheduling)
    namespace: Annotated[str, Field(max_length=63, pattern=PRINTABLE_PATTERN)] | None = None
    service_account: ShortText | None = None
    pod_template: ShortText | None = None
    timeout_seconds: Annotated[int, Field(gt=0, le=7 * 24 * 3600), NO_LAX_INTEGER] = 3600
    pod_overrides: Annotated[dict[ShortText, Any], Field(max_length=MAX_OVERRIDES)] = Field(
        default_factory=dict
    )
    volumes: Annotated[list[Volume], Field(max_length=MAX_VOLUMES)] = Field(default_factory=list)
    volume_mounts: Annotated[list[VolumeMount], Field(max_length=MAX_VOLUME_MOUNTS)] = Field(
        default_factory=list
    )
    """Mounts into the task container of ``volumes`` or of the template's volumes."""
    image_pull_secrets: Annotated[list[DnsName], Field(max_length=MAX_PULL_SECRETS)] = Field(
        default_factory=list
    )
    """Names from ``kubernetes.namespace_rules.NS.image_pull_secrets`` or the template's."""
    security_context: PodSecurity | None = None
    termination_grace_period_seconds: (
        Annotated[int, Field(ge=0, le=MAX_GRACE_SECONDS), NO_LAX_INTEGER] | None
    ) = None
    """Seconds between SIGTERM and SIGKILL when the pod is stopped: the pod's
    ``terminationGracePeriodSeconds``, also used when the broker deletes the pod (a kill,
    a newer try, an ended task instance). None: the Kubernetes default (30 s) for the
    kubelet, and the broker's own deletions stop the pod at once."""

    @field_validator("secrets", mode="before")
    @classmethod
    def _names_as_requests(cls, value: Any) -> Any:
        """A bare name means "that secret, as env vars with default naming"."""
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value


Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Unknown", "Deleted"]


class ContainerState(Strict):
    name: str
    state: Literal["waiting", "running", "terminated", "unknown"]
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None


class PodEvent(Strict):
    """One Kubernetes Event about the launch's pod (its reason and message as the
    cluster wrote them, cut to a bounded length)."""

    type: Annotated[str, Field(max_length=32)]
    reason: Annotated[str, Field(max_length=128)]
    message: Annotated[str, Field(max_length=MAX_EVENT_MESSAGE)]
    count: int = 1
    last_seen: dt.datetime | None = None


ResultCheck = Literal["unchecked", "clean", "withheld"]
"""The termination-message leak guard's state for a launch with secrets (see
broker.core.termination)."""

PendingKind = Literal["unschedulable", "image_pull_error", "config_error", "invalid_image"]


class PendingDiagnosis(Strict):
    """Why a pending pod does not start. ``permanent``: it will not heal by waiting
    (fail the task now); otherwise keep waiting up to the startup timeout."""

    kind: PendingKind
    permanent: bool
    reason: Annotated[str, Field(max_length=128)]
    message: Annotated[str, Field(max_length=MAX_EVENT_MESSAGE)] = ""


class LaunchView(Strict):
    """GET /v1/launches/{id} and the body of a successful POST."""

    launch_id: str
    task: TaskIdentity
    namespace: str
    pod_name: str
    phase: Phase
    containers: list[ContainerState] = Field(default_factory=list)
    exit_code: int | None = None
    reason: str | None = None
    secret_names: list[str] = Field(default_factory=list)
    created: bool = True  # False when an identical earlier request is returned (idempotency)
    events: Annotated[list[PodEvent], Field(max_length=MAX_EVENTS)] = Field(default_factory=list)
    """While the pod is Pending: its most recent Events, newest first."""
    pending: PendingDiagnosis | None = None
    """While the pod is Pending and something is wrong: what, and whether it heals."""
    result_check: ResultCheck | None = None
    """Launches with secrets: ``unchecked`` until the ended pod's termination messages
    were compared with the values issued to it (terminated containers show no message
    until then), ``clean`` (messages shown) or ``withheld`` (a message held an issued
    value, or could no longer be checked: never shown). None: no secrets, nothing to
    check."""


class ErrorBody(Strict):
    """Every 4xx/5xx body."""

    error: str  # machine code, e.g. "denied", "invalid_request", "unavailable"
    reason: str
    denied_secrets: list[str] = Field(default_factory=list)
    component: str | None = None
    retryable: bool = False


class PlannedRead(Strict):
    """One Vault read a launch would make with its child token (no value, ever)."""

    name: str
    kind: Literal["kv", "database"]
    path: str
    grant: str
    version: int | None = None
    keys: list[str] | None = None
    lease_cap_seconds: int | None = None


class PlannedToken(Strict):
    """The child token a launch would mint: its policies, TTL and uses."""

    policies: list[str]
    ttl_seconds: int
    num_uses: int


class PlannedDecision(Strict):
    allowed: bool
    matched_grants: list[str] = Field(default_factory=list)
    denied: list[str] = Field(default_factory=list)
    unknown: list[str] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)
    requires_verified_task: bool = False
    """Some grant needs the task confirmed with Airflow; a dry run does not ask Airflow."""


class LaunchDryRun(Strict):
    """POST /v1/launches?dry_run=true: what a launch would do and whether policy allows
    it. Nothing is created and nothing is read from Vault (no token is minted)."""

    dry_run: Literal[True] = True
    launch_id: str
    namespace: str
    pod_name: str
    secret_name: str
    decision: PlannedDecision
    pod: dict[str, Any]
    """The pod manifest as it would be created (env from Secrets by reference only)."""
    secret_keys_known: bool
    """False when a KV secret's keys are learnt only by reading it: the pod then shows
    no secret env vars or files yet."""
    vault_reads: list[PlannedRead] = Field(default_factory=list)
    token: PlannedToken | None = None


MAX_REPORT_QUERY_DAG_IDS: Final = 20_000
"""DAG ids one POST /v1/audit/report may name (the body limit bounds them too)."""
ReportFormat = Literal["json", "html", "csv", "table"]
ReportFilterText = Annotated[str | None, Field(max_length=250, pattern=PRINTABLE_PATTERN)]
ReportDagId = Annotated[str, Field(min_length=1, max_length=250, pattern=AIRFLOW_KEY_PATTERN)]


class ReportQuery(Strict):
    """The body of POST /v1/audit/report: GET's query as JSON, for a list of DAG ids too
    long for a URL (the Airflow page asks for every DAG its user may read: thousands,
    for an admin of a large deployment)."""

    format: ReportFormat = "json"
    since: Timestamp = None
    until: Timestamp = None
    team: ReportFilterText = None
    dag: ReportFilterText = None
    task: ReportFilterText = None
    secret: ReportFilterText = None
    dag_ids: list[ReportDagId] | None = Field(
        default=None,
        max_length=MAX_REPORT_QUERY_DAG_IDS,
        description="keep only these DAG ids (None: no such narrowing)",
    )
