"""Async trigger for deferrable BrokerPodOperator tasks: only polls
GET /v1/launches/{id} until the pod ends; the operator fetches logs on resume."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_plugin.client import TERMINAL_PHASES
from airflow_plugin.hook import BrokerHook
from airflow_plugin.settings import DEFAULT_CONN_ID, ConnectionConfigError
from broker.errors import AuthenticationError, BrokerError, TemporaryError

# Give up (retryable) after this many polls in a row that could not reach the broker.
MAX_CONSECUTIVE_FAILURES = 30


class BrokerLaunchTrigger(BaseTrigger):
    """Fires once: ``{"status": "done", "launch_id", "phase"}`` when the pod ended,
    ``{"status": "startup_timeout", ...}`` if it stayed Pending too long, or
    ``{"status": "error", "message", "retryable"}``.

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
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.launch_id = launch_id
        self.podbroker_conn_id = podbroker_conn_id
        self.poll_interval = poll_interval
        self.startup_timeout_seconds = startup_timeout_seconds
        self.started_at = started_at if started_at is not None else time.time()

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "launch_id": self.launch_id,
                "podbroker_conn_id": self.podbroker_conn_id,
                "poll_interval": self.poll_interval,
                "startup_timeout_seconds": self.startup_timeout_seconds,
                "started_at": self.started_at,
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
        failures = 0
        try:
            while True:
                try:
                    view = await client.get_launch(self.launch_id)
                    failures = 0
                except (TemporaryError, AuthenticationError) as exc:
                    failures += 1
                    self.log.warning("polling launch %s failed (%s)", self.launch_id, exc.reason)
                    if failures >= MAX_CONSECUTIVE_FAILURES:
                        yield self._event("error", message=exc.reason, retryable=True)
                        return
                    await asyncio.sleep(self.poll_interval)
                    continue
                except (BrokerError, ConnectionConfigError) as exc:
                    yield self._event("error", message=str(exc), retryable=False)
                    return
                if view.phase in TERMINAL_PHASES:
                    yield self._event("done", phase=view.phase, pod_name=view.pod_name)
                    return
                if (
                    view.phase == "Pending"
                    and time.time() - self.started_at > self.startup_timeout_seconds
                ):
                    yield self._event("startup_timeout", pod_name=view.pod_name)
                    return
                await asyncio.sleep(self.poll_interval)
        finally:
            await client.aclose()
