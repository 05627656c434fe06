"""``BrokerPodOperator(dry_run=True)`` (issue 13 item 9): one POST /v1/launches?dry_run=true,
the plan and the decision in the task log, the plan pushed; nothing else is called."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from airflow.sdk.exceptions import AirflowFailException

from broker.core.api_models import LaunchDryRun, PlannedDecision, PlannedRead, PlannedToken
from tests.unit.test_airflow_kpo_parity import conn_settings, ctx, wire
from tests.unit.test_airflow_operator import FakeTI, ScriptedBroker, operator

__all__ = ["conn_settings", "wire"]


def plan(*, allowed: bool) -> LaunchDryRun:
    return LaunchDryRun(
        launch_id="L1",
        namespace="jobs",
        pod_name="analytics-etl-daily-load-1",
        secret_name="podbroker-L1",
        decision=PlannedDecision(
            allowed=allowed,
            matched_grants=["analytics-etl"] if allowed else [],
            denied=[] if allowed else ["warehouse-loader"],
            reasons=[] if allowed else ["no grant of warehouse-loader matches this task"],
        ),
        pod={"metadata": {"name": "analytics-etl-daily-load-1"}, "spec": {"containers": []}},
        secret_keys_known=True,
        vault_reads=[
            PlannedRead(
                name="warehouse-loader",
                kind="kv",
                path="secret/data/analytics/warehouse-loader",
                grant="analytics-etl",
            )
        ]
        if allowed
        else [],
        token=PlannedToken(policies=["podbroker-analytics-etl"], ttl_seconds=3900, num_uses=2)
        if allowed
        else None,
    )


class DryRunBroker(ScriptedBroker):
    def __init__(self, answer: LaunchDryRun) -> None:
        super().__init__(["Succeeded"])
        self.answer = answer

    def __call__(self, req: httpx.Request) -> httpx.Response:
        self.requests.append(req)
        if req.method == "POST" and req.url.params.get("dry_run") == "true":
            return httpx.Response(200, json=self.answer.model_dump(mode="json"))
        return httpx.Response(500, json={"error": "internal", "reason": "not a dry run"})


def test_dry_run_logs_plan_and_decision_and_pushes_it(wire, capsys) -> None:  # type: ignore[no-untyped-def]
    broker = wire(DryRunBroker(plan(allowed=True)))
    context: dict[str, Any] = ctx()
    value = operator(dry_run=True, get_logs=False).execute(context)  # type: ignore[arg-type]
    assert [(r.method, r.url.params.get("dry_run")) for r in broker.requests] == [("POST", "true")]
    assert value["decision"]["allowed"] is True
    ti: FakeTI = context["ti"]
    assert ti.xcom == {"dry_run": value}  # no launch_id / pod_name: nothing was launched
    out = capsys.readouterr().out
    assert "dry run: nothing launched" in out
    assert "policy decision: allowed; matched grants: analytics-etl" in out
    assert "would read warehouse-loader (kv) at secret/data/analytics/warehouse-loader" in out
    assert '"name": "analytics-etl-daily-load-1"' in out


def test_dry_run_denial_fails_without_retry_after_showing_the_plan(wire, capsys) -> None:  # type: ignore[no-untyped-def]
    wire(DryRunBroker(plan(allowed=False)))
    context: dict[str, Any] = ctx()
    with pytest.raises(AirflowFailException, match=r"would deny this launch.*warehouse-loader"):
        operator(dry_run=True, get_logs=False).execute(context)  # type: ignore[arg-type]
    assert context["ti"].xcom["dry_run"]["decision"]["allowed"] is False
    assert "policy decision: DENIED" in capsys.readouterr().out


def test_dry_run_does_not_shadow_the_base_operators_dry_run() -> None:
    op = operator(dry_run=True)
    assert op.plan_only is True
    assert callable(op.dry_run)  # BaseOperator.dry_run (render templates) still works
    op.dry_run()
