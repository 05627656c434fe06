"""The audit store on real SQLite files and the real PostgreSQL (fixture ``postgres``):
appends, migrations, tampering done with SQL straight to the database, concurrent
writers in separate processes, and an unavailable store."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import migrations
from broker.audit.chain import make_row
from broker.audit.keys import generate_signing_key, load_signing_key
from broker.audit.store import AuditStore, TaskTryPage, open_audit_store, task_launches_query
from broker.core import audit_events as ev
from broker.core.models import TaskIdentity
from broker.core.podmeta import VaultHoldings
from broker.core.timeline import TaskTry
from broker.errors import AuditUnavailableError, BrokerUnavailableError, InvalidRequestError
from podbroker_devstack.postgres import Postgres

PLANTED = "pl4nted-audit-S3CRET-7c1e"


def create_pg_database(postgres: Postgres, name: str) -> str:
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres.url(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path, unique: str) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/audit/audit.db"
    pg: Postgres = request.getfixturevalue("postgres")
    return create_pg_database(pg, f"audit_{unique}")


@pytest.fixture
def key(tmp_path: Path) -> Ed25519PrivateKey:
    return generate_signing_key(tmp_path / "keys" / "audit.key")


@pytest.fixture
def store(store_url: str, key: Ed25519PrivateKey) -> Iterator[AuditStore]:
    with open_audit_store(store_url, key) as s:
        yield s


def event(i: int) -> ev.AuditEvent:
    task = TaskIdentity(dag_id=f"dag_{i % 3}", task_id="t", run_id="r")
    return ev.launch_requested(
        launch_id=f"L{i}",
        caller="sa:worker",
        task=task,
        secret_names=["db"],
        time=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
    )


def fill(store: AuditStore, n: int = 6) -> None:
    for i in range(1, n + 1):
        store.append(event(i))


def sql(store_url: str, *statements: str, params: dict[str, object] | None = None) -> None:
    """Tamper with the database directly, as an attacker with DB access would."""
    engine = sa.create_engine(store_url)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement), params or {})
    engine.dispose()


def test_append_returns_chained_records_and_reads_back(
    store: AuditStore, key: Ed25519PrivateKey
) -> None:
    first = store.append(event(1))
    second = store.append(event(2))
    assert (first.position, second.position) == (1, 2)
    assert second.prev_hash == first.hash
    assert [r.event for r in store.records()] == [event(1), event(2)]
    assert [r.position for r in store.records(2)] == [2]
    assert [r.position for r in store.records(1, 2)] == [1]
    store.ping()
    result = store.verify(key.public_key())
    assert result.ok and result.records_checked == 2


def test_many_records_stream_in_batches(store: AuditStore, key: Ed25519PrivateKey) -> None:
    fill(store, 1003)  # more than two read batches
    assert sum(1 for _ in store.records()) == 1003
    assert store.verify(key.public_key()).records_checked == 1003


def test_values_never_reach_the_database(store: AuditStore, store_url: str) -> None:
    from broker.core.secret_value import SecretValue

    with pytest.raises(ValueError, match="SecretValue"):
        store.append(
            ev.launch_event(
                ev.EventKind.SECRET_CREATED, launch_id="L", payload={"db": SecretValue(PLANTED)}
            )
        )
    store.append(event(1))
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        dump = json.dumps([list(r) for r in conn.execute(sa.text("SELECT * FROM audit_records"))])
    engine.dispose()
    assert PLANTED not in dump


def test_unchanged_store_verifies_after_reopening_read_only(
    store: AuditStore, store_url: str, key: Ed25519PrivateKey
) -> None:
    fill(store)
    with open_audit_store(store_url, create=False) as ro:
        assert ro.verify(key.public_key()).ok
        with pytest.raises(AuditUnavailableError, match="without a signing key"):
            ro.append(event(9))


def test_changed_record_is_caught(
    store: AuditStore, store_url: str, key: Ed25519PrivateKey
) -> None:
    fill(store)
    sql(
        store_url,
        "UPDATE audit_records SET event_json = REPLACE(event_json, 'dag_0', 'dag_x') "
        "WHERE position = 3",
    )
    result = store.verify(key.public_key())
    assert (result.ok, result.first_break_position) == (False, 3)
    assert "changed" in (result.problem or "")


def test_deleted_record_is_caught(
    store: AuditStore, store_url: str, key: Ed25519PrivateKey
) -> None:
    fill(store)
    sql(store_url, "DELETE FROM audit_records WHERE position = 4")
    result = store.verify(key.public_key())
    assert (result.ok, result.first_break_position) == (False, 4)
    assert "deleted" in (result.problem or "")


def test_deleted_and_renumbered_records_are_caught(
    store: AuditStore, store_url: str, key: Ed25519PrivateKey
) -> None:
    fill(store)
    sql(
        store_url,
        "DELETE FROM audit_records WHERE position = 4",
        "UPDATE audit_records SET position = position - 1 WHERE position > 4",
        "UPDATE audit_head SET position = position - 1",
    )
    result = store.verify(key.public_key())
    assert (result.ok, result.first_break_position) == (False, 4)


def test_deleted_tail_is_caught(store: AuditStore, store_url: str, key: Ed25519PrivateKey) -> None:
    fill(store)
    sql(store_url, "DELETE FROM audit_records WHERE position >= 5")
    result = store.verify(key.public_key())
    assert (result.ok, result.first_break_position) == (False, 5)


def test_inserted_record_is_caught(
    store: AuditStore, store_url: str, key: Ed25519PrivateKey
) -> None:
    fill(store)
    # The attacker knows the format and links the forged record correctly, but signs
    # with a key of their own under the real key's id.
    rows = list(store.rows())
    forged = make_row(event(99), 3, rows[1].hash, Ed25519PrivateKey.generate())
    values = {**forged.__dict__, "key_id": rows[0].key_id}
    sql(
        store_url,
        "UPDATE audit_records SET position = position + 1000 WHERE position >= 3",
        "UPDATE audit_records SET position = position - 999 WHERE position > 1000",
        "INSERT INTO audit_records (position, time, kind, launch_id, dag_id, event_json, "
        "prev_hash, hash, signature, key_id) VALUES (:position, :time, :kind, :launch_id, "
        ":dag_id, :event_json, :prev_hash, :hash, :signature, :key_id)",
        "UPDATE audit_head SET position = position + 1",
        params=values,
    )
    result = store.verify(key.public_key())
    assert (result.ok, result.first_break_position) == (False, 3)
    assert "signature" in (result.problem or "")


def test_appended_forgery_past_the_head_is_caught(
    store: AuditStore, store_url: str, key: Ed25519PrivateKey
) -> None:
    fill(store)
    last = list(store.rows())[-1]
    forged = make_row(event(99), 7, last.hash, key)  # even with the real key
    sql(
        store_url,
        "INSERT INTO audit_records (position, time, kind, launch_id, dag_id, event_json, "
        "prev_hash, hash, signature, key_id) VALUES (:position, :time, :kind, :launch_id, "
        ":dag_id, :event_json, :prev_hash, :hash, :signature, :key_id)",
        params=dict(forged.__dict__),
    )
    result = store.verify(key.public_key())
    assert (result.ok, result.first_break_position) == (False, 7)
    assert "inserted" in (result.problem or "")


def test_reordered_records_are_caught(
    store: AuditStore, store_url: str, key: Ed25519PrivateKey
) -> None:
    fill(store)
    sql(
        store_url,
        "UPDATE audit_records SET position = 1000 WHERE position = 2",
        "UPDATE audit_records SET position = 2 WHERE position = 3",
        "UPDATE audit_records SET position = 3 WHERE position = 1000",
    )
    result = store.verify(key.public_key())
    assert (result.ok, result.first_break_position) == (False, 2)


def test_migrations_apply_once_and_a_newer_schema_is_refused(
    store_url: str, key: Ed25519PrivateKey
) -> None:
    open_audit_store(store_url, key).close()
    open_audit_store(store_url, key).close()  # idempotent
    engine = sa.create_engine(store_url)
    with engine.connect() as conn:
        versions = [r[0] for r in conn.execute(sa.text("SELECT version FROM audit_schema"))]
    engine.dispose()
    assert versions == [m.version for m in migrations.MIGRATIONS]
    sql(
        store_url,
        "INSERT INTO audit_schema (version, description, applied_at) VALUES (999, 'future', 'x')",
    )
    with pytest.raises(InvalidRequestError, match="newer than this podbroker"):
        open_audit_store(store_url, key)


def test_read_only_open_of_an_empty_database_is_refused(postgres: Postgres, unique: str) -> None:
    url = create_pg_database(postgres, f"empty_{unique}")
    with pytest.raises(InvalidRequestError, match="schema version 0"):
        open_audit_store(url, create=False)


def test_unreachable_postgres_raises_audit_unavailable(
    postgres: Postgres, key: Ed25519PrivateKey
) -> None:
    url = postgres.url("nowhere").replace(f":{postgres.port}/", ":1/")
    with pytest.raises(AuditUnavailableError) as info:
        open_audit_store(url, key)
    assert postgres.password not in str(info.value)


def test_store_going_away_fails_appends_and_ping(
    postgres: Postgres, unique: str, key: Ed25519PrivateKey
) -> None:
    name = f"gone_{unique}"
    store = open_audit_store(create_pg_database(postgres, name), key)
    store.append(event(1))
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    with pytest.raises(AuditUnavailableError, match="appending") as info:
        store.append(event(2))
    assert postgres.password not in str(info.value)
    with pytest.raises(AuditUnavailableError):
        store.ping()
    store.close()


WRITER = textwrap.dedent("""
    import sys
    from datetime import UTC, datetime
    from broker.audit.keys import load_signing_key
    from broker.audit.store import open_audit_store
    from broker.core import audit_events as ev

    url, key_path, name, count, go = sys.argv[1:6]
    store = open_audit_store(url, load_signing_key(key_path))
    import os, time
    open(go + "." + name, "w").close()  # ready
    while not os.path.exists(go):  # start together
        time.sleep(0.01)
    for i in range(int(count)):
        store.append(ev.launch_event(ev.EventKind.POD_CREATED, launch_id=f"{name}-{i}",
                                     pod=f"{name}-{i}"))
    store.close()
""")


def test_two_processes_appending_at_once_keep_one_chain(store_url: str, tmp_path: Path) -> None:
    key_path = tmp_path / "writer.key"
    key = generate_signing_key(key_path)
    open_audit_store(store_url, key).close()  # schema in place before the race
    go = tmp_path / "go"
    count = 200
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, store_url, str(key_path), name, str(count), str(go)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("A", "B")
    ]
    for name in ("A", "B"):  # both connected and waiting, then release them together
        ready = Path(f"{go}.{name}")
        while not ready.exists():
            assert procs[0].poll() in (None, 0) and procs[1].poll() in (None, 0)
            time.sleep(0.02)
    go.touch()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    with open_audit_store(store_url, create=False) as store:
        result = store.verify(load_signing_key(key_path).public_key())
        launches = [r.event.launch_id for r in store.records()]
    assert result.ok, result.summary()
    assert result.records_checked == 2 * count
    assert sorted(launches) == sorted(f"{n}-{i}" for n in "AB" for i in range(count))
    if store_url.startswith("postgresql"):
        # Interleaved, not one after the other: the writers really raced. (SQLite's busy
        # handler is not fair, one writer may legitimately take every turn.)
        owners = [lid.split("-")[0] for lid in launches if lid]
        assert sum(1 for a, b in itertools.pairwise(owners) if a != b) > 1


def test_append_many_chains_events_in_one_transaction(
    store: AuditStore,
    key: Ed25519PrivateKey,
) -> None:
    fill(store, 2)
    records = store.append_many([event(10), event(11), event(12)])
    assert [r.position for r in records] == [3, 4, 5]
    assert records[1].prev_hash == records[0].hash
    assert records[2].prev_hash == records[1].hash
    assert store.last_position() == 5
    result = store.verify(key.public_key())
    assert result.ok, result.summary()
    with pytest.raises(TypeError):
        store.append_many([])


def test_concurrent_appends_share_commits_and_keep_each_callers_events_together(
    store: AuditStore, key: Ed25519PrivateKey
) -> None:
    """Group commit on the real database: 48 callers at once, three events each; the
    chain verifies, every caller's events are contiguous and in order, and the appends
    took fewer transactions than callers (they were grouped, not queued one by one)."""
    callers = 48
    barrier = threading.Barrier(callers)

    def append(n: int) -> list[int]:
        barrier.wait()
        records = store.append_many([event(n * 10 + i) for i in range(3)])
        return [r.position for r in records]

    with ThreadPoolExecutor(callers) as pool:
        positions = list(pool.map(append, range(callers)))
    for own in positions:
        assert own == list(range(own[0], own[0] + 3))
    assert sorted(p for own in positions for p in own) == list(range(1, 3 * callers + 1))
    assert store._writer.transactions < callers
    result = store.verify(key.public_key())
    assert result.ok, result.summary()


# -- the events of one task try: pages over an index (GET /v1/audit/launches) ----------


def task_launch(
    launch_id: str, dag: str, run: str, task: str, try_number: int, minute: int, map_index: int = -1
) -> list[ev.AuditEvent]:
    """A launch's events: requested (naming the task), then a cleanup naming no task."""
    identity = TaskIdentity(
        dag_id=dag, task_id=task, run_id=run, try_number=try_number, map_index=map_index
    )
    when = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(minutes=minute)
    return [
        ev.launch_requested(
            launch_id=launch_id, caller="sa:w", task=identity, secret_names=["db"], time=when
        ),
        ev.launch_event(
            ev.EventKind.SECRET_DELETED,
            launch_id=launch_id,
            time=when + timedelta(seconds=30),
            namespace="ns",
            secret="s",
        ),
    ]


def fill_tasks(store: AuditStore) -> None:
    minute = itertools.count()
    for i in range(5):  # five tries of etl/r1/load, with noise in between
        store.append_many(task_launch(f"T{i}", "etl", "r1", "load", i + 1, next(minute)))
        store.append_many(task_launch(f"O{i}", "etl", "r1", "other", 1, next(minute)))
        store.append_many(task_launch(f"R{i}", "etl", "r2", "load", 1, next(minute)))
        store.append_many(task_launch(f"M{i}", "etl", "r1", "load", 1, next(minute), map_index=i))
        store.append_many(task_launch(f"D{i}", "etl2", "r1", "load", 1, next(minute)))


def test_a_task_trys_launches_come_in_pages(store: AuditStore) -> None:
    fill_tasks(store)
    task = TaskTry(dag_id="etl", run_id="r1", task_id="load")
    seen, after, pages = [], 0, 0
    while True:
        page = store.task_try_records(task, limit=2, after=after)
        pages += 1
        seen += page.launch_ids
        # Every record of the page's launches, the cleanup that names no task included.
        assert sorted({r.event.launch_id for r in page.records}) == sorted(page.launch_ids)
        assert len(page.records) == 2 * len(page.launch_ids)
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == ["T0", "T1", "T2", "T3", "T4"] and pages == 3

    one_try = store.task_try_records(task.model_copy(update={"try_number": 4}), limit=10)
    assert one_try.launch_ids == ["T3"] and one_try.next_after is None
    mapped = store.task_try_records(task.model_copy(update={"map_index": 2}), limit=10)
    assert mapped.launch_ids == ["M2"]
    # T3 was requested at minute 15 (five launches per round): since keeps T3 and T4.
    since = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(minutes=15)
    assert store.task_try_records(task, limit=10, since=since).launch_ids == ["T3", "T4"]
    nothing = TaskTry(dag_id="etl", run_id="nope", task_id="load")
    assert store.task_try_records(nothing, limit=10) == TaskTryPage([], [], None)


def explain(store_url: str, query: str, params: dict[str, object]) -> str:
    engine = sa.create_engine(store_url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # A tiny table is read whole whatever the indexes: ask whether the index
                # CAN serve the query.
                conn.execute(sa.text("SET enable_seqscan = off"))
                rows = conn.execute(sa.text(f"EXPLAIN {query}"), params)
            else:
                rows = conn.execute(sa.text(f"EXPLAIN QUERY PLAN {query}"), params)
            return "\n".join(str(tuple(r)) for r in rows)
    finally:
        engine.dispose()


@pytest.mark.parametrize("try_number", [None, 2])
def test_the_task_query_reads_the_task_index(
    store: AuditStore, store_url: str, try_number: int | None
) -> None:
    fill_tasks(store)
    dialect = sa.make_url(store_url).get_backend_name()
    query = task_launches_query(dialect, try_number=try_number is not None, since=True)
    params: dict[str, object] = {
        "dag": "etl",
        "run": "r1",
        "task": "load",
        "map": -1,
        "after": 0,
        "limit": 3,
        "since": "2026-01-01T00:00:00.000000Z",
        "try": try_number,
    }
    plan = explain(store_url, query, params)
    assert "ix_audit_records_task" in plan, plan
    assert "SCAN audit_records" not in plan and "Seq Scan" not in plan, plan


def test_the_task_index_is_built_over_a_trail_written_before_it(
    store: AuditStore, store_url: str, key: Ed25519PrivateKey
) -> None:
    """Migration 4 on a store at version 3 that already holds events."""
    fill_tasks(store)
    store.close()
    sql(
        store_url,
        "DROP INDEX ix_audit_records_task",
        "DELETE FROM audit_schema WHERE version = 4",
    )
    with open_audit_store(store_url, key) as reopened:
        task = TaskTry(dag_id="etl", run_id="r1", task_id="load")
        assert reopened.task_try_records(task, limit=10).launch_ids == [f"T{i}" for i in range(5)]
    dialect = sa.make_url(store_url).get_backend_name()
    query = task_launches_query(dialect, try_number=False, since=False)
    params = {"dag": "etl", "run": "r1", "task": "load", "map": -1, "after": 0, "limit": 3}
    assert "ix_audit_records_task" in explain(store_url, query, params)


def test_ledger_writes_join_the_audit_writers_groups(
    store: AuditStore, key: Ed25519PrivateKey
) -> None:
    """The holdings ledger writes through the audit writer: appends and ledger writes
    from 48 callers at once share transactions (beside the writer, in transactions of
    their own, ledger writes queued on SQLite's write lock), and every write lands."""
    callers = 48
    ledger = store.holdings()
    barrier = threading.Barrier(callers)

    def work(n: int) -> None:
        barrier.wait()
        if n % 2:
            store.append_many([event(n)], opens=(f"L{n}", "tasks"))
        else:
            ledger.hold(f"L{n}", "tasks", token_accessor=f"acc-{n}", lease_ids=[f"lease-{n}"])
            ledger.released(f"L{n}")

    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(work, range(callers)))
    assert store._writer.transactions < callers + callers // 2
    held = {h.launch_id for h in ledger.unreleased()}
    assert held == {f"L{n}" for n in range(1, callers, 2)}  # opened, holding nothing yet
    assert all(ledger.held(f"L{n}") is None for n in range(0, callers, 2))  # released
    assert store.verify(key.public_key()).ok


def test_one_attempt_of_a_launch_at_a_time(store: AuditStore, key: Ed25519PrivateKey) -> None:
    """Opening a launch whose row is still open is refused, retryably, and changes
    nothing (its events are not written either); a row given back starts afresh. Two
    attempts at once, in one group or in two, get one opening between them."""
    ledger = store.holdings()
    store.append_many([event(1)], opens=("L1", "tasks"))
    ledger.hold("L1", "tasks", token_accessor="acc-first", lease_ids=["lease-first"])
    before = store.last_position()
    with pytest.raises(BrokerUnavailableError, match="still launching"):
        store.append_many([event(2)], opens=("L1", "tasks"))
    assert store.last_position() == before
    assert ledger.held("L1") == VaultHoldings(("lease-first",), "acc-first")

    ledger.released("L1")
    store.append_many([event(3)], opens=("L1", "tasks"))
    assert ledger.held("L1") == VaultHoldings()  # afresh: nothing of the first attempt

    barrier = threading.Barrier(8)

    def race(n: int) -> bool:
        barrier.wait()
        try:
            store.append_many([event(10 + n)], opens=("L-raced", "tasks"))
        except BrokerUnavailableError:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(race, range(8))) == 1
    assert store.verify(key.public_key()).ok


def test_a_clean_ups_records_and_its_release_are_durable_together(
    store: AuditStore, key: Ed25519PrivateKey
) -> None:
    """``releases`` closes the launch's row in the records' own transaction; when that
    transaction fails nothing is written and the row stays open for the sweep (a broker
    killed between undoing and recording used to leave a closed row and no records)."""
    ledger = store.holdings()
    store.append_many([event(1)], opens=("L-done", "tasks"))
    ledger.hold("L-done", "tasks", token_accessor="acc-done", lease_ids=["lease-done"])
    store.append_many([event(2)], opens=("L-clash", "tasks"))
    before = store.last_position()
    # One request that fails as a whole: it would also reopen a launch that is open.
    with pytest.raises(BrokerUnavailableError):
        store.append_many([event(3)], opens=("L-clash", "tasks"), releases=["L-done"])
    assert store.last_position() == before
    assert ledger.held("L-done") == VaultHoldings(("lease-done",), "acc-done")  # still open
    store.append_many([event(4), event(5)], releases=["L-done"])
    assert store.last_position() == before + 2
    assert ledger.held("L-done") is None
    assert "L-done" not in {held.launch_id for held in ledger.unreleased()}
    assert store.verify(key.public_key()).ok
