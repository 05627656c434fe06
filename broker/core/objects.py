"""The cluster objects the broker reasons about, as its own small dataclasses. The
Kubernetes adapter builds these from API responses; nothing above it sees a
``kubernetes.client`` object. Secrets appear as metadata only: values never travel."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast

from broker.core import podmeta
from broker.core.api_models import ContainerState, LaunchView, Phase
from broker.core.models import TaskIdentity
from broker.core.termination import result_check
from broker.errors import BrokerUnavailableError

CONTAINER_NAME = "base"  # the KubernetesPodOperator's name for the task container
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
ContainerStateName = Literal["running", "waiting", "terminated", "unknown"]


def _age_seconds(created_at: dt.datetime | None, now: dt.datetime) -> float:
    return (now - created_at).total_seconds() if created_at else 0.0


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class ReviewedToken:
    """What TokenReview says of a caller's token."""

    username: str
    pod_name: str | None = None
    pod_uid: str | None = None


@dataclass(frozen=True)
class ContainerStatus:
    name: str
    state: ContainerStateName
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class PodInfo:
    """A broker pod as last read from the API server."""

    namespace: str
    name: str
    uid: str = ""
    resource_version: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    phase: str | None = None
    reason: str | None = None
    containers: tuple[ContainerStatus, ...] = ()
    created_at: dt.datetime | None = None
    deleting: bool = False
    active_deadline_seconds: int | None = None
    scheduled: bool = False
    """The pod's PodScheduled condition is True (it has a node)."""
    unschedulable: str | None = None
    """The scheduler's message while PodScheduled is False with reason Unschedulable."""

    @property
    def launch_id(self) -> str | None:
        return self.labels.get(podmeta.LAUNCH_ID_LABEL)

    @property
    def task(self) -> TaskIdentity:
        return podmeta.task_of(self.labels, self.annotations)

    @property
    def secret_names(self) -> list[str]:
        return podmeta.secret_names_of(self.annotations)

    @property
    def kill_grace_seconds(self) -> int:
        """The grace period the broker deletes this pod with (see podmeta)."""
        return podmeta.grace_seconds_of(self.annotations)

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED_PHASES

    @property
    def claimed(self) -> bool:
        return podmeta.is_claimed(self.annotations)

    @property
    def cleaned_at(self) -> dt.datetime | None:
        return podmeta.cleaned_at(self.annotations)

    @property
    def ref(self) -> PodRef:
        return PodRef(self.namespace, self.name, self.uid)

    def age_seconds(self, now: dt.datetime) -> float:
        return _age_seconds(self.created_at, now)


@dataclass(frozen=True)
class SecretMeta:
    """A broker Secret's metadata (never its data)."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    created_at: dt.datetime | None = None

    @property
    def launch_id(self) -> str | None:
        return self.labels.get(podmeta.LAUNCH_ID_LABEL)

    @property
    def holdings(self) -> podmeta.VaultHoldings:
        return podmeta.holdings_of(self.annotations)

    def age_seconds(self, now: dt.datetime) -> float:
        return _age_seconds(self.created_at, now)


@dataclass(frozen=True)
class HeldByLaunch:
    """A launch that still holds something in Vault (from the holdings ledger)."""

    launch_id: str
    namespace: str
    holdings: podmeta.VaultHoldings
    created_at: dt.datetime

    def age_seconds(self, now: dt.datetime) -> float:
        return (now - self.created_at).total_seconds()


class LaunchInProgressError(BrokerUnavailableError):
    """Another attempt of the same task try holds the launch's ledger row (between its
    intent and its pod, or dead there and awaiting the sweep). On the wire a 503 like
    its base; the launcher first waits for that attempt's pod to reattach to it."""


def launch_view(pod: PodInfo, *, created: bool = True) -> LaunchView:
    """What the API tells about a launch: phase, container states, exit code. A
    terminated container's message (its termination message: what the task wrote) of a
    launch with secrets is shown only once the leak guard found it clean
    (broker.core.termination)."""
    states: list[ContainerState] = []
    exit_code: int | None = None
    reason = pod.reason
    check = result_check(pod.secret_names, pod.claimed, podmeta.result_check_of(pod.annotations))
    for item in pod.containers:
        hidden = item.state == "terminated" and check not in (None, "clean")
        states.append(
            ContainerState(
                name=item.name,
                state=item.state,
                exit_code=item.exit_code,
                reason=item.reason,
                message=None if hidden else item.message,
            )
        )
        if item.state == "terminated" and item.name == CONTAINER_NAME:
            exit_code = item.exit_code
            reason = reason or item.reason
    phase = pod.phase or "Pending"
    if pod.deleting and phase in ("Pending", "Running"):
        phase = "Deleted"
    return LaunchView(
        launch_id=pod.launch_id or "",
        task=pod.task,
        namespace=pod.namespace,
        pod_name=pod.name,
        phase=cast(Phase, phase),
        containers=states,
        exit_code=exit_code,
        reason=reason,
        secret_names=pod.secret_names,
        created=created,
        result_check=check,
    )
