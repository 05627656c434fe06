"""Glue between the audit store and the pure report computation.

With a window start, only the window is read (time index), plus what the report needs
from before it: the earlier events of the window's launches (image, matched grants) and,
for "first-time use", earlier uses of the window's DAGs, read DAG by DAG and stopped as
soon as every secret the window uses has an earlier use (when no task, team or secret
filter could make an earlier use not count). The cost grows with the window asked for,
not with the trail (docs/benchmarks.md, "Audit trail scale")."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime

from broker.audit.store import AuditStore
from broker.core.audit_events import AuditEvent, EventKind
from broker.core.report import (
    GrantRef,
    ReportFilters,
    UsageReport,
    compute_report,
    grant_refs_from_policy,
)

# grant_refs_from_policy lives in core now; still importable from here for existing callers.
__all__ = ["build_report", "grant_refs_from_policy", "report_events"]


def report_events(
    store: AuditStore,
    since: datetime | None,
    until: datetime | None,
    filters: ReportFilters | None = None,
) -> list[AuditEvent]:
    """The events :func:`compute_report` needs for this window (all of them without
    ``since``: "never before" then means the whole trail)."""
    if since is None:
        return [r.event for r in store.records_between(None, until)]
    by_position: dict[int, AuditEvent] = {}

    def add(position: int, event: AuditEvent) -> None:
        by_position.setdefault(position, event)

    window = list(store.records_between(since, until))
    for record in window:
        add(record.position, record.event)
    launches = {r.event.launch_id for r in window if r.event.launch_id}
    for record in store.records_of_launches(launches, since):
        add(record.position, record.event)
    # Secrets each DAG used in the window: an earlier use makes them not first-time.
    wanted: dict[str, set[str]] = defaultdict(set)
    for record in window:
        event = record.event
        if event.kind == EventKind.SECRETS_RESOLVED and event.dag_id:
            wanted[event.dag_id].update(event.secret_names)
    f = filters or ReportFilters()
    stop_early = f.task is None and f.team is None and f.secret is None
    for dag_id, secrets in sorted(wanted.items()):
        missing = set(secrets)
        for record in store.records_of_dag(dag_id, EventKind.SECRETS_RESOLVED.value, since):
            add(record.position, record.event)
            missing -= set(record.event.secret_names)
            if stop_early and not missing:
                break
    # Store order, as a full read gives (the report breaks time ties by it).
    return [by_position[p] for p in sorted(by_position)]


def build_report(
    store: AuditStore,
    grants: Iterable[GrantRef] = (),
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    filters: ReportFilters | None = None,
) -> UsageReport:
    """Read what the window needs (see the module docstring) and compute."""
    return compute_report(
        report_events(store, since, until, filters),
        grants,
        window_start=since,
        window_end=until,
        filters=filters,
    )
