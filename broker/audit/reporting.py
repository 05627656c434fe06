"""Glue between the audit store and the pure report computation."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from broker.audit.store import AuditStore
from broker.core.report import (
    GrantRef,
    ReportFilters,
    UsageReport,
    compute_report,
    grant_refs_from_policy,
)

# grant_refs_from_policy lives in core now; still importable from here for existing callers.
__all__ = ["build_report", "grant_refs_from_policy"]


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
