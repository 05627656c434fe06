"""The return value's leak guard (issue 13 item 2): a termination message holding a value
the broker issued to the launch is withheld, never shown by the status, never pushed to
XCom. The broker compares as it claims the ended pod, while its Secret still holds the
values; the operator waits for that verdict before it pushes anything."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from broker.core import podmeta
from broker.core.audit_events import EventKind
from broker.core.objects import ContainerStatus, PodInfo, launch_view
from broker.core.plan import values_by_secret
from broker.core.secret_value import SecretValue
from broker.core.termination import exposed_in
from tests.unit.fakes import Services, make_task
from tests.unit.test_airflow_kpo_parity import WithMessage, conn_settings, ctx, wire
from tests.unit.test_airflow_operator import operator

__all__ = ["conn_settings", "wire"]

PASSWORD = "PLANTED-pw-7f3a9c"


def ended_pod(svc: Services, message: str | None, *, values: dict[str, str] | None) -> PodInfo:
    """A Succeeded pod of a launch with secret ``db`` whose task wrote ``message``; its
    launch Secret holds ``values`` (None: the Secret is gone)."""
    pod = svc.cluster.add_pod(make_task(), phase="Succeeded", secret_names=["db"])
    pod = dataclasses.replace(
        pod, containers=(ContainerStatus("base", "terminated", 0, "Completed", message),)
    )
    svc.cluster.pods[(pod.namespace, pod.name)] = pod
    if values is not None:
        meta = svc.cluster.add_secret_for(pod)
        key = (meta.namespace, meta.name)
        stored = svc.cluster.secrets[key]
        svc.cluster.secrets[key] = dataclasses.replace(
            stored, data_keys=tuple(values), values=values
        )
    return pod


def current(svc: Services, pod: PodInfo) -> PodInfo:
    return svc.cluster.pods[(pod.namespace, pod.name)]


# -- core --------------------------------------------------------------------------------


def test_values_are_found_as_written_and_encoded() -> None:
    values = values_by_secret(
        {"s0.password": SecretValue(PASSWORD), "s1.token": SecretValue("abc")},
        ["db", "api"],
    )
    assert exposed_in([f'{{"dsn": "{PASSWORD}"}}'], values) == {"db"}
    encoded = base64.b64encode(PASSWORD.encode()).decode()
    assert exposed_in([f"x={encoded}"], values) == {"db"}
    # Too short to mean anything (as in the log guard), and absent values: clean.
    assert exposed_in(["abc", '{"rows": 3}'], values) == set()


def test_status_shows_messages_of_a_launch_with_secrets_only_once_found_clean(
    svc: Services,
) -> None:
    pod = ended_pod(svc, '{"rows": 3}', values=None)
    unchecked = launch_view(pod)
    assert unchecked.result_check == "unchecked"
    assert unchecked.containers[0].message is None
    clean = dataclasses.replace(
        pod, annotations={**pod.annotations, **podmeta.claim_annotations(pod.created_at, "clean")}
    )
    assert launch_view(clean).result_check == "clean"
    assert launch_view(clean).containers[0].message == '{"rows": 3}'
    # Claimed without a verdict (cleaned up by an older broker, or killed): never shown.
    claimed = dataclasses.replace(
        pod, annotations={**pod.annotations, **podmeta.claim_annotations(pod.created_at)}
    )
    assert launch_view(claimed).result_check == "withheld"
    assert launch_view(claimed).containers[0].message is None


def test_a_launch_without_secrets_needs_no_check(svc: Services) -> None:
    pod = svc.cluster.add_pod(make_task(), phase="Succeeded")
    pod = dataclasses.replace(
        pod, containers=(ContainerStatus("base", "terminated", 0, None, "42"),)
    )
    view = launch_view(pod)
    assert view.result_check is None
    assert view.containers[0].message == "42"


# -- service: the verdict, taken with the claim -------------------------------------------


def test_a_clean_message_is_shown_after_the_claim(svc: Services) -> None:
    pod = ended_pod(svc, '{"rows": 3}', values={"s0.password": PASSWORD})
    svc.cleanup.finish(pod)
    after = current(svc, pod)
    assert podmeta.result_check_of(after.annotations) == "clean"
    assert launch_view(after).containers[0].message == '{"rows": 3}'
    assert svc.cluster.secrets == {}  # the Secret still goes, after the check
    assert EventKind.SECRET_EXPOSED not in svc.audit.kinds()


def test_a_message_holding_an_issued_value_is_withheld_and_audited(svc: Services) -> None:
    pod = ended_pod(svc, f'{{"dsn": "{PASSWORD}"}}', values={"s0.password": PASSWORD})
    svc.cleanup.finish(pod)
    after = current(svc, pod)
    assert podmeta.result_check_of(after.annotations) == "withheld"
    view = launch_view(after)
    assert view.result_check == "withheld"
    assert PASSWORD not in view.model_dump_json()
    exposed = [e for e in svc.audit.events if e.kind == EventKind.SECRET_EXPOSED]
    assert [e.secret_names for e in exposed] == [("db",)]
    assert exposed[0].details["where"] == "termination_message"
    assert PASSWORD not in exposed[0].model_dump_json()


def test_replicas_that_both_check_a_leaking_message_audit_it_once(svc: Services) -> None:
    """Every replica that sees the pod end checks its message (the values are held in
    memory), but only the one whose claim wins records the exposure."""
    pod = ended_pod(svc, f'{{"dsn": "{PASSWORD}"}}', values={"s0.password": PASSWORD})
    other = svc.replica()
    other.issued.hold(pod.launch_id or "", {"db": [SecretValue(PASSWORD)]})
    svc.cleanup.finish(pod)
    other.finish(pod)  # saw the same event; its claim loses
    exposed = [e for e in svc.audit.events if e.kind == EventKind.SECRET_EXPOSED]
    assert len(exposed) == 1


def test_no_message_is_clean_without_reading_the_values(svc: Services) -> None:
    pod = ended_pod(svc, None, values={"s0.password": PASSWORD})
    svc.cleanup.finish(pod)
    assert podmeta.result_check_of(current(svc, pod).annotations) == "clean"
    assert svc.cluster.count("read_launch_secret_values") == 0


def test_a_message_whose_values_are_gone_is_withheld(svc: Services) -> None:
    pod = ended_pod(svc, '{"rows": 3}', values=None)
    svc.cleanup.finish(pod)
    assert podmeta.result_check_of(current(svc, pod).annotations) == "withheld"


# -- operator: waits for the verdict, pushes nothing withheld ------------------------------


class Checked(WithMessage):
    """Ended views go through ``checks`` (the last repeats) as the broker's verdict."""

    def __init__(self, message: str | None, checks: list[str | None]) -> None:
        super().__init__(["Succeeded"], message=message)
        self.checks = list(checks)

    def view(self, phase: str) -> dict[str, Any]:
        view = super().view(phase)
        if phase == "Succeeded":
            check = self.checks.pop(0) if len(self.checks) > 1 else self.checks[0]
            view["result_check"] = check
            if check != "clean":
                view["containers"][0]["message"] = None
        return view


def test_the_operator_waits_for_the_verdict_then_pushes(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(Checked('{"rows": 3}', ["unchecked", "unchecked", "clean"]))
    assert operator(do_xcom_push=True, get_logs=False).execute(ctx()) == {"rows": 3}  # type: ignore[arg-type]
    # The pod is deleted (on_finish_action) only after the verdict was read.
    methods = [r.method for r in broker.requests]
    assert methods[-1] == "DELETE"
    assert methods.count("GET") >= 3


def test_a_withheld_message_fails_the_task_and_pushes_nothing(wire) -> None:  # type: ignore[no-untyped-def]
    wire(Checked(None, ["withheld"]))
    with pytest.raises(AirflowFailException, match="withheld by the broker"):
        operator(do_xcom_push=True, get_logs=False).execute(ctx())  # type: ignore[arg-type]


def test_no_verdict_in_time_is_a_retryable_failure(wire, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("airflow_plugin.operator.RESULT_CHECK_TIMEOUT_SECONDS", 0.0)
    wire(Checked(None, ["unchecked"]))
    with pytest.raises(AirflowException, match="not yet checked") as caught:
        operator(do_xcom_push=True, get_logs=False).execute(ctx())  # type: ignore[arg-type]
    assert not isinstance(caught.value, AirflowFailException)


def test_without_do_xcom_push_nothing_waits(wire) -> None:  # type: ignore[no-untyped-def]
    broker = wire(Checked(None, ["unchecked"]))
    assert operator(get_logs=False).execute(ctx()) is None  # type: ignore[arg-type]
    assert [r.method for r in broker.requests].count("GET") == 1
