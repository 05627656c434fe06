"""The task-try view (issue 16 item 10): what happened to each secret of one task try,
computed from the audit events the real services write (in-memory fakes)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from broker.core import audit_events as ev
from broker.core.models import TaskIdentity
from broker.core.timeline import TaskTry, task_try_audit
from broker.errors import DeniedError
from tests.unit.fakes import NAMESPACE, Services, make_task

TRY_1 = TaskTry(dag_id="etl_daily", run_id="manual__1", task_id="load", try_number=1)


def test_a_finished_launch_shows_every_step_per_secret(svc: Services) -> None:
    view = svc.launch("wh", "db")
    pod = svc.cluster.set_phase(NAMESPACE, view.pod_name, "Succeeded", exit_code=0)
    svc.cleanup.finish(pod)

    audit = task_try_audit(svc.audit.events, TRY_1)
    [launch] = audit.launches
    assert launch.launch_id == view.launch_id
    assert launch.allowed is True and launch.try_number == 1
    fates = {f.secret: f for f in launch.secrets}
    assert set(fates) == {"wh", "db"}
    for fate in fates.values():
        assert fate.decision == "granted" and fate.grants == ["etl/loaders"]
        assert fate.delivered is not None and fate.removed is not None
        assert fate.exposure_seconds is not None and fate.exposure_seconds >= 0
    assert fates["db"].dynamic and fates["db"].revoked is not None
    assert not fates["wh"].dynamic and fates["wh"].revoked is None
    assert launch.findings == []
    kinds = [e.kind for e in launch.events]
    assert kinds[0] == ev.EventKind.LAUNCH_REQUESTED
    assert ev.EventKind.SECRET_DELETED in kinds and ev.EventKind.LEASES_REVOKED in kinds


def test_names_only_leave_the_trail(svc: Services) -> None:
    svc.launch("db")
    [launch] = task_try_audit(svc.audit.events, TRY_1).launches
    text = launch.model_dump_json()
    held = svc.ledger.held(launch.launch_id)
    assert held is not None and held.lease_ids
    for lease in held.lease_ids:
        assert lease not in text
    assert "token_accessor" not in text and "lease_id" not in text
    assert "path" not in json.loads(text)["events"][0]["details"]


def test_a_running_launch_is_flagged_as_still_holding_its_values(svc: Services) -> None:
    svc.launch("db")
    [launch] = task_try_audit(svc.audit.events, TRY_1).launches
    [fate] = launch.secrets
    assert fate.delivered is not None and fate.removed is None and fate.exposure_seconds is None
    assert launch.findings == ["still running: its Secret holds the values until the pod ends"]


def test_a_denied_launch_names_what_was_denied(svc: Services) -> None:
    task = make_task(dag_id="etl_daily")
    svc.policies.policy = svc.policies.policy.model_copy(update={"teams": {}})  # no grants
    with pytest.raises(DeniedError):
        svc.launch("wh", task_identity=task)
    [launch] = task_try_audit(svc.audit.events, TRY_1).launches
    assert launch.allowed is False
    assert [(f.secret, f.decision, f.delivered) for f in launch.secrets] == [("wh", "denied", None)]
    assert launch.reasons


def test_each_try_is_its_own_launch_and_others_stay_out(svc: Services) -> None:
    svc.launch("wh", task_identity=make_task(try_number=1))
    svc.launch("wh", task_identity=make_task(try_number=2))
    svc.launch("wh", task_identity=make_task("other"))
    every_try = task_try_audit(svc.audit.events, TRY_1.model_copy(update={"try_number": None}))
    assert [launch.try_number for launch in every_try.launches] == [1, 2]
    second = task_try_audit(svc.audit.events, TRY_1.model_copy(update={"try_number": 2}))
    assert [launch.try_number for launch in second.launches] == [2]


def test_a_dag_outside_the_scope_shows_nothing(svc: Services) -> None:
    svc.launch("wh")
    assert task_try_audit(svc.audit.events, TRY_1, scope=("ml_*",)).launches == []
    assert task_try_audit(svc.audit.events, TRY_1, scope=("etl_*",)).launches


def test_values_that_outlive_their_pod_and_a_failed_revocation_are_findings() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    task = TaskIdentity(dag_id="d", task_id="t", run_id="r", try_number=1)
    events = [
        ev.launch_requested(launch_id="L", caller="c", task=task, secret_names=["db"], time=t0),
        ev.decision(
            launch_id="L",
            caller="c",
            task=task,
            secret_names=["db"],
            allowed=True,
            matched_grants={"db": ["a/g"]},
            time=t0,
        ),
        ev.secrets_resolved(
            launch_id="L",
            caller="c",
            task=task,
            secrets=[{"name": "db", "lease_id": "database/creds/x/1"}],
            time=t0 + timedelta(seconds=1),
        ),
        ev.launch_event(
            ev.EventKind.SECRET_CREATED, launch_id="L", task=task, time=t0 + timedelta(seconds=1)
        ),
        ev.launch_event(
            ev.EventKind.POD_FINISHED, launch_id="L", task=task, time=t0 + timedelta(seconds=10)
        ),
        # Cleanup events may name no task: the launch id ties them to it.
        ev.launch_event(
            ev.EventKind.RECONCILER_CLEANUP,
            launch_id="L",
            action="delete_secret",
            object="ns/x",
            time=t0 + timedelta(seconds=600),
        ),
        ev.launch_event(
            ev.EventKind.SECRET_DELETED, launch_id="L", time=t0 + timedelta(seconds=600)
        ),
        ev.launch_event(
            ev.EventKind.LEASES_REVOKED,
            launch_id="L",
            revoked=False,
            error="VaultUnavailableError",
            time=t0 + timedelta(seconds=601),
        ),
    ]
    [launch] = task_try_audit(events, TaskTry(dag_id="d", run_id="r", task_id="t")).launches
    [fate] = launch.secrets
    assert fate.exposure_seconds == 599.0 and fate.revoked is None
    assert any("outlived their pod by 590 s" in f for f in launch.findings)
    assert any("revocation failed" in f for f in launch.findings)
    assert any("never revoked" in f for f in launch.findings)
    assert any("reconciler" in f for f in launch.findings)
