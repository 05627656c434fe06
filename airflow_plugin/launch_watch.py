"""Watching one launch from the Airflow side, as KPO's pod manager watches its pods: read
the status riding out broker outages (:class:`airflow_plugin.retry.Outage`), wait for the
pod to start and to end, and follow its log, resuming after the last timestamp seen.

The blocking operator uses :class:`LaunchWatcher`, the trigger :class:`AsyncLaunchWatcher`.
Both raise the broker error tree, or :class:`OutageTimeoutError` once an outage outlasted its
timeout; turning those into Airflow exceptions or trigger events is the caller's job.
No Airflow import here: the clients are protocols, so tests use in-memory fakes."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from airflow_plugin.client import TERMINAL_PHASES
from airflow_plugin.retry import Outage
from broker.core.api_models import LaunchView
from broker.errors import AuthenticationError, BrokerError, TemporaryError

# Kubernetes log timestamps are RFC 3339 with up to nanoseconds.
_TIMESTAMPED = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d) ?(.*)$")
# A followed log stream silent this long is reopened after a status check.
LOG_IDLE_SECONDS = 10.0
# Failures a status read rides out: the broker down, or a 401 while the projected
# ServiceAccount token rotates.
_RIDDEN_OUT = (TemporaryError, AuthenticationError)

_log = logging.getLogger("podbroker.airflow")


def split_timestamp(line: str) -> tuple[int | None, str]:
    """``2026-11-24T10:00:00.123456789Z text`` -> (nanoseconds since the epoch, "text");
    lines without a timestamp come back unchanged with None. Nanoseconds, because
    several lines often share one microsecond."""
    match = _TIMESTAMPED.match(line)
    if not match:
        return None, line
    whole, fraction, zone, text = match.groups()
    zone = "+00:00" if zone == "Z" else zone
    try:
        seconds = int(datetime.fromisoformat(f"{whole}{zone}").timestamp())
    except ValueError:
        return None, line
    nanos = int((fraction or ".0")[1:10].ljust(9, "0"))
    return seconds * 1_000_000_000 + nanos, text


class OutageTimeoutError(Exception):
    """The broker stayed unavailable (or kept refusing the token) for the whole
    unavailability timeout. ``error`` is the last failure; retrying the task is safe once
    its launch is deleted."""

    def __init__(self, error: TemporaryError | AuthenticationError, seconds: float) -> None:
        super().__init__(f"{error.reason} (unavailable for {seconds:.0f}s)")
        self.error = error
        self.seconds = seconds


class TaskLog(Protocol):
    """The part of a logger the watchers use: a ``logging.Logger`` or Airflow's task log."""

    def info(self, event: Any, *args: Any) -> Any: ...

    def warning(self, event: Any, *args: Any) -> Any: ...


class LaunchReader(Protocol):
    """What :class:`LaunchWatcher` needs of :class:`airflow_plugin.client.BrokerClient`."""

    def get_launch(self, launch_id: str) -> LaunchView: ...

    def iter_log_lines(
        self,
        launch_id: str,
        *,
        follow: bool,
        since_seconds: int | None = None,
        timestamps: bool = False,
        idle_timeout: float | None = None,
    ) -> Iterator[str]: ...


class AsyncLaunchReader(Protocol):
    """What :class:`AsyncLaunchWatcher` needs of ``AsyncBrokerClient``."""

    async def get_launch(self, launch_id: str) -> LaunchView: ...


def _outage(timeout: float, poll_interval: float) -> Outage:
    return Outage(timeout, first_delay=min(max(poll_interval, 1.0), 30.0))


def _delay_or_give_up(outage: Outage, exc: TemporaryError | AuthenticationError) -> float:
    """The wait before the next status read, or OutageTimeoutError once the outage is over
    its timeout (honours the broker's Retry-After)."""
    delay = outage.next_delay(exc.retry_after if isinstance(exc, TemporaryError) else 0)
    if delay is None:
        raise OutageTimeoutError(exc, outage.elapsed) from exc
    return delay


def _polling_failed(log: TaskLog, launch_id: str, reason: str, delay: float) -> None:
    log.warning("polling launch %s failed (%s); retrying in %.1fs", launch_id, reason, delay)


StartupFailureKind = Literal["pending_permanent", "schedule_timeout", "startup_timeout"]


@dataclass(frozen=True)
class StartupFailure:
    """Why a Pending pod will not be waited for any longer; ``kind`` is also the reason
    sent with the DELETE (audit trail)."""

    kind: StartupFailureKind
    message: str


class StartupFailedError(Exception):
    """The pod never started: a permanent pending error, or a timeout (see StartupWatch)."""

    def __init__(self, failure: StartupFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


def _pending(view: LaunchView) -> Any:
    """The broker's ``pending`` object ({kind, reason, message, permanent}), or None.
    Read with getattr: brokers older than the field do not send it."""
    return getattr(view, "pending", None)


def _is_scheduled(view: LaunchView) -> bool:
    """A Pending pod counts as scheduled once the kubelet reports container states (it
    does so only for a pod bound to its node) and the broker does not call it
    unschedulable."""
    pending = _pending(view)
    if pending is not None and getattr(pending, "kind", None) == "unschedulable":
        return False
    return bool(view.containers)


class StartupWatch:
    """Bookkeeping while a launch is Pending, shared by the operator and the trigger.

    Shows in the task log, as they change, the container waiting reasons, the broker's
    ``pending`` diagnosis and the pod's events (``ErrImagePull``, ``FailedScheduling``,
    quota). Gives up, like KubernetesPodOperator, when the pod is not scheduled within
    ``schedule_timeout`` of ``started_at``, or has not started ``startup_timeout`` after
    it was scheduled; and at once when the broker marks the pending state permanent
    (an invalid image name, a config error that will not heal)."""

    def __init__(
        self,
        *,
        started_at: float,
        schedule_timeout: float,
        startup_timeout: float,
        log: TaskLog | None = None,
    ) -> None:
        self.started_at = started_at
        self.schedule_timeout = schedule_timeout
        self.startup_timeout = startup_timeout
        self.scheduled_at: float | None = None
        self._log: TaskLog = log or _log
        self._shown: set[tuple[Any, ...]] = set()

    def check(self, view: LaunchView, now: float) -> StartupFailure | None:
        """Report what is new in ``view``; a failure once waiting is pointless."""
        self._report(view)
        pending = _pending(view)
        if pending is not None and getattr(pending, "permanent", False):
            what = getattr(pending, "reason", None) or getattr(pending, "kind", "pending")
            detail = getattr(pending, "message", None) or "no message"
            return StartupFailure(
                "pending_permanent",
                f"pod {view.pod_name} cannot start: {what}: {detail} (permanent, not waiting "
                "for the startup timeout)",
            )
        if self.scheduled_at is None and _is_scheduled(view):
            self.scheduled_at = now
        if self.scheduled_at is None and now - self.started_at > self.schedule_timeout:
            return StartupFailure(
                "schedule_timeout",
                f"pod {view.pod_name} still Pending: not scheduled after "
                f"{self.schedule_timeout:.0f}s (schedule_timeout_seconds){self._why(view)}",
            )
        if self.scheduled_at is not None and now - self.scheduled_at > self.startup_timeout:
            return StartupFailure(
                "startup_timeout",
                f"pod {view.pod_name} still Pending: scheduled but not started after "
                f"{self.startup_timeout:.0f}s (startup_timeout_seconds){self._why(view)}",
            )
        return None

    @staticmethod
    def _why(view: LaunchView) -> str:
        reasons = [c.reason for c in view.containers if c.state == "waiting" and c.reason]
        pending = _pending(view)
        if pending is not None and getattr(pending, "reason", None):
            reasons.insert(0, str(pending.reason))
        if view.reason:
            reasons.append(view.reason)
        return f": {', '.join(dict.fromkeys(reasons))}" if reasons else ""

    def _show(self, key: tuple[Any, ...], event: str, *args: Any) -> None:
        if key not in self._shown:
            self._shown.add(key)
            self._log.info(event, *args)

    def _report(self, view: LaunchView) -> None:
        for container in view.containers:
            if container.state == "waiting" and container.reason:
                self._show(
                    ("waiting", container.name, container.reason, container.message),
                    "pod %s: container %s waiting: %s%s",
                    view.pod_name,
                    container.name,
                    container.reason,
                    f": {container.message}" if container.message else "",
                )
        pending = _pending(view)
        if pending is not None:
            kind = getattr(pending, "kind", None)
            reason = getattr(pending, "reason", None)
            message = getattr(pending, "message", None)
            self._show(
                ("pending", kind, reason, message),
                "pod %s pending (%s): %s%s",
                view.pod_name,
                kind,
                reason,
                f": {message}" if message else "",
            )
        for event in getattr(view, "events", None) or ():
            reason = getattr(event, "reason", None)
            message = getattr(event, "message", None)
            count = getattr(event, "count", None)
            self._show(
                ("event", reason, message, count),
                "pod %s event %s%s: %s",
                view.pod_name,
                reason,
                f" (x{count})" if count and count > 1 else "",
                message,
            )


class LaunchWatcher:
    """Blocking watcher (the operator): ``GET /v1/launches/{id}`` and its ``/logs``.

    :param poll_interval: seconds between status reads.
    :param unavailable_timeout: how long one outage is ridden out (0: not at all).
    :param log: where warnings and the pod's lines (``[pod] ...``) go.
    :param sleep, clock: injectable for tests (default ``time.sleep``/``time.monotonic``)."""

    def __init__(
        self,
        client: LaunchReader,
        *,
        poll_interval: float,
        unavailable_timeout: float,
        log: TaskLog | None = None,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._client = client
        self.poll_interval = poll_interval
        self.unavailable_timeout = unavailable_timeout
        self._log: TaskLog = log or _log
        self._sleep = sleep or time.sleep
        self._clock = clock or time.monotonic
        # The newest log line shown so far (ns since the epoch): where a reconnect resumes.
        self.last_log_ns: int | None = None

    def status(self, launch_id: str) -> LaunchView:
        """The launch's current view, riding out one outage for ``unavailable_timeout``."""
        outage = _outage(self.unavailable_timeout, self.poll_interval)
        while True:
            try:
                return self._client.get_launch(launch_id)
            except _RIDDEN_OUT as exc:
                delay = _delay_or_give_up(outage, exc)
                _polling_failed(self._log, launch_id, exc.reason, delay)
                self._sleep(delay)

    def wait_for_start(
        self,
        view: LaunchView,
        *,
        startup_timeout: float,
        schedule_timeout: float | None = None,
    ) -> LaunchView:
        """Poll while the pod is Pending, showing why it waits (:class:`StartupWatch`).
        Returns the first other view; raises StartupFailedError when the pod is not
        scheduled within ``schedule_timeout`` (default: ``startup_timeout``), has not
        started ``startup_timeout`` after scheduling, or cannot start at all."""
        startup = StartupWatch(
            started_at=self._clock(),
            schedule_timeout=startup_timeout if schedule_timeout is None else schedule_timeout,
            startup_timeout=startup_timeout,
            log=self._log,
        )
        while view.phase == "Pending":
            failure = startup.check(view, self._clock())
            if failure is not None:
                raise StartupFailedError(failure)
            self._sleep(self.poll_interval)
            view = self.status(view.launch_id)
        return view

    def wait_for_end(self, view: LaunchView) -> LaunchView:
        """Poll until the launch reaches a terminal phase."""
        while view.phase not in TERMINAL_PHASES:
            self._sleep(self.poll_interval)
            view = self.status(view.launch_id)
        return view

    def wait_for_result_check(self, view: LaunchView, *, timeout: float) -> LaunchView:
        """Poll an ended launch until the broker's termination-message leak guard has
        given its verdict (``result_check`` no longer ``unchecked``: the broker checks
        as it cleans up the ended pod, within moments). Returns the last view, still
        ``unchecked`` if ``timeout`` seconds passed first."""
        deadline = self._clock() + timeout
        while getattr(view, "result_check", None) == "unchecked" and self._clock() < deadline:
            self._sleep(min(self.poll_interval, 1.0))
            view = self.status(view.launch_id)
        return view

    def follow_logs(self, view: LaunchView) -> None:
        """Stream the log into ``log`` as lines arrive. A stream that breaks or stays
        idle is reopened from the last timestamp seen (lines at or before it are
        skipped), like KPO; once the pod has ended, one non-follow read takes the tail.
        Logs are best effort: only status reads raise."""
        self.last_log_ns = None
        outage = _outage(self.unavailable_timeout, self.poll_interval)
        while True:
            pause = self.poll_interval
            try:
                self._read_logs(view.launch_id, follow=True)
                outage.reset()
            except TemporaryError as exc:
                delay = outage.next_delay(exc.retry_after)
                if delay is None:
                    # The outcome still comes from the status, polled by wait_for_end.
                    self._log.warning("giving up on the log stream: %s", exc.reason)
                    return
                self._log.warning(
                    "log stream interrupted (%s); reconnecting in %.1fs", exc.reason, delay
                )
                pause = delay
            except BrokerError as exc:
                self._log.warning("cannot read the pod log: %s", exc.reason)
                return
            view = self.status(view.launch_id)
            if view.phase in TERMINAL_PHASES:
                if view.phase != "Deleted":
                    try:
                        self._read_logs(view.launch_id, follow=False)
                    except BrokerError as exc:
                        self._log.warning("cannot read the end of the pod log: %s", exc.reason)
                return
            self._sleep(pause)

    def read_new_logs(self, view: LaunchView) -> None:
        """One non-follow read of the lines after ``last_log_ns`` (all of them when
        None): a deferred task's periodic log fetch (``logging_interval``). Best effort."""
        if view.phase == "Deleted":
            return
        try:
            self._read_logs(view.launch_id, follow=False)
        except BrokerError as exc:
            self._log.warning("cannot read the pod log: %s", exc.reason)

    def copy_logs(self, view: LaunchView) -> None:
        """Read the whole log of an ended pod once (after deferral); best effort."""
        if view.phase == "Deleted":
            return
        try:
            for line in self._client.iter_log_lines(view.launch_id, follow=False):
                self._pod_line(line)
        except BrokerError as exc:
            self._log.warning("cannot read the pod log: %s", exc.reason)

    def _pod_line(self, text: str) -> None:
        self._log.info("[%s] %s", "pod", text)

    def _read_logs(self, launch_id: str, *, follow: bool) -> None:
        """One pass over the log. Resumes after ``last_log_ns`` (kept per line, so an
        interrupted pass loses nothing)."""
        resume_after = self.last_log_ns
        since = None
        if resume_after is not None:
            now_ns = int(datetime.now(UTC).timestamp() * 1_000_000_000)
            since = math.ceil((now_ns - resume_after) / 1_000_000_000) + 1
        for raw in self._client.iter_log_lines(
            launch_id,
            follow=follow,
            timestamps=True,
            since_seconds=since,
            idle_timeout=max(LOG_IDLE_SECONDS, self.poll_interval) if follow else None,
        ):
            stamp, text = split_timestamp(raw)
            if stamp is not None:
                if resume_after is not None and stamp <= resume_after:
                    continue
                self.last_log_ns = max(stamp, self.last_log_ns or stamp)
            self._pod_line(text)


class AsyncLaunchWatcher:
    """Non-blocking watcher (the trigger): status reads only; logs are read by the
    operator when it resumes. Same parameters as :class:`LaunchWatcher`, except that
    ``clock`` is wall-clock time (``time.time``): the startup clock of a deferred task
    starts at deferral and survives triggerer restarts."""

    def __init__(
        self,
        client: AsyncLaunchReader,
        *,
        poll_interval: float,
        unavailable_timeout: float,
        log: TaskLog | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._client = client
        self.poll_interval = poll_interval
        self.unavailable_timeout = unavailable_timeout
        self._log: TaskLog = log or _log
        self._sleep = sleep or asyncio.sleep
        self._clock = clock or time.time

    async def status(self, launch_id: str) -> LaunchView:
        """As :meth:`LaunchWatcher.status`."""
        outage = _outage(self.unavailable_timeout, self.poll_interval)
        while True:
            try:
                return await self._client.get_launch(launch_id)
            except _RIDDEN_OUT as exc:
                delay = _delay_or_give_up(outage, exc)
                _polling_failed(self._log, launch_id, exc.reason, delay)
                await self._sleep(delay)

    async def wait_for_end(
        self,
        launch_id: str,
        *,
        started_at: float,
        startup_timeout_seconds: float,
        schedule_timeout_seconds: float | None = None,
        running_until: float | None = None,
    ) -> LaunchView:
        """Poll until the launch reaches a terminal phase, showing why a Pending pod
        waits; raises StartupFailedError as :meth:`LaunchWatcher.wait_for_start` does
        (clocks from ``started_at``). With ``running_until`` (wall-clock), returns a
        Running view once that time has passed (``logging_interval``)."""
        startup = StartupWatch(
            started_at=started_at,
            schedule_timeout=(
                startup_timeout_seconds
                if schedule_timeout_seconds is None
                else schedule_timeout_seconds
            ),
            startup_timeout=startup_timeout_seconds,
            log=self._log,
        )
        while True:
            view = await self.status(launch_id)
            if view.phase in TERMINAL_PHASES:
                return view
            now = self._clock()
            if view.phase == "Pending":
                failure = startup.check(view, now)
                if failure is not None:
                    raise StartupFailedError(failure)
            elif running_until is not None and now >= running_until:
                return view
            await self._sleep(self.poll_interval)
