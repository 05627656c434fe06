"""The audit store: one interface over SQLite (default) and PostgreSQL (several replicas).

Appends are serialised so that concurrent writers (threads, processes, replicas) build
one unbroken chain: PostgreSQL locks the chain-head row (``SELECT ... FOR UPDATE``),
SQLite takes the write lock up front (``BEGIN IMMEDIATE``). Within one process the
appends queued together are written in one transaction by one writer thread (group
commit, ``broker/audit/group_commit.py``). An append is committed (durable) before it
returns; any database failure becomes
:class:`~broker.errors.AuditUnavailableError`, and the caller must not go on with the
action the event describes.

Every statement is bounded: SQLite waits at most ``BUSY_TIMEOUT`` for the write lock;
PostgreSQL connects within ``CONNECT_TIMEOUT``, and the server cancels a statement after
``STATEMENT_TIMEOUT`` or a lock wait after ``LOCK_TIMEOUT``. A frozen server enforces
nothing, so each operation also runs on a worker thread the caller waits for at most
``DEADLINE``; an append given up on is rolled back, never committed later.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from broker.audit import migrations
from broker.audit.chain import (
    AuditRecord,
    ChainHead,
    StoredRow,
    VerifyResult,
    make_row,
    sign_head,
    verify_rows,
)
from broker.audit.group_commit import AbandonedError, GroupCommitter, Pending
from broker.audit.holdings import HoldingsLedger, open_launch, release_launch
from broker.audit.keys import key_id
from broker.core.audit_events import AuditEvent, AuditEventError, format_time
from broker.core.timeline import TaskTry
from broker.errors import AuditUnavailableError, InvalidRequestError

_BATCH: Final = 500
BUSY_TIMEOUT: Final = 5.0
CONNECT_TIMEOUT: Final = 3
STATEMENT_TIMEOUT_MS: Final = 5000
LOCK_TIMEOUT_MS: Final = 3000
POOL_TIMEOUT: Final = 3.0
DEADLINE: Final = 8.0
"""Longest a caller waits for one audit-store operation, whatever the database does."""
_COLUMNS: Final = (
    "position, time, kind, launch_id, dag_id, event_json, prev_hash, hash, signature, key_id"
)

T = TypeVar("T")


@dataclass(frozen=True)
class _Append:
    """One caller's events, the launch they open in the holdings ledger (if any) and
    the launches they mark given back."""

    events: tuple[AuditEvent, ...]
    opens: tuple[str, str] | None
    releases: tuple[str, ...] = ()


@dataclass(frozen=True)
class _LedgerWrite:
    """A holdings-ledger write, run in the writer's transaction (its result returned)."""

    op: Callable[[Connection], Any]


_Request = _Append | _LedgerWrite


def _request_specific(exc: Exception) -> bool:
    """A failure one request's data may cause (worth retrying the group one by one);
    not a database that is unreachable, locked or out of time."""
    return not isinstance(exc, OperationalError | InterfaceError | TimeoutError)


@dataclass(frozen=True)
class TaskTryPage:
    """One page of a task try's launches: every record of ``launch_ids`` (position
    order); ``next_after`` is the position to continue after (None: last page)."""

    records: list[AuditRecord]
    launch_ids: list[str]
    next_after: int | None


def _make_engine(url: str, create: bool) -> tuple[Engine, str]:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InvalidRequestError(f"audit store URL is not a database URL: {exc}") from None
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise InvalidRequestError("audit store: SQLite needs a file (sqlite:///path/audit.db)")
        path = Path(parsed.database)
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.exists():
            raise InvalidRequestError(f"audit store {shown}: no such file")
        # NullPool: each operation opens the file afresh; safe across fork and threads.
        engine = create_engine(parsed, poolclass=NullPool, connect_args={"timeout": BUSY_TIMEOUT})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's begin event (below) issue BEGIN itself.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")  # committed means on disk
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("podbroker_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    elif backend == "postgresql":
        engine = create_engine(
            parsed,
            pool_pre_ping=True,
            pool_size=2,
            max_overflow=4,
            pool_timeout=POOL_TIMEOUT,
            connect_args={
                "connect_timeout": CONNECT_TIMEOUT,
                "options": (
                    f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}"
                ),
            },
        )
    else:
        raise InvalidRequestError(
            f"audit store {shown}: only sqlite:/// and postgresql+psycopg:// URLs are supported"
        )
    return engine, shown


class AuditStore:
    """Append-only, hash-chained, signed event log. Use :func:`open_audit_store`."""

    def __init__(
        self,
        engine: Engine,
        shown_url: str,
        signing_key: Ed25519PrivateKey | None,
        *,
        deadline: float = DEADLINE,
    ) -> None:
        self._engine = engine
        self.url = shown_url  # password hidden
        self._key = signing_key
        self.deadline = deadline
        self._workers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="audit-store")
        self._writer: GroupCommitter[_Request, Any] = GroupCommitter(
            self._write_group, "audit-writer", one_by_one=_request_specific
        )

    def _bounded(self, doing: str, work: Callable[[threading.Event], T]) -> T:
        """``work(abandoned)`` on a worker thread, waited for at most ``deadline``.
        Past it, ``abandoned`` is set (an append then rolls back) and the caller gets
        :class:`AuditUnavailableError` while the worker finishes on its own."""
        abandoned = threading.Event()
        future = self._workers.submit(work, abandoned)
        try:
            return future.result(timeout=self.deadline)
        except FutureTimeout:
            abandoned.set()
            future.cancel()
            raise AuditUnavailableError(
                f"audit store {self.url} did not answer within {self.deadline:g}s while {doing}"
            ) from None

    def _unavailable(self, exc: BaseException, doing: str) -> AuditUnavailableError:
        # Name the failure class only: driver messages can quote parameters.
        cause = type(getattr(exc, "orig", None) or exc).__name__
        return AuditUnavailableError(f"audit store {self.url} unavailable while {doing} ({cause})")

    def _write(self) -> Connection:
        return self._engine.connect().execution_options(podbroker_write=True)

    def append(self, event: AuditEvent) -> AuditRecord:
        """INSERT the next record and UPDATE the chain head in one committed transaction."""
        return self.append_many([event])[0]

    def append_many(
        self,
        events: Sequence[AuditEvent],
        *,
        opens: tuple[str, str] | None = None,
        releases: Sequence[str] = (),
    ) -> list[AuditRecord]:
        """Append several events, chained in order, in ONE committed transaction: all are
        durable or none is. Saves a commit per event on a launch's critical path.
        ``opens=(launch_id, namespace)`` also opens the launch's row in the holdings
        ledger in the same transaction: a launch whose intent is recorded is always found
        by the sweep, whatever happens to the broker next. ``releases`` marks those
        launches' rows given back in the same transaction: a clean-up's records and its
        release are durable together, so a broker killed before the commit leaves the
        row open and the sweep does the clean-up (and its records) again."""
        if self._key is None:
            raise AuditUnavailableError(
                f"audit store {self.url} was opened without a signing key; it cannot record events"
            )
        if not events or not all(isinstance(event, AuditEvent) for event in events):
            raise TypeError("append_many takes a non-empty sequence of AuditEvent")
        try:
            rows: list[StoredRow] = self._write_through(
                _Append(tuple(events), opens, tuple(releases)), "appending"
            )
        except SQLAlchemyError as exc:
            raise self._unavailable(exc, "appending") from exc
        return [
            AuditRecord(
                position=row.position,
                event=event,
                prev_hash=row.prev_hash,
                hash=row.hash,
                signature=row.signature,
                key_id=row.key_id,
            )
            for row, event in zip(rows, events, strict=True)
        ]

    def _write_through(self, request: _Request, doing: str) -> Any:
        """``request`` written by the writer thread in its next group, waited for at
        most ``deadline``; past it the request is left out (never committed later)."""
        pending = self._writer.submit(request)
        try:
            return pending.result.result(timeout=self.deadline)
        except FutureTimeout:
            pending.abandoned.set()
            raise AuditUnavailableError(
                f"audit store {self.url} did not answer within {self.deadline:g}s while {doing}"
            ) from None

    def _write_group(self, group: Sequence[Pending[_Request, Any]]) -> list[Any]:
        """Every request of ``group`` in ONE committed transaction: the appends chained
        in order (the chain head read and moved once), then the ledger writes."""
        appends = [p.payload for p in group if isinstance(p.payload, _Append)]
        results: dict[int, Any] = {}
        with self._write() as conn, conn.begin():
            if appends:
                chained = iter(self._chain(conn, appends))
                for n, pending in enumerate(group):
                    if isinstance(pending.payload, _Append):
                        results[n] = next(chained)
            for n, pending in enumerate(group):
                if isinstance(pending.payload, _LedgerWrite):
                    results[n] = pending.payload.op(conn)
            if any(pending.abandoned.is_set() for pending in group):
                raise AbandonedError  # a caller already answered "unavailable"
        return [results[n] for n in range(len(group))]

    def _chain(self, conn: Connection, appends: Sequence[_Append]) -> list[list[StoredRow]]:
        """Insert ``appends``' events after the chain head, in order, and move the head."""
        if self._key is None:
            raise AuditUnavailableError(f"audit store {self.url} has no signing key")
        key = self._key
        head = conn.execute(
            text(
                "SELECT position, hash FROM audit_head WHERE id = 1"  # noqa: S608 (constants)
                + (" FOR UPDATE" if conn.dialect.name == "postgresql" else "")
            )
        ).one()
        position, previous = int(head.position), str(head.hash)
        chained: list[list[StoredRow]] = []
        for append in appends:
            rows = []
            for audit_event in append.events:
                position += 1
                row = make_row(audit_event, position, previous, key)
                previous = row.hash
                rows.append(row)
            chained.append(rows)
        conn.execute(
            text(
                f"INSERT INTO audit_records ({_COLUMNS}) VALUES (:position, :time, :kind, "  # noqa: S608
                ":launch_id, :dag_id, :event_json, :prev_hash, :hash, :signature, :key_id)"
            ),
            [row.__dict__ for rows in chained for row in rows],
        )
        last = chained[-1][-1]
        conn.execute(
            text(
                "UPDATE audit_head SET position = :p, hash = :h, "
                "signature = :s, key_id = :k WHERE id = 1"
            ),
            {
                "p": last.position,
                "h": last.hash,
                "s": sign_head(key, last.position, last.hash),
                "k": last.key_id,
            },
        )
        for append in appends:
            if append.opens is not None:
                open_launch(conn, *append.opens)
            for launch_id in append.releases:
                release_launch(conn, launch_id)
        return chained

    def ping(self) -> None:
        """SELECT the schema version; raise AuditUnavailableError if unreachable or unready."""

        def check(_: threading.Event) -> int:
            with self._engine.connect() as conn:
                return migrations.check_version(conn)

        try:
            version = self._bounded("pinging", check)
        except SQLAlchemyError as exc:
            raise self._unavailable(exc, "pinging") from exc
        except migrations.SchemaError as exc:
            raise AuditUnavailableError(f"audit store {self.url}: {exc}") from exc
        if version < migrations.LATEST:
            raise AuditUnavailableError(
                f"audit store {self.url}: schema version {version}, "
                f"needs {migrations.LATEST} (run the migrations)"
            )

    def head(self) -> ChainHead | None:
        def read(_: threading.Event) -> Any:
            with self._engine.connect() as conn:
                return conn.execute(
                    text("SELECT position, hash, signature, key_id FROM audit_head WHERE id = 1")
                ).first()

        try:
            row = self._bounded("reading the chain head", read)
        except SQLAlchemyError as exc:
            raise self._unavailable(exc, "reading the chain head") from exc
        if row is None:
            return None
        return ChainHead(int(row.position), str(row.hash), str(row.signature), str(row.key_id))

    def last_position(self) -> int:
        head = self.head()
        return 0 if head is None else head.position

    def rows(self, start: int = 0, end: int | None = None) -> Iterator[StoredRow]:
        """Stored rows with ``start <= position < end``, in position order, in batches
        (keyset pagination: no cursor is held open between batches)."""
        where, params = "", {}
        if end is not None:
            where, params = "position < :end", {"end": end}
        return self._rows_after(start - 1, where, params, "reading records")

    def _rows_after(
        self,
        after: int,
        where: str,
        params: dict[str, Any],
        doing: str,
        *,
        first_batch: int = _BATCH,
    ) -> Iterator[StoredRow]:
        """The one windowed read: rows past position ``after`` matching ``where`` (SQL
        over constants and ``params``; empty: every row), in position order, in batches
        of ``first_batch`` then :data:`_BATCH` (keyset pagination on the primary key: no
        cursor is held open between batches, each batch is bounded by ``deadline``)."""
        condition = f" AND {where}" if where else ""
        query = (
            f"SELECT {_COLUMNS} FROM audit_records WHERE position > :after{condition} "  # noqa: S608 (constants)
            "ORDER BY position LIMIT :limit"
        )
        limit = first_batch
        while True:
            batch = self._fetch_rows(query, {**params, "after": after, "limit": limit}, doing)
            for row in batch:
                yield _stored(row)
            if len(batch) < limit:
                return
            after, limit = int(batch[-1].position), _BATCH

    def _rows_of_launches(
        self, launch_ids: Iterable[str], where: str, params: dict[str, Any], doing: str
    ) -> Iterator[StoredRow]:
        """Rows of these launches matching ``where`` (launch_id index), in position order
        within each batch of :data:`_BATCH` ids."""
        ids = sorted(set(launch_ids))
        condition = f" AND {where}" if where else ""
        for i in range(0, len(ids), _BATCH):
            chunk = ids[i : i + _BATCH]
            marks = ", ".join(f":id{n}" for n in range(len(chunk)))
            batch = self._fetch_rows(
                f"SELECT {_COLUMNS} FROM audit_records WHERE launch_id IN ({marks}){condition} "  # noqa: S608
                "ORDER BY position",
                {**params, **{f"id{n}": v for n, v in enumerate(chunk)}},
                doing,
            )
            for row in batch:
                yield _stored(row)

    def _fetch_rows(self, sql: str, params: dict[str, Any], doing: str) -> list[Any]:
        query = text(sql)

        def fetch(_: threading.Event) -> Any:
            with self._engine.connect() as conn:
                return conn.execute(query, params).all()

        try:
            return list(self._bounded(doing, fetch))
        except SQLAlchemyError as exc:
            raise self._unavailable(exc, doing) from exc

    def records_between(
        self, since: datetime | None, until: datetime | None
    ) -> Iterator[AuditRecord]:
        """Records with ``since <= time < until``, in position order. The time index
        gives the window's position range; only that range is read, so the cost grows
        with the window, not with the trail."""
        where, params = _time_bounds(since, until)
        found = self._fetch_rows(
            f"SELECT MIN(position) AS lo, MAX(position) AS hi FROM audit_records {where}",  # noqa: S608
            params,
            "finding a time window",
        )
        lo, hi = found[0] if found else (None, None)
        if lo is None or hi is None:
            return
        low, high = params.get("since"), params.get("until")
        for row in self.rows(int(lo), int(hi) + 1):
            # The stored time is format_time's spelling: compared as text, before parsing.
            if (low is None or row.time >= low) and (high is None or row.time < high):
                yield _record(row)

    def records_of_launches(
        self, launch_ids: Iterable[str], before: datetime
    ) -> Iterator[AuditRecord]:
        """Records of these launches older than ``before`` (launch_id index)."""
        rows = self._rows_of_launches(
            launch_ids,
            "time < :before",
            {"before": format_time(before)},
            "reading records of launches",
        )
        for row in rows:
            yield _record(row)

    def records_of_dag(self, dag_id: str, kind: str, before: datetime) -> Iterator[AuditRecord]:
        """Records of one DAG and kind older than ``before``, oldest first, in batches
        (dag_id index); the caller may stop early, so the first batch is small."""
        rows = self._rows_after(
            0,
            "dag_id = :dag AND kind = :kind AND time < :before",
            {"dag": dag_id, "kind": kind, "before": format_time(before)},
            "reading records of a DAG",
            first_batch=20,
        )
        for row in rows:
            yield _record(row)

    def task_try_records(
        self,
        task: TaskTry,
        *,
        limit: int,
        after: int = 0,
        since: datetime | None = None,
    ) -> TaskTryPage:
        """The records of the next ``limit`` launches of one task try (every try when
        ``task.try_number`` is None), oldest first: launches whose first event of the
        try is past position ``after`` (and at or after ``since``). Two index reads:
        the try's own events (``ix_audit_records_task``: DAG, run, task, map index) give
        the launch ids, then every record of those launches (launch_id index), which
        includes their cleanup events that name no task. The caller matches the parsed
        events again (the index expressions only narrow the read)."""
        params: dict[str, Any] = {
            "dag": task.dag_id,
            "run": task.run_id,
            "task": task.task_id,
            "map": task.map_index,
            "after": after,
            "limit": limit + 1,
        }
        if task.try_number is not None:
            params["try"] = task.try_number
        if since is not None:
            params["since"] = format_time(since)
        query = task_launches_query(
            self._engine.dialect.name, try_number="try" in params, since=since is not None
        )
        found = self._fetch_rows(query, params, "finding the launches of a task")
        page = found[:limit]
        launch_ids = [str(r.launch_id) for r in page]
        more = int(page[-1].first) if len(found) > limit else None
        rows = self._rows_of_launches(launch_ids, "", {}, "reading records of launches")
        return TaskTryPage([_record(row) for row in rows], launch_ids, more)

    def records(self, start: int = 0, end: int | None = None) -> Iterator[AuditRecord]:
        """Records with ``start <= position < end`` (positions start at 1)."""
        for row in self.rows(start, end):
            yield _record(row)

    def events(self) -> Iterator[AuditEvent]:
        for record in self.records():
            yield record.event

    def verify(self, public_key: Ed25519PublicKey | Iterable[Ed25519PublicKey]) -> VerifyResult:
        """Walk the whole chain; ``public_key`` may be several (key rotation)."""
        keys = [public_key] if isinstance(public_key, Ed25519PublicKey) else list(public_key)
        head = self.head()
        return verify_rows(self.rows(), head, keys)

    def holdings(self) -> HoldingsLedger:
        """The ledger of what launches hold in Vault, in this store's database."""
        return HoldingsLedger(
            self._engine,
            self.url,
            bounded=lambda doing, work: self._bounded(doing, lambda _abandoned: work()),
            # Its writes join the audit writer's groups: beside them, in transactions of
            # their own, they queued on SQLite's write lock (the cleanup profile showed it).
            writer=lambda doing, op: self._write_through(_LedgerWrite(op), doing),
        )

    @property
    def signing_key_id(self) -> str | None:
        return None if self._key is None else key_id(self._key.public_key())

    def close(self) -> None:
        self._writer.close()
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._engine.dispose()

    def __enter__(self) -> AuditStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_audit_store(
    url: str, signing_key: Ed25519PrivateKey | None = None, *, create: bool = True
) -> AuditStore:
    """Connect and bring the schema up to date (``create=True``) or check it is current.

    ``url``: ``sqlite:///path/audit.db`` or ``postgresql+psycopg://user:pw@host/db``.
    Without ``signing_key`` the store is read-only (verify, report, export)."""
    engine, shown = _make_engine(url, create)
    try:
        if create:
            with engine.connect().execution_options(podbroker_write=True) as conn, conn.begin():
                migrations.migrate(conn)
        else:
            with engine.connect() as conn:
                version = migrations.check_version(conn)
            if version < migrations.LATEST:
                raise InvalidRequestError(
                    f"audit store {shown}: schema version {version}, expected {migrations.LATEST}"
                )
    except SQLAlchemyError as exc:
        engine.dispose()
        cause = type(getattr(exc, "orig", None) or exc).__name__
        raise AuditUnavailableError(
            f"audit store {shown} unavailable while opening ({cause})"
        ) from exc
    except migrations.SchemaError as exc:
        engine.dispose()
        raise InvalidRequestError(f"audit store {shown}: {exc}") from exc
    except BaseException:
        engine.dispose()
        raise
    return AuditStore(engine, shown, signing_key)


def task_launches_query(dialect: str, *, try_number: bool, since: bool) -> str:
    """The launches of one task try, each with the position of its first event there:
    parameters ``dag``, ``run``, ``task``, ``map``, ``after``, ``limit`` (and ``try``,
    ``since``). Its WHERE spells the index expressions of ``ix_audit_records_task``
    exactly, so the database reads that task's index range only."""
    run, task_id, map_index, try_expr = migrations.task_expressions(dialect)
    extra = f" AND {try_expr} = :try" if try_number else ""
    extra += " AND time >= :since" if since else ""
    return (
        "SELECT launch_id, MIN(position) AS first FROM audit_records "  # noqa: S608 (constants)
        f"WHERE dag_id = :dag AND ({run}) = :run AND ({task_id}) = :task "
        f"AND ({map_index}) = :map AND launch_id IS NOT NULL{extra} "
        "GROUP BY launch_id HAVING MIN(position) > :after ORDER BY first LIMIT :limit"
    )


def _time_bounds(since: datetime | None, until: datetime | None) -> tuple[str, dict[str, Any]]:
    clauses, params = [], {}
    if since is not None:
        clauses.append("time >= :since")
        params["since"] = format_time(since)
    if until is not None:
        clauses.append("time < :until")
        params["until"] = format_time(until)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def _stored(r: Any) -> StoredRow:
    return StoredRow(
        int(r.position),
        r.time,
        r.kind,
        r.launch_id,
        r.dag_id,
        r.event_json,
        str(r.prev_hash),
        str(r.hash),
        r.signature,
        r.key_id,
    )


def _record(row: StoredRow) -> AuditRecord:
    try:
        return AuditRecord.from_row(row)
    except (ValueError, ValidationError, AuditEventError) as exc:
        raise InvalidRequestError(
            f"audit record {row.position} is unreadable; run `podbroker audit verify`"
        ) from exc
