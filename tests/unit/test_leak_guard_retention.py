"""The leak guard after the pod ended: the values issued to a launch are held in memory
from its Secret's creation (or from when a replica first sees it run) until a bounded
time after its end, so a one-shot log read of an ended launch whose Secret is gone is
still masked; a replica holding nothing refuses the read (409), never serves it
unmasked."""

from __future__ import annotations

import pytest

from broker.core.secret_value import SecretValue
from broker.errors import ConflictError
from broker.metrics import LOG_READS_REFUSED
from broker.service.cleanup import Cleanup
from broker.service.issued import IssuedValues
from broker.service.lookup import LaunchLookup
from broker.service.reconciler import Reconciler
from tests.unit.fakes import CALLER, NAMESPACE, Services
from tests.unit.test_leak_guard import PASSWORD, exposure_policy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def held(values: IssuedValues, launch_id: str) -> list[str]:
    found = values.values(launch_id)
    return sorted(v.reveal() for vs in (found or {}).values() for v in vs)


def test_values_go_retain_seconds_after_the_first_end() -> None:
    clock = Clock()
    issued = IssuedValues(retain_seconds=60, clock=clock)
    issued.hold("a", {"wh": [SecretValue("value-a")]})
    clock.now += 10_000  # running launches are held however long they run
    assert held(issued, "a") == ["value-a"]
    issued.ended("a")
    clock.now += 30
    issued.ended("a")  # a second end does not extend it
    clock.now += 29
    assert held(issued, "a") == ["value-a"]
    clock.now += 1
    assert issued.values("a") is None
    assert not issued.holds("a")


def test_retain_zero_drops_at_the_end_and_max_zero_holds_nothing() -> None:
    issued = IssuedValues(retain_seconds=0)
    issued.hold("a", {"wh": [SecretValue("value-a")]})
    issued.ended("a")
    assert issued.values("a") is None
    none = IssuedValues(max_launches=0)
    none.hold("a", {"wh": [SecretValue("value-a")]})
    assert len(none) == 0


def test_over_the_bound_ended_launches_go_first_then_the_oldest() -> None:
    issued = IssuedValues(max_launches=2)
    issued.hold("old", {"s": [SecretValue("value-old")]})
    issued.hold("done", {"s": [SecretValue("value-done")]})
    issued.ended("done")
    issued.hold("new", {"s": [SecretValue("value-new")]})
    assert (issued.holds("old"), issued.holds("done"), issued.holds("new")) == (True, False, True)
    issued.hold("newer", {"s": [SecretValue("value-newer")]})
    assert (issued.holds("old"), issued.holds("newer")) == (False, True)
    assert len(issued) == 2


def test_the_sweep_ends_what_it_no_longer_sees_but_not_what_came_after_its_mark() -> None:
    issued = IssuedValues(retain_seconds=0)
    issued.hold("running", {"s": [SecretValue("value-1")]})
    issued.hold("gone", {"s": [SecretValue("value-2")]})
    mark = issued.checkpoint()
    issued.hold("brand-new", {"s": [SecretValue("value-3")]})
    assert issued.ended_unless({"running"}, held_by=mark) == 1
    assert (issued.holds("running"), issued.holds("gone"), issued.holds("brand-new")) == (
        True,
        False,
        True,
    )


def test_repr_names_no_value() -> None:
    issued = IssuedValues()
    issued.hold("a", {"wh": [SecretValue(PASSWORD)]})
    assert PASSWORD not in repr(issued)
    assert repr(issued) == "IssuedValues(1 launches)"


# -- the log read of an ended launch ---------------------------------------------------


def ended_launch(svc: Services) -> tuple[str, str]:
    """A launch whose pod printed its password, ended, and had its Secret deleted by
    the broker's cleanup (as the reconciler does when the pod ends)."""
    svc.policies.policy = exposure_policy("mask")
    svc.store.kv_values["wh"] = {"user": "etl_user_7f3a", "password": PASSWORD}
    view = svc.launch("wh")
    svc.cluster.logs[(NAMESPACE, view.pod_name)] = [
        f"connecting with {PASSWORD[:5]}".encode(),
        f"{PASSWORD[5:]} done\n".encode(),
    ]
    svc.cluster.set_phase(NAMESPACE, view.pod_name, "Running")
    pod = svc.cluster.set_phase(NAMESPACE, view.pod_name, "Succeeded", exit_code=0)
    svc.reconciler.on_pod_event("MODIFIED", pod)
    assert svc.cluster.secrets == {}  # the Secret is gone
    return view.launch_id, view.pod_name


def read(lookup: LaunchLookup, launch_id: str) -> bytes:
    return b"".join(
        lookup.logs(CALLER, launch_id, follow=False, since_seconds=None, timestamps=False)
    )


def test_a_one_shot_read_after_the_secret_is_gone_is_still_masked(svc: Services) -> None:
    launch_id, _ = ended_launch(svc)
    assert read(svc.lookup, launch_id) == b"connecting with *** done\n"


def replica(svc: Services, issued: IssuedValues) -> tuple[Cleanup, LaunchLookup, Reconciler]:
    cleanup = Cleanup(
        cluster=svc.cluster, secrets=svc.store, audit=svc.audit, ledger=svc.ledger, issued=issued
    )
    lookup = LaunchLookup(
        cluster=svc.cluster, audit=svc.audit, cleanup=cleanup, namespaces=(NAMESPACE,)
    )
    reconciler = Reconciler(
        cluster=svc.cluster,
        cleanup=cleanup,
        namespaces=(NAMESPACE,),
        retention_seconds=600,
        grace_seconds=60,
    )
    return cleanup, lookup, reconciler


def test_a_replica_holding_nothing_refuses_the_read_and_says_why(svc: Services) -> None:
    launch_id, _ = ended_launch(svc)
    _, other, _ = replica(svc, IssuedValues())  # e.g. restarted since the pod ran
    before = LOG_READS_REFUSED._value.get()
    with pytest.raises(ConflictError) as refused:
        read(other, launch_id)
    assert LOG_READS_REFUSED._value.get() == before + 1
    assert refused.value.http_status == 409
    reason = refused.value.reason
    assert "not served" in reason and "leak_guard.retain_seconds" in reason
    assert PASSWORD not in reason


def test_a_replica_that_saw_the_launch_run_masks_it_after_the_end(svc: Services) -> None:
    svc.policies.policy = exposure_policy("mask")
    svc.store.kv_values["wh"] = {"user": "etl_user_7f3a", "password": PASSWORD}
    view = svc.launch("wh")
    svc.cluster.logs[(NAMESPACE, view.pod_name)] = [f"pw {PASSWORD}\n".encode()]
    _, other, watcher = replica(svc, IssuedValues())
    running = svc.cluster.set_phase(NAMESPACE, view.pod_name, "Running")
    watcher.on_pod_event("MODIFIED", running)  # its watch sees the pod run
    svc.reconciler.on_pod_event(
        "MODIFIED", svc.cluster.set_phase(NAMESPACE, view.pod_name, "Succeeded", exit_code=0)
    )
    assert svc.cluster.secrets == {}
    assert read(other, view.launch_id) == b"pw ***\n"


def test_values_expire_after_the_retention_then_the_read_is_refused(svc: Services) -> None:
    clock = Clock()
    svc.cleanup.issued = IssuedValues(retain_seconds=3600, clock=clock)
    launch_id, _ = ended_launch(svc)
    clock.now += 3599
    assert read(svc.lookup, launch_id) == b"connecting with *** done\n"
    clock.now += 1
    with pytest.raises(ConflictError):
        read(svc.lookup, launch_id)


def test_a_rolled_back_launch_holds_nothing(svc: Services) -> None:
    svc.policies.policy = exposure_policy("mask")
    svc.cluster.fail("create_secret", ConflictError("planted"))
    with pytest.raises(ConflictError):
        svc.launch("wh")
    assert len(svc.cleanup.issued) == 0
