"""Is this launch really for the task instance it names? (pure: no I/O)

A caller's token proves which worker is calling, not which task. The broker therefore
asks Airflow's REST API about the task instance a launch names and checks it here: the
id the operator sent, the try number, a state in which the task may launch, and, when
the caller's token is bound to a pod, that Airflow ran the task on that pod."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from broker.core.models import TaskIdentity

VerificationMode = Literal["off", "warn", "enforce"]
Verdict = Literal["skip", "warn", "enforce"]
LAUNCHABLE_STATES: tuple[str, ...] = ("running",)
"""A task's code runs (and launches its pod) only while Airflow has it running."""
LIVE_STATES: tuple[str, ...] = (
    "running",
    "queued",
    "scheduled",
    "deferred",
    "restarting",
    "up_for_reschedule",
)
"""States in which a task instance may still own a running pod (reconciler)."""


@dataclass(frozen=True)
class TaskInstanceRecord:
    """What Airflow's REST API says about one task instance."""

    id: str
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    try_number: int
    state: str | None
    hostname: str | None = None

    @property
    def instance_key(self) -> tuple[str, str, str, int]:
        return (self.dag_id, self.run_id, self.task_id, self.map_index)


@dataclass(frozen=True)
class TaskInstanceBatch:
    """What Airflow's REST API says about several task instances at once (the
    reconciler's question). ``complete`` is False when the answer was cut short (pages
    left unread within the budget, or the list changed while it was being paged): a
    launch whose record is absent from an incomplete batch is unknown, not ended."""

    records: tuple[TaskInstanceRecord, ...] = ()
    complete: bool = True


@dataclass(frozen=True)
class PodBinding:
    """The pod a caller's ServiceAccount token is bound to (TokenReview extras)."""

    pod_name: str
    pod_uid: str | None = None


def verdict(mode: VerificationMode, grant_requires: bool) -> Verdict:
    """How to treat a failed check: a grant with ``require_verified_task`` enforces
    whatever the broker's mode, so a platform can switch enforcement on per secret."""
    if mode == "enforce" or grant_requires:
        return "enforce"
    return "warn" if mode == "warn" else "skip"


def check_task_instance(
    claimed: TaskIdentity,
    record: TaskInstanceRecord | None,
    binding: PodBinding | None,
    launchable_states: Collection[str] = LAUNCHABLE_STATES,
) -> str | None:
    """The reason the launch is not for a running task instance, or None when it is."""
    where = f"dag {claimed.dag_id!r} run {claimed.run_id!r} task {claimed.task_id!r}" + (
        f" map_index {claimed.map_index}" if claimed.map_index >= 0 else ""
    )
    if record is None:
        return f"Airflow has no task instance {where}"
    if not claimed.ti_id:
        return "the launch names no task instance id (ti_id); update the operator"
    if record.id != claimed.ti_id:
        return f"task instance id does not match Airflow's for {where}"
    if record.try_number != claimed.try_number:
        return f"try {claimed.try_number} is not the current try ({record.try_number}) of {where}"
    if record.state not in launchable_states:
        return f"task instance {where} is {record.state or 'not started'}, not running"
    if binding is not None and record.hostname != binding.pod_name:
        return f"the caller's pod {binding.pod_name!r} is not the host Airflow runs {where} on"
    return None


def ended_reason(
    launched: TaskIdentity,
    record: TaskInstanceRecord | None,
    live_states: Collection[str] = LIVE_STATES,
) -> str | None:
    """Why a running launch no longer belongs to a live task instance, or None."""
    if record is None:
        return "its task instance no longer exists in Airflow"
    if record.try_number > launched.try_number:
        return f"superseded by try {record.try_number}"
    if record.state not in live_states:
        return f"its task instance is {record.state or 'reset'} in Airflow"
    return None
