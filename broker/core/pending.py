"""Why a pod is pending, from its container states, its scheduling condition and its
recent Events (pure). The Airflow side shows the events and fails a task at once on a
``permanent`` diagnosis instead of waiting for its startup timeout."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Final

from broker.core.api_models import (
    MAX_EVENT_MESSAGE,
    MAX_EVENTS,
    PendingDiagnosis,
    PendingKind,
    PodEvent,
)
from broker.core.escaping import visible
from broker.core.objects import CONTAINER_NAME, PodInfo
from broker.core.plan import SECRET_NAME_PREFIX

# Waiting reasons of a container -> (kind, permanent). ErrImagePull is retried by the
# kubelet (a registry hiccup heals); once it backs off (ImagePullBackOff) it will not.
_WAITING: Final[dict[str, tuple[PendingKind, bool]]] = {
    "InvalidImageName": ("invalid_image", True),
    "ErrImagePull": ("image_pull_error", False),
    "ImagePullBackOff": ("image_pull_error", True),
    "ErrImageNeverPull": ("image_pull_error", True),
    "CreateContainerConfigError": ("config_error", True),
}
_OLDEST: Final = dt.datetime.min.replace(tzinfo=dt.UTC)


def _cut(text: str | None, limit: int) -> str:
    shown = visible(text or "")
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def pod_event(
    *,
    type: str | None,
    reason: str | None,
    message: str | None,
    count: int | None,
    last_seen: dt.datetime | None,
) -> PodEvent:
    """An Event as the API shows it: text cut to bounds, control characters visible."""
    return PodEvent(
        type=_cut(type or "Normal", 32),
        reason=_cut(reason or "", 128),
        message=_cut(message, MAX_EVENT_MESSAGE),
        count=max(count or 1, 1),
        last_seen=last_seen,
    )


def recent_events(events: Sequence[PodEvent], limit: int = MAX_EVENTS) -> list[PodEvent]:
    """The ``limit`` most recent events, newest first."""
    return sorted(events, key=lambda e: e.last_seen or _OLDEST, reverse=True)[:limit]


def _awaits_broker_secret(message: str | None) -> bool:
    """The pod's own Secret is created right after the pod: until then the kubelet
    says ``secret "podbroker-..." not found``, which heals by itself."""
    return bool(message) and f'"{SECRET_NAME_PREFIX}' in (message or "")


def diagnose_pending(pod: PodInfo, events: Sequence[PodEvent]) -> PendingDiagnosis | None:
    """What keeps a Pending pod from running, or None when nothing is wrong (yet).
    Container states come first (the task container before sidecars), then the
    scheduler's condition, then FailedScheduling events of a pod without a node."""
    if pod.phase not in (None, "Pending") or pod.deleting:
        return None
    containers = sorted(pod.containers, key=lambda c: c.name != CONTAINER_NAME)
    for container in containers:
        if container.state != "waiting" or container.reason not in _WAITING:
            continue
        kind, permanent = _WAITING[container.reason]
        if kind == "config_error" and _awaits_broker_secret(container.message):
            permanent = False
        return PendingDiagnosis(
            kind=kind,
            permanent=permanent,
            reason=container.reason,
            message=_cut(container.message, MAX_EVENT_MESSAGE),
        )
    if pod.scheduled:
        return None
    if pod.unschedulable is not None:
        return PendingDiagnosis(
            kind="unschedulable",
            permanent=False,
            reason="Unschedulable",
            message=_cut(pod.unschedulable, MAX_EVENT_MESSAGE),
        )
    for event in recent_events(events):
        if event.reason == "FailedScheduling":
            return PendingDiagnosis(
                kind="unschedulable", permanent=False, reason=event.reason, message=event.message
            )
    return None
