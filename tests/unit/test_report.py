"""Report figures against a seeded scenario whose expected numbers were worked out by
hand (written below as literals, not computed by the code under test)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from broker.core import audit_events as ev
from broker.core.models import TaskIdentity
from broker.core.policy import Grant, KvSecret, PolicySet, Team
from broker.core.report import (
    GrantRef,
    ReportFilters,
    UsageReport,
    compute_report,
    grant_refs_from_policy,
)

WINDOW = (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 8, tzinfo=UTC))

GRANTS = [
    GrantRef("analytics/etl", "analytics", "etl_*", None, ("warehouse", "s3")),
    GrantRef("analytics/report", "analytics", "report_daily", "send*", ("smtp",)),
    GrantRef("ml/train", "ml", "train_*", None, ("gpu-quota", "warehouse")),
    GrantRef("ml/legacy", "ml", "old_*", None, ("ftp",)),
]


def at(day: int, hour: int = 0, month: int = 3) -> datetime:
    return datetime(2026, month, day, hour, tzinfo=UTC)


def launch(
    launch_id: str,
    dag: str,
    task: str,
    when: datetime,
    names: list[str],
    *,
    allowed: bool = True,
    denied: tuple[str, ...] = (),
    reason: str = "",
    matched: dict[str, list[str]] | None = None,
    teams: tuple[str, ...] = (),
    resolved_twice: bool = False,
) -> list[ev.AuditEvent]:
    t = TaskIdentity(dag_id=dag, task_id=task, run_id=f"run-{launch_id}")
    out = [
        ev.launch_requested(
            launch_id=launch_id, caller="sa:worker", task=t, secret_names=names, time=when
        ),
        ev.decision(
            launch_id=launch_id,
            caller="sa:worker",
            task=t,
            secret_names=names,
            allowed=allowed,
            denied=denied,
            reasons=[reason] if reason else [],
            matched_grants=matched or {},
            teams=teams,
            time=when,
        ),
    ]
    if allowed:
        resolved = ev.secrets_resolved(
            launch_id=launch_id,
            caller="sa:worker",
            task=t,
            secrets=[{"name": n} for n in names],
            teams=teams,
            time=when,
        )
        out += [resolved, resolved] if resolved_twice else [resolved]
        out.append(
            ev.launch_event(
                ev.EventKind.POD_FINISHED,
                launch_id=launch_id,
                task=t,
                time=when,
                phase="Succeeded",
                exit_code=0,
            )
        )
    return out


def scenario() -> list[ev.AuditEvent]:
    events: list[ev.AuditEvent] = []
    events += launch("P1", "etl_orders", "load", at(20, month=2), ["warehouse"])  # before
    events += launch(
        "L1",
        "etl_orders",
        "load",
        at(1, 10),
        ["warehouse"],
        matched={"warehouse": ["analytics/etl"]},
    )
    events += launch("L2", "etl_orders", "load", at(2, 11), ["warehouse", "s3"])
    events += launch("L3", "etl_users", "extract", at(3, 9), ["warehouse"])
    events += launch("L4", "report_daily", "send_mail", at(3, 12), ["smtp"], teams=("analytics",))
    events += launch(
        "L5",
        "train_model",
        "fit",
        at(4, 8),
        ["ftp"],
        allowed=False,
        denied=("ftp",),
        reason="no grant of train_model covers ftp",
    )
    events += launch(
        "L6", "train_model", "fit", at(5, 8), ["gpu-quota"], matched={"gpu-quota": ["ml/train"]}
    )
    events += launch("L7", "etl_orders", "load", at(6, 23), ["warehouse"], resolved_twice=True)
    events += launch(
        "D2",
        "report_daily",
        "render",
        at(7, 1),
        ["smtp"],
        allowed=False,
        denied=("smtp",),
        reason="grant analytics/report covers tasks send*",
    )
    events += launch("A1", "old_sync", "pull", at(9, 5), ["ftp"])  # after the window
    events.append(
        ev.launch_event(
            ev.EventKind.POLICY_APPLIED, launch_id=None, time=at(2), source="policies/", grants=4
        )
    )
    return events


def report(**filters: str) -> UsageReport:
    return compute_report(
        scenario(),
        GRANTS,
        window_start=WINDOW[0],
        window_end=WINDOW[1],
        filters=ReportFilters(**filters),
    )


def test_usage_per_secret() -> None:
    r = report()
    got = {
        s.secret: (
            s.uses,
            s.dags,
            [(t.dag_id, t.task_id) for t in s.tasks],
            s.first_use,
            s.last_use,
        )
        for s in r.secrets
    }
    assert got == {
        # L1, L2, L3, L7 (L7 recorded twice, counted once); P1 is before the window
        "warehouse": (
            4,
            ["etl_orders", "etl_users"],
            [("etl_orders", "load"), ("etl_users", "extract")],
            at(1, 10),
            at(6, 23),
        ),
        "s3": (1, ["etl_orders"], [("etl_orders", "load")], at(2, 11), at(2, 11)),
        "smtp": (1, ["report_daily"], [("report_daily", "send_mail")], at(3, 12), at(3, 12)),
        "gpu-quota": (1, ["train_model"], [("train_model", "fit")], at(5, 8), at(5, 8)),
    }
    assert r.totals.secret_uses == 7
    assert r.totals.distinct_secrets == 4


def test_usage_per_dag_and_matrix() -> None:
    r = report()
    got = {
        d.dag_id: (
            d.launches_requested,
            d.launches_allowed,
            d.launches_denied,
            d.secret_uses,
            d.secrets,
            d.tasks,
        )
        for d in r.dags
    }
    assert got == {
        "etl_orders": (3, 3, 0, 4, {"s3": 1, "warehouse": 3}, ["load"]),
        "etl_users": (1, 1, 0, 1, {"warehouse": 1}, ["extract"]),
        "report_daily": (2, 1, 1, 1, {"smtp": 1}, ["render", "send_mail"]),
        "train_model": (2, 1, 1, 1, {"gpu-quota": 1}, ["fit"]),
    }
    assert r.matrix["etl_orders"] == {"s3": 1, "warehouse": 3}
    assert (r.totals.launches_requested, r.totals.launches_allowed, r.totals.launches_denied) == (
        8,
        6,
        2,
    )


def test_denials_with_reasons() -> None:
    r = report()
    assert [(d.launch_id, d.dag_id, d.task_id, d.denied, d.reasons) for d in r.denials] == [
        ("L5", "train_model", "fit", ["ftp"], ["no grant of train_model covers ftp"]),
        ("D2", "report_daily", "render", ["smtp"], ["grant analytics/report covers tasks send*"]),
    ]


def test_unused_grants_are_proposed_for_removal() -> None:
    r = report()
    got = {g.grant_id: (g.unused_secrets, g.used_secrets, g.remove_grant) for g in r.unused_grants}
    assert got == {
        "ml/train": (["warehouse"], ["gpu-quota"], False),
        "ml/legacy": (["ftp"], [], True),  # its only use (A1) is after the window
    }
    legacy = next(g for g in r.unused_grants if g.grant_id == "ml/legacy")
    assert legacy.proposal.startswith("remove grant ml/legacy")
    assert r.totals.unused_grant_secrets == 2


def test_open_window_counts_the_later_use() -> None:
    r = compute_report(scenario(), GRANTS, window_start=WINDOW[0])
    assert {g.grant_id for g in r.unused_grants} == {"ml/train"}
    assert r.totals.secret_uses == 8


def test_first_time_uses() -> None:
    r = report()
    assert [(u.dag_id, u.secret, u.time) for u in r.first_time_uses] == [
        ("etl_orders", "s3", at(2, 11)),
        ("etl_users", "warehouse", at(3, 9)),
        ("report_daily", "smtp", at(3, 12)),
        ("train_model", "gpu-quota", at(5, 8)),
    ]  # not (etl_orders, warehouse): P1 used it before the window


def test_matched_grants_of_the_decision_beat_glob_matching() -> None:
    # L1's decision credits analytics/etl only; a broader grant of another team with
    # the same secret gets no credit from it, although its glob matches.
    extra = [*GRANTS, GrantRef("ops/all", "ops", "*", None, ("warehouse",))]
    events = launch(
        "L1",
        "etl_orders",
        "load",
        at(1, 10),
        ["warehouse"],
        matched={"warehouse": ["analytics/etl"]},
    )
    r = compute_report(events, extra, window_start=WINDOW[0], window_end=WINDOW[1])
    assert "ops/all" in {g.grant_id for g in r.unused_grants}
    r2 = compute_report(
        launch("X", "etl_orders", "load", at(1, 10), ["warehouse"]),
        extra,
        window_start=WINDOW[0],
        window_end=WINDOW[1],
    )
    assert "ops/all" not in {g.grant_id for g in r2.unused_grants}


@pytest.mark.parametrize(
    ("filters", "uses", "denials", "unused", "first"),
    [
        ({"team": "ml"}, {"gpu-quota": 1}, 0, {"ml/train", "ml/legacy"}, 1),
        ({"team": "analytics"}, {"warehouse": 4, "s3": 1, "smtp": 1}, 0, set(), 3),
        ({"secret": "warehouse"}, {"warehouse": 4}, 0, {"ml/train"}, 1),
        ({"dag": "etl_*"}, {"warehouse": 4, "s3": 1}, 0, set(), 2),
        ({"dag": "report_daily", "task": "send*"}, {"smtp": 1}, 0, set(), 1),
        ({"secret": "smtp"}, {"smtp": 1}, 1, set(), 1),
    ],
)
def test_filters(
    filters: dict[str, str], uses: dict[str, int], denials: int, unused: set[str], first: int
) -> None:
    r = report(**filters)
    assert {s.secret: s.uses for s in r.secrets} == uses
    assert len(r.denials) == denials
    assert {g.grant_id for g in r.unused_grants} == unused
    assert len(r.first_time_uses) == first


def test_secret_filter_narrows_a_grant_proposal() -> None:
    r = report(secret="warehouse")
    (train,) = r.unused_grants
    assert (train.unused_secrets, train.remove_grant) == (["warehouse"], False)
    assert train.proposal.startswith("remove warehouse from grant ml/train")


def test_timeline_buckets_by_day_across_the_window() -> None:
    r = report()
    assert r.timeline.bucket == "day"
    assert r.timeline.starts[0] == at(1) and len(r.timeline.starts) == 7
    assert r.timeline.series["warehouse"] == [1, 1, 1, 0, 0, 1, 0]
    assert sum(sum(v) for v in r.timeline.series.values()) == 7


def test_report_is_json_serialisable() -> None:
    data = json.loads(report().model_dump_json())
    assert data["totals"]["secret_uses"] == 7
    assert UsageReport.model_validate(data) == report()


def test_grant_refs_from_policy() -> None:
    policy = PolicySet(
        catalog={"wh": KvSecret(mount="secret", path="wh")},
        teams={
            "data": Team(grants=(Grant(id="etl", dags="etl_*", tasks="load", secrets=("wh",)),))
        },
    )
    assert grant_refs_from_policy(policy) == [
        GrantRef("data/etl", "data", "etl_*", "load", ("wh",))
    ]


def test_each_secret_lists_the_images_that_received_it() -> None:
    def run(launch_id: str, image: str, names: list[str], day: int) -> list[ev.AuditEvent]:
        t = TaskIdentity(dag_id="etl_daily", task_id="load", run_id=f"run-{launch_id}")
        return [
            ev.launch_requested(
                launch_id=launch_id,
                caller="sa:worker",
                task=t,
                secret_names=names,
                image=image,
                time=at(day),
            ),
            ev.secrets_resolved(
                launch_id=launch_id,
                caller="sa:worker",
                task=t,
                secrets=[{"name": n} for n in names],
                time=at(day, 1),
            ),
        ]

    events = [
        *run("a", "registry.local/etl@sha256:aa", ["warehouse"], 2),
        *run("b", "registry.local/etl@sha256:bb", ["warehouse", "s3"], 3),
        *run("c", "registry.local/etl@sha256:aa", ["s3"], 4),
    ]
    report = compute_report(events, GRANTS, window_start=WINDOW[0], window_end=WINDOW[1])
    images = {s.secret: s.images for s in report.secrets}
    assert images == {
        "warehouse": ["registry.local/etl@sha256:aa", "registry.local/etl@sha256:bb"],
        "s3": ["registry.local/etl@sha256:aa", "registry.local/etl@sha256:bb"],
    }
