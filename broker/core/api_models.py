"""Request and response bodies of the broker's HTTP API (/v1). Shared with the Airflow
hook, which builds requests and reads responses without importing any broker adapter."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from broker.core.models import ENV_VAR_PATTERN, SecretRequest, Strict, TaskIdentity


class ResourceRequirements(Strict):
    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)


class ContainerSpec(Strict):
    """The task container. Non-secret env only; secrets come through ``secrets``."""

    image: Annotated[str, Field(min_length=1, max_length=500)]
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    env: dict[Annotated[str, Field(pattern=ENV_VAR_PATTERN)], str] = Field(default_factory=dict)
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    working_dir: str | None = None


class Toleration(Strict):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Scheduling(Strict):
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


class LaunchRequest(Strict):
    """POST /v1/launches. ``pod_overrides`` exists only so that unsafe pod fields are
    rejected with a clear 422 instead of being silently dropped."""

    task: TaskIdentity
    container: ContainerSpec
    secrets: list[SecretRequest] = Field(default_factory=list)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    namespace: str | None = None
    service_account: str | None = None
    pod_template: str | None = None
    timeout_seconds: Annotated[int, Field(gt=0, le=7 * 24 * 3600)] = 3600
    pod_overrides: dict[str, Any] = Field(default_factory=dict)

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
