"""Status and kill of a launch, authorized by the DAG it belongs to."""

from __future__ import annotations

import pytest

from broker.core.audit_events import EventKind
from broker.core.objects import PodInfo
from broker.errors import DeniedError, NotFoundError
from tests.unit.fakes import CALLER, NAMESPACE, OTHER_CALLER, Services, make_task


def pod_with_secret(svc: Services, phase: str, exit_code: int | None = None) -> PodInfo:
    pod = svc.cluster.add_pod(make_task(), phase=phase, exit_code=exit_code, secret_names=["db"])
    svc.cluster.add_secret_for(pod, lease_ids=["l-1"], accessor="acc-1")
    return pod


def launch_id(pod: PodInfo) -> str:
    assert pod.launch_id is not None
    return pod.launch_id


def test_status_tells_phase_and_exit_code(svc: Services) -> None:
    pod = pod_with_secret(svc, "Failed", exit_code=2)
    view = svc.lookup.status(CALLER, launch_id(pod))
    assert (view.phase, view.exit_code, view.secret_names) == ("Failed", 2, ["db"])


def test_kill_of_a_running_launch_is_recorded_as_killed(svc: Services) -> None:
    pod = pod_with_secret(svc, "Running")
    view = svc.lookup.kill(CALLER, launch_id(pod), reason="operator cancelled")
    assert view.phase == "Deleted"
    assert svc.cluster.pods == {}
    assert svc.cluster.secrets == {}
    assert svc.store.revoked_leases == ["l-1"]
    assert svc.store.revoked_accessors == ["acc-1"]
    kinds = svc.audit.kinds()
    assert kinds[0] == EventKind.LAUNCH_KILLED
    assert EventKind.POD_DELETED not in kinds
    assert EventKind.POD_FINISHED not in kinds
    assert svc.audit.events[0].details["reason"] == "operator cancelled"
    assert svc.audit.events[0].details["by"] == CALLER.identity


def test_kill_of_a_finished_launch_is_only_a_deletion(svc: Services) -> None:
    pod = pod_with_secret(svc, "Succeeded", exit_code=0)
    svc.lookup.kill(CALLER, launch_id(pod))
    kinds = svc.audit.kinds()
    assert kinds[0] == EventKind.POD_DELETED
    assert EventKind.LAUNCH_KILLED not in kinds
    assert EventKind.POD_FINISHED in kinds
    assert svc.cluster.pods == {}
    assert svc.store.revoked_accessors == ["acc-1"]


def test_kill_of_a_finished_claimed_launch_does_not_revoke_twice(svc: Services) -> None:
    pod = pod_with_secret(svc, "Succeeded", exit_code=0)
    svc.cleanup.finish(pod)  # the reconciler got there first
    svc.lookup.kill(CALLER, launch_id(pod))
    assert svc.store.revoked_accessors == ["acc-1"]
    assert svc.cluster.pods == {}


def test_another_dags_launch_is_403_and_untouched(svc: Services) -> None:
    pod = pod_with_secret(svc, "Running")
    with pytest.raises(DeniedError) as denied:
        svc.lookup.kill(OTHER_CALLER, launch_id(pod))
    assert denied.value.http_status == 403
    with pytest.raises(DeniedError):
        svc.lookup.status(OTHER_CALLER, launch_id(pod))
    assert (NAMESPACE, pod.name) in svc.cluster.pods
    assert len(svc.cluster.secrets) == 1
    assert svc.audit.events == []


def test_unknown_launch_is_404(svc: Services) -> None:
    with pytest.raises(NotFoundError) as missing:
        svc.lookup.kill(CALLER, "f" * 20)
    assert missing.value.http_status == 404
    assert svc.cluster.count("delete_pod") == 0
