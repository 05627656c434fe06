"""What happened to the secrets of one Airflow task try, computed from audit events
(pure: no I/O). Serves ``GET /v1/audit/launches`` and the Airflow task-instance view.

Definitions:

- A **task try** is (dag_id, run_id, task_id, map_index, try_number); without a
  try_number, every try of that task instance.
- Its **launches** are the launch ids of the events that name the task try; every event
  carrying one of those launch ids belongs to it (cleanup events may name no task).
- Per requested secret: the policy **decision** (granted by which grants, or denied),
  **delivered** (read from Vault and written into the pod's own Kubernetes Secret),
  **removed** (that Secret deleted) and, for dynamic secrets, **revoked** (the leases).
- **Exposure** is how long the values lived outside Vault: from delivery until the
  Secret was deleted (still running: open). Findings flag what deserves a look: a
  running launch still holding values, an ended one whose Secret was never deleted,
  leases never revoked or a failed revocation, values that outlived their pod, and
  orphans the reconciler had to clean up.

Only names leave this module: secret names, grant ids, object names, reasons. Lease ids,
token accessors and Vault paths stay in the audit trail.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict

from broker.core.audit_events import AuditEvent, EventKind

# Details a timeline entry may show: names, states and reasons, never holdings.
SHOWN_DETAILS: Final = (
    "allowed",
    "denied",
    "reasons",
    "namespace",
    "pod",
    "secret",
    "image",
    "phase",
    "exit_code",
    "reason",
    "by",
    "stage",
    "error",
    "revoked",
    "action",
    "object",
)
ENDINGS: Final = frozenset(
    {
        EventKind.POD_FINISHED,
        EventKind.LAUNCH_KILLED,
        EventKind.POD_DELETED,
        EventKind.LAUNCH_FAILED,
        EventKind.SECRET_DELETED,
    }
)
"""Events that say a launch is over (its values should be gone)."""
LONG_AFTER_POD_SECONDS: Final = 60.0
"""Values still in the cluster this long after their pod ended are a finding."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskTry(_Model):
    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    try_number: int | None = None
    """None: every try of the task instance."""

    def matches(self, event: AuditEvent) -> bool:
        return (
            event.dag_id == self.dag_id
            and event.run_id == self.run_id
            and event.task_id == self.task_id
            and (event.map_index if event.map_index is not None else -1) == self.map_index
            and (self.try_number is None or event.try_number == self.try_number)
        )


DetailValue = str | int | float | bool | None | list[str]


class TimelineEntry(_Model):
    time: datetime
    kind: EventKind
    secret_names: list[str] = []
    details: dict[str, DetailValue] = {}
    """Only the keys in SHOWN_DETAILS."""


class SecretFate(_Model):
    secret: str
    decision: Literal["granted", "denied", "undecided"]
    grants: list[str] = []
    """Grant ids (``team/grant``) that granted it."""
    dynamic: bool = False
    """Read with a lease (database credentials): revoking the lease ends them."""
    delivered: datetime | None = None
    removed: datetime | None = None
    """The pod's Kubernetes Secret holding the values deleted."""
    revoked: datetime | None = None
    """Its lease revoked (dynamic secrets only)."""
    exposure_seconds: float | None = None
    """Delivery to removal; None when never delivered or not removed yet."""


class LaunchTimeline(_Model):
    launch_id: str
    try_number: int | None
    caller: str | None
    image: str | None
    requested: datetime | None
    allowed: bool | None
    """The policy decision (None: none recorded)."""
    reasons: list[str]
    secrets: list[SecretFate]
    findings: list[str]
    """What deserves a look (a Secret never deleted, a failed revocation ...)."""
    events: list[TimelineEntry]


class TaskTryAudit(_Model):
    task: TaskTry
    launches: list[LaunchTimeline]
    """One page of the try's launches, oldest first."""
    next_cursor: str | None = None
    """Pass as ``cursor`` for the next page; None: this is the last page."""


def in_scope(dag_id: str, scope: Sequence[str] | None) -> bool:
    """Whether a reader with these DAG globs (None: every DAG) may see ``dag_id``."""
    return scope is None or any(fnmatchcase(dag_id, glob) for glob in scope)


def _shown(details: Mapping[str, object]) -> dict[str, DetailValue]:
    out: dict[str, DetailValue] = {}
    for key in SHOWN_DETAILS:
        value = details.get(key)
        if value is None:
            continue
        if isinstance(value, list):
            out[key] = [str(v) for v in value]
        elif isinstance(value, str | int | float | bool):
            out[key] = value
    return out


def _first(events: Iterable[AuditEvent], kind: EventKind) -> AuditEvent | None:
    return next((e for e in events if e.kind == kind), None)


def _grants_by_secret(decision: AuditEvent | None) -> dict[str, list[str]]:
    if decision is None:
        return {}
    matched = decision.details.get("matched_grants")
    if not isinstance(matched, Mapping):
        return {}
    return {str(k): [str(i) for i in v] for k, v in matched.items() if isinstance(v, list)}


def _resolved(events: Sequence[AuditEvent]) -> dict[str, tuple[datetime, bool]]:
    """secret -> (when read from Vault, whether with a lease)."""
    out: dict[str, tuple[datetime, bool]] = {}
    for event in events:
        if event.kind != EventKind.SECRETS_RESOLVED:
            continue
        entries = event.details.get("secrets")
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, Mapping) and "name" in entry:
                out.setdefault(str(entry["name"]), (event.time, bool(entry.get("lease_id"))))
    return out


def _launch(launch_id: str, events: Sequence[AuditEvent]) -> LaunchTimeline:
    requested = _first(events, EventKind.LAUNCH_REQUESTED)
    decision = _first(events, EventKind.DECISION)
    created = _first(events, EventKind.SECRET_CREATED)
    deleted = _first(events, EventKind.SECRET_DELETED)
    finished = _first(events, EventKind.POD_FINISHED)
    revocations = [e for e in events if e.kind == EventKind.LEASES_REVOKED]
    revoked_ok = next((e for e in revocations if e.details.get("revoked") is not False), None)
    resolved = _resolved(events)
    grants = _grants_by_secret(decision)
    denied = {str(n) for n in (decision.details.get("denied", []) if decision else [])}
    allowed = bool(decision.details.get("allowed")) if decision is not None else None

    names = list(
        dict.fromkeys(
            [
                *(requested.secret_names if requested else ()),
                *(decision.secret_names if decision else ()),
                *resolved,
            ]
        )
    )
    fates: list[SecretFate] = []
    for name in names:
        if decision is None:
            verdict: Literal["granted", "denied", "undecided"] = "undecided"
        elif name in denied or not allowed:
            verdict = "denied"
        else:
            verdict = "granted"
        read = resolved.get(name)
        delivered = created.time if created is not None and read is not None else None
        removed = deleted.time if deleted is not None and delivered is not None else None
        dynamic = bool(read and read[1])
        fates.append(
            SecretFate(
                secret=name,
                decision=verdict,
                grants=grants.get(name, []) if verdict == "granted" else [],
                dynamic=dynamic,
                delivered=delivered,
                removed=removed,
                revoked=revoked_ok.time if dynamic and revoked_ok is not None else None,
                exposure_seconds=(
                    (removed - delivered).total_seconds()
                    if delivered is not None and removed is not None
                    else None
                ),
            )
        )

    ended = any(e.kind in ENDINGS for e in events)
    findings: list[str] = []
    if created is not None and deleted is None:
        findings.append(
            "the launch ended but its Secret was never deleted: the values are still in the cluster"
            if ended
            else "still running: its Secret holds the values until the pod ends"
        )
    if any(f.dynamic for f in fates) and revoked_ok is None and (ended or deleted is not None):
        findings.append("dynamic credentials were never revoked: they live until their lease ends")
    if any(e.details.get("revoked") is False for e in revocations):
        findings.append(
            "a revocation failed"
            + (" and was retried successfully" if revoked_ok is not None else "")
        )
    if finished is not None and deleted is not None:
        after = (deleted.time - finished.time).total_seconds()
        if after > LONG_AFTER_POD_SECONDS:
            findings.append(f"the values outlived their pod by {after:.0f} s")
    if any(e.kind == EventKind.RECONCILER_CLEANUP for e in events):
        findings.append("the reconciler cleaned up after this launch (an orphan or a missed end)")
    if any(e.kind == EventKind.LAUNCH_FAILED for e in events) and resolved:
        findings.append("the launch failed after reading secrets from Vault")

    first = requested or decision or events[0]
    image = requested.details.get("image") if requested is not None else None
    return LaunchTimeline(
        launch_id=launch_id,
        try_number=first.try_number,
        caller=first.caller,
        image=str(image) if image is not None else None,
        requested=requested.time if requested is not None else None,
        allowed=allowed,
        reasons=[str(r) for r in (decision.details.get("reasons", []) if decision else [])],
        secrets=fates,
        findings=findings,
        events=[
            TimelineEntry(
                time=e.time,
                kind=e.kind,
                secret_names=list(e.secret_names),
                details=_shown(e.details),
            )
            for e in events
        ],
    )


def task_try_audit(
    events: Iterable[AuditEvent], task: TaskTry, *, scope: Sequence[str] | None = None
) -> TaskTryAudit:
    """The launches of ``task`` (oldest first) with what happened to each secret.
    A DAG outside ``scope`` (DAG globs; None: every DAG) has no launches to show."""
    if not in_scope(task.dag_id, scope):
        return TaskTryAudit(task=task, launches=[])
    ordered = sorted(events, key=lambda e: e.time)  # stable: store order breaks ties
    launch_ids = list(
        dict.fromkeys(e.launch_id for e in ordered if e.launch_id and task.matches(e))
    )
    wanted = set(launch_ids)
    by_launch: dict[str, list[AuditEvent]] = {i: [] for i in launch_ids}
    for event in ordered:
        if event.launch_id in wanted:
            # An event naming another task under the same id is not this launch's.
            if event.dag_id is not None and event.dag_id != task.dag_id:
                continue
            by_launch[event.launch_id].append(event)
    return TaskTryAudit(
        task=task,
        launches=[_launch(i, by_launch[i]) for i in launch_ids],
    )
