"""The audit event model refuses values and keeps one canonical form."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from broker.core import audit_events as ev
from broker.core.models import Caller, TaskIdentity
from broker.core.secret_value import SecretValue

PLANTED = "pl4nted-S3CRET-value-93f1"
TASK = TaskIdentity(dag_id="etl", task_id="load", run_id="r1", try_number=2, map_index=3)


def test_secret_value_anywhere_in_details_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValidationError) as info:
        ev.launch_event(
            ev.EventKind.POD_CREATED,
            launch_id="L1",
            nested={"list": [1, {"x": SecretValue(PLANTED)}]},
        )
    text = str(info.value)
    assert "SecretValue" in text
    assert "details.nested.list[1].x" in text
    assert PLANTED not in text


def test_secret_value_in_names_is_refused() -> None:
    with pytest.raises(ValidationError):
        ev.AuditEvent(kind=ev.EventKind.DECISION, secret_names=[SecretValue(PLANTED)])


@pytest.mark.parametrize("key", ["value", "password", "Token", "client_token", "data"])
def test_value_like_keys_are_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="looks like a secret value"):
        ev.launch_event(ev.EventKind.SECRET_CREATED, launch_id="L1", extra={key: "x"})


@pytest.mark.parametrize("bad", [object(), b"bytes", float("nan"), {1: "int key"}])
def test_non_json_details_are_refused(bad: object) -> None:
    with pytest.raises(ValidationError):
        ev.AuditEvent(kind=ev.EventKind.POLICY_APPLIED, details={"x": bad})


def test_naive_time_is_refused_and_aware_time_is_normalised_to_utc() -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        ev.AuditEvent(kind=ev.EventKind.DECISION, time=datetime(2026, 1, 1))
    plus2 = timezone(timedelta(hours=2))
    event = ev.AuditEvent(kind=ev.EventKind.DECISION, time=datetime(2026, 1, 1, 12, tzinfo=plus2))
    assert event.time == datetime(2026, 1, 1, 10, tzinfo=UTC)
    assert event.to_json_dict()["time"] == "2026-01-01T10:00:00.000000Z"


def test_canonical_json_round_trips_exactly() -> None:
    event = ev.decision(
        launch_id="L1",
        caller=Caller(identity="sa:airflow"),
        task=TASK,
        secret_names=["b", "a"],
        allowed=False,
        reasons=["no-grant"],
        denied=["b"],
        matched_grants={"a": ["t/g"]},
        time=datetime(2026, 5, 1, 1, 2, 3, 456789, tzinfo=UTC),
    )
    text = event.canonical_json()
    again = ev.AuditEvent.from_json_dict(json.loads(text))
    assert again == event
    assert again.canonical_json() == text
    assert ", " not in text and ": " not in text
    assert list(json.loads(text)) == sorted(json.loads(text))


def test_a_stored_event_is_read_back_with_its_types_checked_not_its_write_guards() -> None:
    """Reading back skips the write-time guards (the hash protects what they checked)
    but still refuses data of the wrong shape; making an event still runs them all."""
    stored = json.loads(
        ev.launch_event(ev.EventKind.LAUNCH_FAILED, launch_id="L1", stage="s").canonical_json()
    )
    read = ev.AuditEvent.from_json_dict({**stored, "details": {"note": "x" * 5000}})
    assert read.details == {"note": "x" * 5000}  # not cut again: as it was hashed
    for broken in ({"secret_names": [1]}, {"details": []}, {"kind": "nope"}, {"time": "x"}):
        with pytest.raises((ValidationError, ev.AuditEventError)):
            ev.AuditEvent.from_json_dict({**stored, **broken})
    with pytest.raises(ValidationError):
        ev.AuditEvent.model_validate({**stored, "details": {"password": "p"}})


def test_builders_fill_task_identity_and_details_layout() -> None:
    resolved = ev.secrets_resolved(
        launch_id="L9",
        caller="sa:x",
        task=TASK,
        token_accessor="acc-1",
        secrets=[
            {"name": "db", "path": "kv/data/db", "version": 4, "lease_id": None},
            {"name": "s3", "path": "aws/creds/r", "lease_id": "aws/creds/r/abc"},
        ],
    )
    assert resolved.secret_names == ("db", "s3")
    assert (
        resolved.dag_id,
        resolved.task_id,
        resolved.run_id,
        resolved.try_number,
        resolved.map_index,
    ) == ("etl", "load", "r1", 2, 3)
    assert resolved.details["token_accessor"] == "acc-1"
    assert resolved.details["secrets"][0]["version"] == 4
    finished = ev.launch_event(
        ev.EventKind.POD_FINISHED, launch_id="L9", task=TASK, phase="Failed", exit_code=3
    )
    assert finished.details == {"phase": "Failed", "exit_code": 3}
    with pytest.raises(ev.AuditEventError, match="name"):
        ev.secrets_resolved(launch_id="L9", caller=None, task=TASK, secrets=[{"path": "x"}])


def test_every_required_kind_exists() -> None:
    required = {
        "launch_requested",
        "decision",
        "secrets_resolved",
        "secret_created",
        "pod_created",
        "pod_finished",
        "secret_deleted",
        "leases_revoked",
        "launch_killed",
        "reconciler_cleanup",
        "policy_applied",
        "launch_failed",
    }
    assert required <= {k.value for k in ev.EventKind}
