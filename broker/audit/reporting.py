"""Glue between the store, the policies and the pure report computation."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol

from broker.audit.store import AuditStore
from broker.core.report import GrantRef, ReportFilters, UsageReport, compute_report


class _GrantLike(Protocol):
    dags: str
    tasks: str | None
    secrets: tuple[str, ...]


class _PolicyLike(Protocol):
    def grants(self) -> list[tuple[str, Any]]: ...


def grant_refs_from_policy(policy: _PolicyLike) -> list[GrantRef]:
    """Adapt ``broker.core.policy.PolicySet`` (``grants()`` -> ``(team/grant, Grant)``)."""
    refs = []
    for full_id, grant in policy.grants():
        team = full_id.partition("/")[0]
        refs.append(GrantRef(full_id, team, grant.dags, grant.tasks, tuple(grant.secrets)))
    return refs


def build_report(
    store: AuditStore,
    grants: Iterable[GrantRef] = (),
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    filters: ReportFilters | None = None,
) -> UsageReport:
    """Read every record (first-time uses need history before ``since``) and compute."""
    return compute_report(
        store.events(), grants, window_start=since, window_end=until, filters=filters
    )
