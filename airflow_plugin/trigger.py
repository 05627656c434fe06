"""Async trigger for deferrable BrokerPodOperator tasks: only polls
GET /v1/launches/{id} until the pod ends (with airflow_plugin.launch_watch, as the
blocking operator does); the operator fetches logs on resume. When a
user marks the deferred task failed / succeeded or clears it, ``on_kill`` sends
DELETE /v1/launches/{id}?reason=on_kill so its pod and Secret go too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_plugin.client import TERMINAL_PHASES
from airflow_plugin.hook import BrokerHook
from airflow_plugin.launch_watch import AsyncLaunchWatcher, OutageTimeoutError
from airflow_plugin.retry import DEFAULT_UNAVAILABLE_TIMEOUT_SECONDS
from airflow_plugin.settings import DEFAULT_CONN_ID, ConnectionConfigError
from broker.errors import BrokerError, TemporaryError

# on_kill runs under the triggerer's own bound ([triggerer] on_kill_timeout, 30s by
# default): a few quick attempts fit in it.
KILL_ATTEMPTS = 3
KILL_RETRY_SECONDS = 1.0


class BrokerLaunchTrigger(BaseTrigger):
    """Fires once: ``{"status": "done", "launch_id", "phase"}`` when the pod ended,
    ``{"status": "startup_timeout", ...}`` if it stayed Pending too long, or
    ``{"status": "error", "message", "retryable"}`` (retryable once the broker stayed
    unavailable for ``broker_unavailable_timeout_seconds``; the operator then deletes
    the launch before failing the try).

    ``started_at`` is the wall-clock time of deferral, so a triggerer restart does not
    restart the startup clock. Serialized kwargs hold no credentials: the connection is
    looked up by id in the triggerer."""

    def __init__(
        self,
        launch_id: str,
        podbroker_conn_id: str = DEFAULT_CONN_ID,
        poll_interval: float = 2.0,
        startup_timeout_seconds: int = 120,
        started_at: float | None = None,
        broker_unavailable_timeout_seconds: float = DEFAULT_UNAVAILABLE_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.launch_id = launch_id
        self.podbroker_conn_id = podbroker_conn_id
        self.poll_interval = poll_interval
        self.startup_timeout_seconds = startup_timeout_seconds
        self.started_at = started_at if started_at is not None else time.time()
        self.broker_unavailable_timeout_seconds = broker_unavailable_timeout_seconds

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
            },
        )

    def _event(self, status: str, **fields: Any) -> TriggerEvent:
        payload = {"status": status, "launch_id": self.launch_id, **fields}
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
        try:
            view = await watcher.wait_for_end(
                self.launch_id,
                started_at=self.started_at,
                startup_timeout_seconds=self.startup_timeout_seconds,
            )
        except OutageTimeoutError as exc:
            event = self._event("error", message=str(exc), retryable=True)
        except (BrokerError, ConnectionConfigError) as exc:
            event = self._event("error", message=str(exc), retryable=False)
        else:
            if view.phase in TERMINAL_PHASES:
                event = self._event("done", phase=view.phase, pod_name=view.pod_name)
            else:
                event = self._event("startup_timeout", pod_name=view.pod_name)
        finally:
            await client.aclose()
        yield event

    async def on_kill(self) -> None:
        """The user acted on the deferred task (mark failed / succeeded, clear): DELETE
        /v1/launches/{id}?reason=on_kill so the broker deletes the pod and its Secret and
        revokes its leases. Not called on triggerer restarts or redistribution (the pod
        must keep running then). Failures are logged; the broker's reconciler deletes
        the pod at its launch timeout anyway."""
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
