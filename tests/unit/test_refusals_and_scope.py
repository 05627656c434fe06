"""Refused requests counted per key, audit records capped, the report scoped to its
reader (fast, in memory)."""

from __future__ import annotations

from datetime import UTC, datetime
from fnmatch import fnmatchcase

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import audit_events as ev
from broker.core.models import TaskIdentity
from broker.core.report import ReportFilters, compute_report
from broker.service.refusals import RefusalRecorder
from tests.unit.fakes import FakeAudit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def refuse(recorder: RefusalRecorder, caller: str | None = "c", status: int = 422) -> None:
    recorder.record(
        caller=caller,
        client="10.0.0.1",
        endpoint="POST /v1/launches",
        status=status,
        reason_class="invalid_request",
        reason="task.map_index: Input should be a valid integer",
    )


def test_a_flood_of_refusals_is_one_record_per_key_per_interval() -> None:
    audit = FakeAudit()
    recorder = RefusalRecorder(audit, interval_seconds=3600)
    refuse(recorder)
    assert recorder.flush() == 1  # the first at once
    for _ in range(500):
        refuse(recorder)
    assert recorder.flush() == 0  # the rest wait for the interval
    refuse(recorder, caller=None, status=401)
    assert recorder.flush() == 1  # a new key is written at once
    assert recorder.flush(force=True) == 1
    records = [e for e in audit.events if e.kind == ev.EventKind.REQUEST_REFUSED]
    assert [e.details["count"] for e in records] == [1, 1, 500]
    assert records[1].caller is None and records[1].details["client"] == "10.0.0.1"


def test_keys_beyond_the_cap_share_one() -> None:
    audit = FakeAudit()
    recorder = RefusalRecorder(audit, interval_seconds=3600, max_keys=3)
    for i in range(50):
        refuse(recorder, caller=f"c{i}")
    assert recorder.flush() == 4
    callers = {e.caller for e in audit.events}
    assert "(other callers)" in callers and len(callers) == 4


def test_an_audit_record_is_capped_and_reads_back_unchanged() -> None:
    task = TaskIdentity(dag_id="d", task_id="t", run_id="r")
    event = ev.decision(
        launch_id="L",
        caller="c",
        task=task,
        secret_names=[f"s{i}" for i in range(500)],
        allowed=False,
        denied=[f"s{i}" for i in range(500)],
        reasons=["x" * 10_000],
    )
    assert len(event.secret_names) == ev.MAX_NAMES
    assert event.details["secret_names_omitted"] == 400
    assert len(event.details["denied"]) == ev.MAX_NAMES
    assert event.details["denied"][-1] == "…[401 more]"
    assert len(event.details["reasons"][0]) == ev.MAX_TEXT
    again = ev.AuditEvent.from_json_dict(event.to_json_dict())
    assert again.canonical_json() == event.canonical_json()


def test_the_report_shows_a_scoped_reader_only_its_dags() -> None:
    events = [
        ev.secrets_resolved(
            launch_id=f"L{dag}",
            caller="c",
            task=TaskIdentity(dag_id=dag, task_id="t", run_id="r"),
            secrets=[{"name": "db"}],
            time=T0,
        )
        for dag in ("etl_a", "etl_b", "ml_c")
    ]
    events.append(
        ev.request_refused(
            caller=None,
            endpoint="GET /v1/launches/{launch_id}",
            status=401,
            reason_class="unauthenticated",
            reason="missing bearer token",
            count=7,
            first_time=T0,
            last_time=T0,
            time=T0,
        )
    )

    def dags(filters: ReportFilters) -> set[str]:
        return {d.dag_id for d in compute_report(events, filters=filters).dags}

    assert dags(ReportFilters()) == {"etl_a", "etl_b", "ml_c"}
    assert dags(ReportFilters(dag_scope=("etl_*",))) == {"etl_a", "etl_b"}
    assert dags(ReportFilters(dag_scope=("etl_*",), dag_ids=("etl_b", "ml_c"))) == {"etl_b"}
    full = compute_report(events)
    assert full.totals.requests_refused == 7
    assert [d.count for d in full.denials] == [7]
    assert compute_report(events, filters=ReportFilters(dag_scope=("*",))).denials == []


_ID = st.text(alphabet="ab_1", min_size=1, max_size=5)
# Globs built from parts that often match such ids: literals, *, ?, sets, negated sets.
_GLOB = st.lists(
    st.sampled_from(["a", "b", "_", "1", "*", "?", "[ab]", "[!a]", "[", "]"]), max_size=5
).map("".join)


@given(ids=st.lists(_ID, max_size=30), dag_id=_ID, glob=_GLOB)
@settings(max_examples=300, deadline=None)
def test_the_readable_ids_lookups_agree_with_plain_matching(
    ids: list[str], dag_id: str, glob: str
) -> None:
    """The sorted-ids lookups (bisect, literal prefix) used for thousands of readable
    DAG ids answer as membership and fnmatch over every id would."""
    filters = ReportFilters(dag_ids=tuple(ids))
    assert filters.dag_visible(dag_id) == (dag_id in ids)
    assert filters.grant_visible(glob) == any(fnmatchcase(d, glob) for d in ids)
