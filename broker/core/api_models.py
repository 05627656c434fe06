"""Request and response bodies of the broker's HTTP API (/v1). Shared with the Airflow
hook, which builds requests and reads responses without importing any broker adapter."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from broker.core.models import (
    ENV_VAR_PATTERN,
    NO_LAX_INTEGER,
    NO_NUL_PATTERN,
    PRINTABLE_PATTERN,
    SecretRequest,
    Strict,
    TaskIdentity,
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

Key = Annotated[str, Field(min_length=1, max_length=MAX_KEY_LENGTH, pattern=PRINTABLE_PATTERN)]
LabelValue = Annotated[str, Field(max_length=MAX_LABEL_VALUE_LENGTH, pattern=PRINTABLE_PATTERN)]
ShortText = Annotated[str, Field(max_length=253, pattern=PRINTABLE_PATTERN)]
Quantity = Annotated[str, Field(min_length=1, max_length=64, pattern=PRINTABLE_PATTERN)]
Arg = Annotated[str, Field(max_length=MAX_ARG_LENGTH, pattern=NO_NUL_PATTERN)]


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


class Toleration(Strict):
    key: Key | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: Annotated[int, Field(strict=True, ge=0, le=10 * 365 * 86400)] | None = None


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


class ErrorBody(Strict):
    """Every 4xx/5xx body."""

    error: str  # machine code, e.g. "denied", "invalid_request", "unavailable"
    reason: str
    denied_secrets: list[str] = Field(default_factory=list)
    component: str | None = None
    retryable: bool = False
