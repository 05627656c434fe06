"""Async trigger for deferrable BrokerPodOperator tasks: only polls
GET /v1/launches/{id} until the pod ends (with airflow_plugin.launch_watch, as the
blocking operator does); the operator fetches logs on resume, and every
``logging_interval`` seconds while the pod runs (the trigger fires, the operator reads the
new lines and defers again, as KubernetesPodOperator does). When a user marks the deferred
task failed / succeeded or clears it, ``on_kill`` sends DELETE
/v1/launches/{id}?reason=on_kill so its pod and Secret go too (``on_kill_action="keep_pod"``
leaves them to the broker's launch timeout). Airflow calls ``BaseTrigger.on_kill`` from
3.3.0 on, hence the package's minimum Airflow version. Airflow 3.3.x also calls it on a
triggerer that lost its heartbeat, had its triggers handed to another triggerer and then
recovered (apache/airflow#73454): on_kill therefore first asks Airflow for the task
instance's state and leaves the launch alone while the task is still deferred."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_plugin.client import TERMINAL_PHASES
from airflow_plugin.hook import BrokerHook
from airflow_plugin.launch_watch import (
    AsyncLaunchWatcher,
    OutageTimeoutError,
    StartupFailedError,
)
from airflow_plugin.retry import DEFAULT_UNAVAILABLE_TIMEOUT_SECONDS
from airflow_plugin.settings import DEFAULT_CONN_ID, ConnectionConfigError
from broker.errors import BrokerError, TemporaryError

# on_kill runs under the triggerer's own bound ([triggerer] on_kill_timeout, 30s by
# default): a few quick attempts fit in it.
KILL_ATTEMPTS = 3
KILL_RETRY_SECONDS = 1.0

OnKillAction = Literal["delete_pod", "keep_pod"]
ON_KILL_ACTIONS: tuple[OnKillAction, ...] = ("delete_pod", "keep_pod")


class BrokerLaunchTrigger(BaseTrigger):
    """Fires once: ``{"status": "done", "launch_id", "phase"}`` when the pod ended;
    ``{"status": "running", ...}`` after ``logging_interval`` seconds while the pod runs
    (the operator fetches the new log lines and defers again); ``{"status":
    "startup_failed", "kind", "message"}`` when the pod was not scheduled or started in
    time or cannot start at all (see launch_watch.StartupWatch); or ``{"status":
    "error", "message", "retryable"}`` (retryable once the broker stayed unavailable for
    ``broker_unavailable_timeout_seconds``; the operator then deletes the launch before
    failing the try). Every event echoes ``last_log_ns``, where the log read resumes.

    ``started_at`` is the wall-clock time of the first deferral, so neither a triggerer
    restart nor a ``logging_interval`` round trip restarts the startup clock. Serialized
    kwargs hold no credentials: the connection is looked up by id in the triggerer."""

    def __init__(
        self,
        launch_id: str,
        podbroker_conn_id: str = DEFAULT_CONN_ID,
        poll_interval: float = 2.0,
        startup_timeout_seconds: int = 120,
        started_at: float | None = None,
        broker_unavailable_timeout_seconds: float = DEFAULT_UNAVAILABLE_TIMEOUT_SECONDS,
        schedule_timeout_seconds: int | None = None,
        logging_interval: int | None = None,
        last_log_ns: int | None = None,
        on_kill_action: OnKillAction = "delete_pod",
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.launch_id = launch_id
        self.podbroker_conn_id = podbroker_conn_id
        self.poll_interval = poll_interval
        self.startup_timeout_seconds = startup_timeout_seconds
        self.started_at = started_at if started_at is not None else time.time()
        self.broker_unavailable_timeout_seconds = broker_unavailable_timeout_seconds
        self.schedule_timeout_seconds = schedule_timeout_seconds
        self.logging_interval = logging_interval
        self.last_log_ns = last_log_ns
        self.on_kill_action: OnKillAction = on_kill_action

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "launch_id": self.launch_id,
                "podbroker_conn_id": self.podbroker_conn_id,
                "poll_interval": self.poll_interval,
                "startup_timeout_seconds": self.startup_timeout_seconds,
                "started_at": self.started_at,
                "broker_unavailable_timeout_seconds": self.broker_unavailable_timeout_seconds,
                "schedule_timeout_seconds": self.schedule_timeout_seconds,
                "logging_interval": self.logging_interval,
                "last_log_ns": self.last_log_ns,
                "on_kill_action": self.on_kill_action,
            },
        )

    def _event(self, status: str, **fields: Any) -> TriggerEvent:
        payload = {
            "status": status,
            "launch_id": self.launch_id,
            "last_log_ns": self.last_log_ns,
            **fields,
        }
        return TriggerEvent(payload)  # type: ignore[no-untyped-call]

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            client = await BrokerHook(self.podbroker_conn_id).aget_conn()
        except ConnectionConfigError as exc:
            yield self._event("error", message=str(exc), retryable=False)
            return
        watcher = AsyncLaunchWatcher(
            client,
            poll_interval=self.poll_interval,
            unavailable_timeout=self.broker_unavailable_timeout_seconds,
            log=self.log,
        )
        running_until = (
            time.time() + self.logging_interval if self.logging_interval is not None else None
        )
        try:
            view = await watcher.wait_for_end(
                self.launch_id,
                started_at=self.started_at,
                startup_timeout_seconds=self.startup_timeout_seconds,
                schedule_timeout_seconds=self.schedule_timeout_seconds,
                running_until=running_until,
            )
        except StartupFailedError as exc:
            event = self._event(
                "startup_failed", kind=exc.failure.kind, message=exc.failure.message
            )
        except OutageTimeoutError as exc:
            event = self._event("error", message=str(exc), retryable=True)
        except (BrokerError, ConnectionConfigError) as exc:
            event = self._event("error", message=str(exc), retryable=False)
        else:
            if view.phase in TERMINAL_PHASES:
                event = self._event("done", phase=view.phase, pod_name=view.pod_name)
            else:
                event = self._event(
                    "running", phase=view.phase, pod_name=view.pod_name, started_at=self.started_at
                )
        finally:
            await client.aclose()
        yield event

    async def _still_deferred(self) -> bool:
        """True when Airflow says this trigger's task instance is still deferred, so
        on_kill comes from a trigger handed to another triggerer, not from a user
        (apache/airflow#73454). Asks through the triggerer's channel to Airflow's
        execution API (``RuntimeTaskInstance.get_task_states``). False when there is no
        task instance or Airflow cannot be asked: on_kill then means what Airflow
        documents, a user action."""
        ti = self.task_instance
        if ti is None:
            return False
        map_index = getattr(ti, "map_index", -1)
        map_index = -1 if map_index is None else int(map_index)
        try:
            import greenback
            from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

            # The triggerer's channel answers blocking calls through a greenback portal
            # of the calling task; on_kill may run in a task of its own (wait_for).
            await greenback.ensure_portal()
            states = RuntimeTaskInstance.get_task_states(
                dag_id=ti.dag_id,
                task_ids=[ti.task_id],
                run_ids=[ti.run_id],
                map_index=map_index if map_index >= 0 else None,
            )
        except Exception as exc:  # no channel (tests, old runners), or Airflow unreachable
            self.log.info("cannot ask Airflow for the state of %s: %s", ti.task_id, exc)
            return False
        key = ti.task_id if map_index < 0 else f"{ti.task_id}_{map_index}"
        return bool((states.get(ti.run_id) or {}).get(key) == "deferred")

    async def on_kill(self) -> None:
        """The user acted on the deferred task (mark failed / succeeded, clear): DELETE
        /v1/launches/{id}?reason=on_kill so the broker deletes the pod and its Secret and
        revokes its leases. Not called on triggerer restarts or redistribution (the pod
        must keep running then). Failures are logged; the broker's reconciler deletes
        the pod at its launch timeout anyway. ``on_kill_action="keep_pod"``: nothing."""
        if self.on_kill_action == "keep_pod":
            self.log.info("task killed: keeping launch %s (on_kill_action)", self.launch_id)
            return
        if await self._still_deferred():
            self.log.warning(
                "on_kill for launch %s while its task is still deferred: the trigger moved to "
                "another triggerer (not a user action); the launch is left running",
                self.launch_id,
            )
            return
        try:
            client = await BrokerHook(self.podbroker_conn_id).aget_conn()
        except ConnectionConfigError as exc:
            self.log.warning("cannot delete launch %s: %s", self.launch_id, exc)
            return
        try:
            for attempt in range(1, KILL_ATTEMPTS + 1):
                try:
                    await client.kill(self.launch_id, reason="on_kill")
                except TemporaryError as exc:
                    if attempt == KILL_ATTEMPTS:
                        self.log.warning(
                            "could not delete launch %s: %s", self.launch_id, exc.reason
                        )
                        return
                    await asyncio.sleep(KILL_RETRY_SECONDS * attempt)
                except BrokerError as exc:
                    self.log.warning("could not delete launch %s: %s", self.launch_id, exc.reason)
                    return
                else:
                    self.log.info("task killed: deleted launch %s", self.launch_id)
                    return
        finally:
            await client.aclose()
