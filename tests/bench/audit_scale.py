"""Audit trail scale: report (table, JSON, HTML) and verify time over a long signed
trail in SQLite, generated with the broker's own code (every record hashed, chained and
signed as the broker writes them).

The trail: launches of 40 DAGs spread evenly over ``days`` days, four events each
(launch_requested, decision, secrets_resolved, pod_created), so 10^5 events are 25,000
launches. Reports are asked for the last 7 days (the window a user looks at), for the
last 7 days as the Airflow page asks (HTML, the DAGs a user may read), and for the whole
trail; one task try as ``GET /v1/audit/launches`` reads it (its index range and its
launches' records); building that index over the whole trail (migration 4, once per
store); ``audit verify`` walks the whole chain."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, text

from broker.audit.render import render
from broker.audit.reporting import build_report
from broker.audit.store import open_audit_store
from broker.core import audit_events as ev
from broker.core.models import TaskIdentity
from broker.core.report import GrantRef, ReportFilters
from broker.core.timeline import TaskTry, task_try_audit

DAGS = 40
SECRETS = ("warehouse-readonly", "s3-reports", "orders-db", "tableau-token", "payments-api")
GRANTS = [
    GrantRef(f"team{i % 4}/g{i}", f"team{i % 4}", f"dag_{i}_*", None, (SECRETS[i % 5],))
    for i in range(DAGS)
]
EVENTS_PER_LAUNCH = 4


def _launch(n: int, when: datetime) -> list[ev.AuditEvent]:
    dag = f"dag_{n % DAGS}_daily"
    secret = SECRETS[n % DAGS % 5]
    task = TaskIdentity(dag_id=dag, task_id=f"t{n % 3}", run_id=f"r{n}", try_number=1)
    launch_id = f"bench{n:016d}"
    return [
        ev.launch_requested(
            launch_id=launch_id,
            caller="sa:worker",
            task=task,
            secret_names=[secret],
            namespace="tasks",
            image="python:3.12",
            time=when,
        ),
        ev.decision(
            launch_id=launch_id,
            caller="sa:worker",
            task=task,
            secret_names=[secret],
            allowed=True,
            matched_grants={secret: [GRANTS[n % DAGS].grant_id]},
            teams=[GRANTS[n % DAGS].team],
            time=when,
        ),
        ev.secrets_resolved(
            launch_id=launch_id,
            caller="sa:worker",
            task=task,
            secrets=[{"name": secret, "path": "secret/data/x", "keys": ["k"]}],
            teams=[GRANTS[n % DAGS].team],
            time=when + timedelta(milliseconds=20),
        ),
        ev.launch_event(
            ev.EventKind.POD_CREATED,
            launch_id=launch_id,
            task=task,
            caller="sa:worker",
            secret_names=[secret],
            namespace="tasks",
            pod=f"pod-{n}",
            time=when + timedelta(milliseconds=30),
        ),
    ]


@dataclass
class AuditScale:
    events: int
    generate_s: float
    db_mb: float
    reports: dict[str, float] = field(default_factory=dict)  # name -> seconds
    verify_s: float = 0.0
    verified: bool = False


def measure_audit(
    folder: Path, events: int, progress: Callable[[str], None], *, days: int = 365
) -> AuditScale:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"audit-{events}.db"
    path.unlink(missing_ok=True)
    key = Ed25519PrivateKey.generate()
    launches = events // EVENTS_PER_LAUNCH
    end = datetime.now(UTC).replace(microsecond=0)
    start = end - timedelta(days=days)
    step = (end - start) / max(launches, 1)
    with open_audit_store(f"sqlite:///{path}", key) as store:
        began = time.perf_counter()
        batch: list[ev.AuditEvent] = []
        for n in range(launches):
            batch += _launch(n, start + step * n)
            if len(batch) >= 2000:
                store.append_many(batch)
                batch = []
            if n and n % 50_000 == 0:
                progress(f"audit: {n * EVENTS_PER_LAUNCH} events written")
        if batch:
            store.append_many(batch)
        result = AuditScale(events, time.perf_counter() - began, path.stat().st_size / 2**20)
        week = end - timedelta(days=7)
        readable = ReportFilters(dag_ids=tuple(f"dag_{i}_daily" for i in range(0, DAGS, 2)))
        cases: list[tuple[str, str, datetime | None, ReportFilters | None]] = [
            ("last 7 days, table", "table", week, None),
            ("last 7 days, JSON", "json", week, None),
            ("last 7 days, HTML", "html", week, None),
            ("Airflow page (HTML, 7 days, 20 DAGs)", "html", week, readable),
            ("whole trail, JSON", "json", None, None),
        ]
        for name, fmt, since, filters in cases:
            began = time.perf_counter()
            render(build_report(store, GRANTS, since=since, filters=filters), fmt)
            result.reports[name] = time.perf_counter() - began
        middle = _launch(launches // 2, start)[0]
        task = TaskTry(
            dag_id=str(middle.dag_id), run_id=str(middle.run_id), task_id=str(middle.task_id)
        )
        began = time.perf_counter()
        page = store.task_try_records(task, limit=20)
        task_try_audit((r.event for r in page.records), task)
        result.reports["one task try (GET /v1/audit/launches)"] = time.perf_counter() - began
        began = time.perf_counter()
        result.verified = store.verify(key.public_key()).ok
        result.verify_s = time.perf_counter() - began
    result.reports["task index build (migration 4, once)"] = _rebuild_task_index(path, key)
    return result


def _rebuild_task_index(path: Path, key: Ed25519PrivateKey) -> float:
    """Seconds migration 4 takes on this trail: the index dropped, then the store
    opened again (which applies the migration)."""
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_audit_records_task"))
        conn.execute(text("DELETE FROM audit_schema WHERE version = 4"))
    engine.dispose()
    began = time.perf_counter()
    open_audit_store(f"sqlite:///{path}", key).close()
    return time.perf_counter() - began
