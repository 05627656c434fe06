"""The secret-usage report, computed from audit events (pure: no I/O).

Definitions the numbers follow:

- A **use** of secret S is a ``secrets_resolved`` event naming S (Vault was read for a
  launch); repeated events for the same launch and secret count once.
- The **window** is ``window_start <= time < window_end`` (either side may be open).
  Usage, denials, per-DAG figures and unused grants look inside the window only;
  first-time uses look at all events given to decide "never before".
- **Filters** (``team``, ``dag``, ``task``, ``secret``; the last three accept globs)
  narrow every section, and so do the reader's scope (``dag_scope``: the DAG globs its
  ``callers`` rules give it; None for a report reader) and ``dag_ids`` (exact ids, e.g.
  the DAGs an Airflow user may read). A grant shows when its DAG glob lies inside them.
- **Refused requests** (``request_refused``: 401, 403 out of scope, 413, 415, 422, a log
  read the leak guard refused (409), each counted) are listed among the denials for an
  unscoped reader without filters only: they name no DAG. An event belongs to a team
  when the team is among the event's ``teams``, or, when the event names no team, when
  one of that team's grants covers its DAG, task and secret.
- A grant's secret is **used** when a use in the window is credited to it: the launch's
  ``decision`` event lists the grant for that secret in ``matched_grants``
  (secret -> grant ids), or, when the decision did not say, the grant's globs match the
  use's DAG and task (and its team is the use's team, if the use names teams).
  Grants (or secrets of grants) never credited are proposed for removal.
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from broker.core.audit_events import AuditEvent, EventKind
from broker.core.policy import PolicySet


@dataclass(frozen=True)
class GrantRef:
    """One grant as the report needs it (see :func:`grant_refs_from_policy`)."""

    grant_id: str
    team: str
    dag_glob: str
    task_glob: str | None
    secrets: tuple[str, ...] = field(default_factory=tuple)

    def covers(self, dag_id: str | None, task_id: str | None) -> bool:
        if dag_id is None or not fnmatchcase(dag_id, self.dag_glob):
            return False
        return self.task_glob is None or fnmatchcase(task_id or "", self.task_glob)


def grant_refs_from_policy(policy: PolicySet) -> list[GrantRef]:
    """Every grant of ``policy`` (``team/grant`` ids) as the report needs it."""
    return [
        GrantRef(full_id, full_id.partition("/")[0], grant.dags, grant.tasks, grant.secrets)
        for full_id, grant in policy.grants()
    ]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReportFilters(_Model):
    team: str | None = None
    dag: str | None = None
    task: str | None = None
    secret: str | None = None
    dag_scope: tuple[str, ...] | None = Field(default=None, exclude=True)
    """DAG globs the reader may see (None: every DAG, and refused requests too)."""
    dag_ids: tuple[str, ...] | None = Field(default=None, exclude=True)
    """Exact DAG ids to keep (None: no such narrowing), kept sorted and unique: an
    Airflow user may read thousands, and each event and grant is looked up in them."""

    @field_validator("dag_ids")
    @classmethod
    def _sorted_once(cls, ids: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if ids is None else tuple(sorted(set(ids)))

    @property
    def unscoped(self) -> bool:
        return self.dag_scope is None and self.dag_ids is None

    def dag_visible(self, dag_id: str | None) -> bool:
        """Whether the reader's scope and ``dag_ids`` let it see ``dag_id``."""
        if dag_id is None:
            return self.unscoped
        if self.dag_scope is not None and not any(fnmatchcase(dag_id, g) for g in self.dag_scope):
            return False
        if self.dag_ids is None:
            return True
        at = bisect.bisect_left(self.dag_ids, dag_id)
        return at < len(self.dag_ids) and self.dag_ids[at] == dag_id

    def grant_visible(self, dag_glob: str) -> bool:
        """Whether a grant for ``dag_glob`` lies inside the reader's scope and ids."""
        if self.dag_scope is not None and not any(fnmatchcase(dag_glob, g) for g in self.dag_scope):
            return False
        return self.dag_ids is None or _any_matches(self.dag_ids, dag_glob)


_GLOB_MAGIC = re.compile(r"[*?\[]")


def _any_matches(sorted_ids: Sequence[str], glob: str) -> bool:
    """Whether an id of ``sorted_ids`` matches ``glob``; only the ids sharing the glob's
    literal prefix are tried (a bisect), not every id for every grant."""
    prefix = _GLOB_MAGIC.split(glob, maxsplit=1)[0]
    at = bisect.bisect_left(sorted_ids, prefix)
    while at < len(sorted_ids) and sorted_ids[at].startswith(prefix):
        if fnmatchcase(sorted_ids[at], glob):
            return True
        at += 1
    return False


class TaskRef(_Model):
    dag_id: str
    task_id: str


class SecretUsage(_Model):
    secret: str
    uses: int
    dags: list[str]
    tasks: list[TaskRef]
    first_use: datetime
    last_use: datetime
    images: list[str] = []
    """The images of the pods that received the secret (from the launch requests)."""


class DagUsage(_Model):
    dag_id: str
    launches_requested: int
    launches_allowed: int
    launches_denied: int
    secret_uses: int
    secrets: dict[str, int]
    tasks: list[str]
    first_activity: datetime
    last_activity: datetime


class Denial(_Model):
    time: datetime
    launch_id: str | None
    caller: str | None
    dag_id: str | None
    task_id: str | None
    run_id: str | None
    try_number: int | None
    requested: list[str]
    denied: list[str]
    reasons: list[str]
    count: int = 1
    """How many requests this row stands for (refused requests are counted, not listed)."""


class UnusedGrant(_Model):
    grant_id: str
    team: str
    dag_glob: str
    task_glob: str | None
    unused_secrets: list[str]
    used_secrets: list[str]
    remove_grant: bool
    proposal: str


class FirstUse(_Model):
    time: datetime
    secret: str
    dag_id: str
    task_id: str | None
    launch_id: str | None


class Timeline(_Model):
    bucket: Literal["hour", "day", "week"]
    starts: list[datetime]
    series: dict[str, list[int]]  # secret -> uses per bucket, aligned with ``starts``


class Totals(_Model):
    launches_requested: int
    launches_allowed: int
    launches_denied: int
    secret_uses: int
    distinct_secrets: int
    distinct_dags: int
    unused_grant_secrets: int
    first_time_uses: int
    requests_refused: int = 0


class Exposure(_Model):
    """A value of ``secret`` showed in a launch's log stream (masked there)."""

    time: datetime
    secret: str
    dag_id: str | None
    task_id: str | None
    launch_id: str | None
    on_exposure: str | None
    revoked: bool | None


class UsageReport(_Model):
    window_start: datetime | None
    window_end: datetime | None
    filters: ReportFilters
    totals: Totals
    secrets: list[SecretUsage]
    dags: list[DagUsage]
    denials: list[Denial]
    unused_grants: list[UnusedGrant]
    first_time_uses: list[FirstUse]
    timeline: Timeline
    matrix: dict[str, dict[str, int]] = Field(
        description="dag_id -> secret -> uses in the window (the DAG x secret matrix)"
    )
    exposures: list[Exposure] = Field(default_factory=list)


# -- helpers ---------------------------------------------------------------------------


def _glob(pattern: str | None, value: str | None) -> bool:
    if pattern is None:
        return True
    return value is not None and fnmatchcase(value, pattern)


@dataclass(frozen=True)
class _Use:
    time: datetime
    secret: str
    dag_id: str
    task_id: str | None
    launch_id: str | None
    teams: tuple[str, ...]


class _Scope:
    """Window and filters, applied consistently to every section."""

    def __init__(
        self,
        start: datetime | None,
        end: datetime | None,
        filters: ReportFilters,
        grants: Sequence[GrantRef],
    ) -> None:
        self.start, self.end, self.f = start, end, filters
        self.team_grants = [g for g in grants if g.team == filters.team]

    def in_window(self, time: datetime) -> bool:
        return (self.start is None or time >= self.start) and (self.end is None or time < self.end)

    def task_ok(self, event: AuditEvent) -> bool:
        return (
            self.f.dag_visible(event.dag_id)
            and _glob(self.f.dag, event.dag_id)
            and _glob(self.f.task, event.task_id)
        )

    def refusals_ok(self) -> bool:
        """Refused requests name no DAG: only an unscoped, unfiltered reader sees them."""
        f = self.f
        return (
            f.unscoped
            and f.team is None
            and f.dag is None
            and f.task is None
            and (f.secret is None)
        )

    def secret_ok(self, name: str) -> bool:
        return _glob(self.f.secret, name)

    def team_ok(self, event: AuditEvent, names: Iterable[str]) -> bool:
        if self.f.team is None:
            return True
        if event.teams:
            return self.f.team in event.teams
        names = list(names)
        return any(
            g.covers(event.dag_id, event.task_id) and (not names or set(names) & set(g.secrets))
            for g in self.team_grants
        )

    def event_ok(self, event: AuditEvent) -> bool:
        """For launch-level events: task filters, a requested name matching the secret
        filter (if any), and the team."""
        names = list(event.secret_names)
        if self.f.secret is not None and not any(self.secret_ok(n) for n in names):
            return False
        return self.task_ok(event) and self.team_ok(event, names)


def _uses(events: Iterable[AuditEvent], scope: _Scope) -> list[_Use]:
    """Every use matching the filters (any time), one per launch and secret."""
    seen: set[tuple[str, str]] = set()
    uses: list[_Use] = []
    for event in events:
        if event.kind != EventKind.SECRETS_RESOLVED or event.dag_id is None:
            continue
        if not scope.task_ok(event):
            continue
        for name in dict.fromkeys(event.secret_names):
            if not scope.secret_ok(name) or not scope.team_ok(event, [name]):
                continue
            if event.launch_id is not None:
                if (event.launch_id, name) in seen:
                    continue
                seen.add((event.launch_id, name))
            uses.append(
                _Use(event.time, name, event.dag_id, event.task_id, event.launch_id, event.teams)
            )
    return uses


def _matched_grants(events: Iterable[AuditEvent]) -> dict[str, dict[str, set[str]]]:
    """launch_id -> secret -> grant ids, from allowed decisions that gave the mapping."""
    out: dict[str, dict[str, set[str]]] = {}
    for event in events:
        if event.kind != EventKind.DECISION or event.launch_id is None:
            continue
        matched = event.details.get("matched_grants")
        if event.details.get("allowed") and isinstance(matched, Mapping):
            per = out.setdefault(event.launch_id, {})
            for secret, ids in matched.items():
                if isinstance(ids, list):
                    per.setdefault(str(secret), set()).update(str(i) for i in ids)
    return out


def _credited(grant: GrantRef, use: _Use, matched: dict[str, dict[str, set[str]]]) -> bool:
    if use.secret not in grant.secrets:
        return False
    per_launch = matched.get(use.launch_id or "")
    if per_launch is not None and use.secret in per_launch:
        return grant.grant_id in per_launch[use.secret]
    if use.teams and grant.team not in use.teams:
        return False
    return grant.covers(use.dag_id, use.task_id)


def _unused_grants(
    grants: Sequence[GrantRef],
    uses: Sequence[_Use],
    scope: _Scope,
    matched: dict[str, dict[str, set[str]]],
) -> list[UnusedGrant]:
    f = scope.f
    out: list[UnusedGrant] = []
    for grant in sorted(grants, key=lambda g: (g.team, g.grant_id)):
        if f.team is not None and grant.team != f.team:
            continue
        if not f.grant_visible(grant.dag_glob):
            continue
        if f.dag is not None and not (
            fnmatchcase(f.dag, grant.dag_glob) or f.dag == grant.dag_glob
        ):
            continue
        if (
            f.task is not None
            and grant.task_glob is not None
            and not (fnmatchcase(f.task, grant.task_glob) or f.task == grant.task_glob)
        ):
            continue
        secrets = [s for s in dict.fromkeys(grant.secrets) if scope.secret_ok(s)]
        if not secrets:
            continue
        used = sorted({u.secret for u in uses if _credited(grant, u, matched)})
        unused = sorted(set(secrets) - set(used))
        if not unused:
            continue
        remove_grant = not used and len(secrets) == len(set(grant.secrets))
        where = f"DAGs {grant.dag_glob!r}" + (
            f", tasks {grant.task_glob!r}" if grant.task_glob is not None else ""
        )
        proposal = (
            f"remove grant {grant.grant_id} of team {grant.team} ({where}): unused in the window"
            if remove_grant
            else f"remove {', '.join(unused)} from grant {grant.grant_id} of team {grant.team} "
            f"({where}): unused in the window"
        )
        out.append(
            UnusedGrant(
                grant_id=grant.grant_id,
                team=grant.team,
                dag_glob=grant.dag_glob,
                task_glob=grant.task_glob,
                unused_secrets=unused,
                used_secrets=used,
                remove_grant=remove_grant,
                proposal=proposal,
            )
        )
    return out


def _floor(time: datetime, bucket: str) -> datetime:
    time = time.astimezone(UTC)
    if bucket == "hour":
        return time.replace(minute=0, second=0, microsecond=0)
    day = time.replace(hour=0, minute=0, second=0, microsecond=0)
    if bucket == "day":
        return day
    return day - timedelta(days=day.weekday())


MAX_TIMELINE_BUCKETS = 1000
_STEP = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(days=7)}


def _timeline(uses: Sequence[_Use], start: datetime | None, end: datetime | None) -> Timeline:
    if not uses and (start is None or end is None):
        return Timeline(bucket="day", starts=[], series={})
    first = start if start is not None else min(u.time for u in uses)
    last = (end - timedelta(microseconds=1)) if end is not None else max(u.time for u in uses)
    if last - first > MAX_TIMELINE_BUCKETS * _STEP["week"]:
        # A window of centuries would be millions of empty buckets: keep the span of uses.
        if not uses:
            return Timeline(bucket="week", starts=[], series={})
        first = max(first, min(u.time for u in uses))
        last = min(last, max(u.time for u in uses))
    span = last - first
    bucket: Literal["hour", "day", "week"] = (
        "hour" if span <= timedelta(hours=48) else "day" if span <= timedelta(days=120) else "week"
    )
    step = _STEP[bucket]
    starts: list[datetime] = []
    cursor = _floor(first, bucket)
    while cursor <= last:
        starts.append(cursor)
        cursor += step
    index = {s: i for i, s in enumerate(starts)}
    series: dict[str, list[int]] = {}
    for use in uses:
        row = series.setdefault(use.secret, [0] * len(starts))
        slot = index.get(_floor(use.time, bucket))
        if slot is not None:
            row[slot] += 1
    return Timeline(bucket=bucket, starts=starts, series=dict(sorted(series.items())))


def _refusal(event: AuditEvent) -> Denial:
    """A ``request_refused`` record as a denial row (see audit_events.request_refused)."""
    d = event.details
    count = d.get("count")
    who = event.caller or f"unauthenticated client {d.get('client') or '?'}"
    return Denial(
        time=event.time,
        launch_id=None,
        caller=who,
        dag_id=None,
        task_id=None,
        run_id=None,
        try_number=None,
        requested=[],
        denied=[],
        reasons=[
            f"{d.get('status')} {d.get('reason_class')} on {d.get('endpoint')}: {d.get('reason')}"
        ],
        count=count if isinstance(count, int) and count > 0 else 1,
    )


# -- the report ------------------------------------------------------------------------


def compute_report(
    events: Iterable[AuditEvent],
    grants: Iterable[GrantRef] = (),
    *,
    window_start: datetime | None = None,
    window_end: datetime | None = None,
    filters: ReportFilters | None = None,
) -> UsageReport:
    """Compute every section of the report; see the module docstring for definitions."""
    f = filters or ReportFilters()
    grant_list = list(grants)
    all_events = sorted(events, key=lambda e: e.time)  # stable: store order breaks ties
    scope = _Scope(window_start, window_end, f, grant_list)

    all_uses = _uses(all_events, scope)
    uses = [u for u in all_uses if scope.in_window(u.time)]
    windowed = [e for e in all_events if scope.in_window(e.time)]

    # usage per secret, and which images received it
    image_of = {
        e.launch_id: str(e.details["image"])
        for e in all_events
        if e.kind == EventKind.LAUNCH_REQUESTED and e.launch_id and e.details.get("image")
    }
    by_secret: dict[str, list[_Use]] = defaultdict(list)
    for use in uses:
        by_secret[use.secret].append(use)
    secrets = [
        SecretUsage(
            secret=name,
            uses=len(items),
            dags=sorted({u.dag_id for u in items}),
            tasks=[
                TaskRef(dag_id=d, task_id=t)
                for d, t in sorted({(u.dag_id, u.task_id or "") for u in items})
            ],
            first_use=min(u.time for u in items),
            last_use=max(u.time for u in items),
            images=sorted({image_of[u.launch_id] for u in items if u.launch_id in image_of}),
        )
        for name, items in sorted(by_secret.items())
    ]

    # usage per DAG
    requested: dict[str, int] = defaultdict(int)
    allowed: dict[str, int] = defaultdict(int)
    denied_n: dict[str, int] = defaultdict(int)
    tasks: dict[str, set[str]] = defaultdict(set)
    times: dict[str, list[datetime]] = defaultdict(list)
    denials: list[Denial] = []
    refused = 0
    for event in windowed:
        if event.kind == EventKind.REQUEST_REFUSED:
            if scope.refusals_ok():
                denial = _refusal(event)
                refused += denial.count
                denials.append(denial)
            continue
        if event.dag_id is None or not scope.event_ok(event):
            continue
        dag = event.dag_id
        if event.kind == EventKind.LAUNCH_REQUESTED:
            requested[dag] += 1
        elif event.kind == EventKind.DECISION:
            if event.details.get("allowed"):
                allowed[dag] += 1
            else:
                denied_n[dag] += 1
                denials.append(
                    Denial(
                        time=event.time,
                        launch_id=event.launch_id,
                        caller=event.caller,
                        dag_id=event.dag_id,
                        task_id=event.task_id,
                        run_id=event.run_id,
                        try_number=event.try_number,
                        requested=list(event.secret_names),
                        denied=[str(n) for n in event.details.get("denied", [])],
                        reasons=[str(r) for r in event.details.get("reasons", [])],
                    )
                )
        else:
            continue
        if event.task_id is not None:
            tasks[dag].add(event.task_id)
        times[dag].append(event.time)
    matrix: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for use in uses:
        matrix[use.dag_id][use.secret] += 1
        if use.task_id is not None:
            tasks[use.dag_id].add(use.task_id)
        times[use.dag_id].append(use.time)
    matrix_plain = {d: dict(sorted(row.items())) for d, row in sorted(matrix.items())}
    dags = [
        DagUsage(
            dag_id=dag,
            launches_requested=requested[dag],
            launches_allowed=allowed[dag],
            launches_denied=denied_n[dag],
            secret_uses=sum(matrix_plain.get(dag, {}).values()),
            secrets=matrix_plain.get(dag, {}),
            tasks=sorted(tasks[dag]),
            first_activity=min(times[dag]),
            last_activity=max(times[dag]),
        )
        for dag in sorted(times)
    ]

    # first-time uses: the earliest use of (dag, secret) ever seen falls in the window
    first_seen: dict[tuple[str, str], _Use] = {}
    for use in all_uses:
        key = (use.dag_id, use.secret)
        if key not in first_seen or use.time < first_seen[key].time:
            first_seen[key] = use
    first_uses = sorted(
        (
            FirstUse(
                time=u.time,
                secret=u.secret,
                dag_id=u.dag_id,
                task_id=u.task_id,
                launch_id=u.launch_id,
            )
            for u in first_seen.values()
            if scope.in_window(u.time)
        ),
        key=lambda x: (x.time, x.dag_id, x.secret),
    )

    unused = _unused_grants(grant_list, uses, scope, _matched_grants(all_events))
    totals = Totals(
        launches_requested=sum(requested.values()),
        launches_allowed=sum(allowed.values()),
        launches_denied=sum(denied_n.values()),
        secret_uses=len(uses),
        distinct_secrets=len(by_secret),
        distinct_dags=len(dags),
        unused_grant_secrets=sum(len(g.unused_secrets) for g in unused),
        first_time_uses=len(first_uses),
        requests_refused=refused,
    )
    return UsageReport(
        window_start=window_start,
        window_end=window_end,
        filters=f,
        totals=totals,
        secrets=secrets,
        dags=dags,
        denials=denials,
        unused_grants=unused,
        first_time_uses=first_uses,
        timeline=_timeline(uses, window_start, window_end),
        matrix=matrix_plain,
        exposures=[
            Exposure(
                time=e.time,
                secret=name,
                dag_id=e.dag_id,
                task_id=e.task_id,
                launch_id=e.launch_id,
                on_exposure=e.details.get("on_exposure"),
                revoked=e.details.get("revoked"),
            )
            for e in windowed
            if e.kind == EventKind.SECRET_EXPOSED and e.dag_id is not None and scope.event_ok(e)
            for name in e.secret_names
            if scope.secret_ok(name)
        ],
    )
