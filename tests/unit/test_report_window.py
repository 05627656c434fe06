"""A report over a window reads only what the window needs from the store, and says
exactly what a report computed from the whole trail says."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.reporting import build_report
from broker.audit.store import open_audit_store
from broker.core import audit_events as ev
from broker.core.models import TaskIdentity
from broker.core.report import GrantRef, ReportFilters, compute_report
from tests.unit.test_report import at, launch, scenario

GRANTS = [
    GrantRef("analytics/etl", "analytics", "etl_*", None, ("warehouse", "s3")),
    GrantRef("analytics/report", "analytics", "report_*", "send*", ("smtp",)),
    GrantRef("ml/train", "ml", "train_*", None, ("gpu-quota",)),
]


def _trail() -> list[ev.AuditEvent]:
    events = scenario()
    # A launch that straddles the window start: requested and decided before it,
    # resolved inside it (the report needs its image and matched grants).
    straddle = launch("S1", "etl_users", "extract", at(2, 23), ["s3"], matched={"s3": ["x/y"]})
    for event in straddle:
        if event.kind == ev.EventKind.SECRETS_RESOLVED:
            event = event.model_copy(update={"time": at(3, 0) + timedelta(minutes=1)})
        events.append(event)
    t = TaskIdentity(dag_id="etl_users", task_id="extract", run_id="r-old")
    events.append(
        ev.secrets_resolved(
            launch_id="OLD", caller="sa:w", task=t, secrets=[{"name": "warehouse"}], time=at(1, 1)
        )
    )
    return sorted(events, key=lambda e: e.time)


@pytest.mark.parametrize(
    ("since", "until"),
    [(at(3), None), (at(1), at(8)), (at(2, 11), at(5)), (None, at(4)), (None, None)],
)
@pytest.mark.parametrize(
    "filters",
    [None, ReportFilters(task="load"), ReportFilters(team="analytics"), ReportFilters(dag="etl_*")],
)
def test_windowed_report_equals_the_full_computation(
    tmp_path: Path, since: object, until: object, filters: ReportFilters | None
) -> None:
    events = _trail()
    key = Ed25519PrivateKey.generate()
    with open_audit_store(f"sqlite:///{tmp_path / 'audit.db'}", key) as store:
        for event in events:
            store.append(event)
        got = build_report(store, GRANTS, since=since, until=until, filters=filters)  # type: ignore[arg-type]
    expected = compute_report(
        events,
        GRANTS,
        window_start=since,
        window_end=until,
        filters=filters,  # type: ignore[arg-type]
    )
    assert got.model_dump() == expected.model_dump()
