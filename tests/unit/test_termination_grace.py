"""``termination_grace_period_seconds`` (issue 13 item 5): bounded in the request, on the
pod spec, and the grace period the broker deletes the pod with when it stops it; a
request without it keeps its digest (a launch made before the field still reattaches)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest
from pydantic import ValidationError

from broker.core import podmeta
from broker.core.api_models import ContainerSpec, LaunchRequest
from broker.core.plan import build_plan, request_digest
from tests.unit.fakes import Services, make_task
from tests.unit.test_launch_plan import POLICY, TASK


def request(**changes: Any) -> LaunchRequest:
    return LaunchRequest(task=TASK, container=ContainerSpec(image="python:3.12"), **changes)


def test_the_grace_period_goes_on_the_pod_spec() -> None:
    pod = build_plan(request(termination_grace_period_seconds=120), POLICY, "static:dev").pod
    assert pod["spec"]["terminationGracePeriodSeconds"] == 120
    assert pod["metadata"]["annotations"][podmeta.GRACE_ANNOTATION] == "120"


def test_without_it_the_pod_keeps_the_kubernetes_default() -> None:
    pod = build_plan(request(), POLICY, "static:dev").pod
    assert "terminationGracePeriodSeconds" not in pod["spec"]
    assert podmeta.GRACE_ANNOTATION not in pod["metadata"]["annotations"]


@pytest.mark.parametrize("value", [-1, 3601, "30", 1.5, True])
def test_the_grace_period_is_bounded_and_strict(value: Any) -> None:
    with pytest.raises(ValidationError):
        LaunchRequest.model_validate(
            {
                "task": TASK.model_dump(),
                "container": {"image": "x"},
                **{"termination_grace_period_seconds": value},
            }
        )


def test_a_request_without_it_keeps_the_digest_it_had_before_the_field() -> None:
    plain = request()
    before = json.loads(plain.model_dump_json())
    before.pop("termination_grace_period_seconds")
    expected = hashlib.sha256(
        json.dumps(before, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    assert request_digest(plain) == expected
    assert request_digest(request(termination_grace_period_seconds=30)) != expected


def test_the_broker_kills_with_the_asked_grace_period_else_at_once(svc: Services) -> None:
    graceful = svc.cluster.add_pod(make_task("graceful"), phase="Running")
    graceful_key = (graceful.namespace, graceful.name)
    svc.cluster.pods[graceful_key] = dataclasses.replace(
        graceful, annotations={**graceful.annotations, podmeta.GRACE_ANNOTATION: "45"}
    )
    abrupt = svc.cluster.add_pod(make_task("abrupt"), phase="Running")
    svc.cleanup.end_launch(svc.cluster.pods[graceful_key], "newer try", cleanup_reason="killed")
    svc.cleanup.end_launch(abrupt, "newer try", cleanup_reason="killed")
    assert svc.cluster.delete_graces == {
        graceful_key: 45,
        (abrupt.namespace, abrupt.name): 0,
    }
