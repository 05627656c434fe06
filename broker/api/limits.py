"""Caps on concurrent in-flight requests, per route class, as a pure ASGI middleware.

Each route class (launches, log streams, other API calls) has its own cap, so a slow
dependency that holds launches cannot also starve status polls and log streams, and the
sum stays below the worker-thread pool so health probes always get a thread. A request
over its class's cap may wait in a bounded room (``queue``: how many may wait, at most
``queue_seconds``; holding no thread) for a slot, first come first served; past that
it is answered with 503 and ``Retry-After``: retryable, and nothing was started. A
burst at a schedule boundary thus waits a moment instead of every task sleeping and
retrying. Health, readiness and metrics are never capped.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from broker.core.api_models import ErrorBody
from broker.metrics import QUEUED_OVER_CAP, REJECTED_OVER_CAP

log = logging.getLogger("podbroker.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNCAPPED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def route_class(method: str, path: str) -> str | None:
    """The class a request counts against, or None when it is never capped."""
    if path in UNCAPPED_PATHS:
        return None
    if method == "POST" and path.rstrip("/") == "/v1/launches":
        return "launch"
    if path.endswith("/logs"):
        return "logs"
    return "other"


class InFlightLimiter:
    """Counts requests in flight per route class (on the event loop: no locks needed) and
    admits one over ``caps[class]`` only through the waiting room. A request counts until
    its response is complete, so a log stream counts for as long as it streams."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        caps: dict[str, int],
        retry_after: int = 1,
        queue: dict[str, int] | None = None,
        queue_seconds: float = 10.0,
    ) -> None:
        self.app = app
        self.caps = dict(caps)
        self.retry_after = retry_after
        self.queue = dict(queue or {})
        self.queue_seconds = queue_seconds
        self.in_flight = dict.fromkeys(self.caps, 0)
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {k: deque() for k in self.caps}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind = route_class(scope.get("method", "GET"), scope.get("path", ""))
        cap = self.caps.get(kind) if kind is not None else None
        if kind is None or cap is None:
            await self.app(scope, receive, send)
            return
        if not await self._admit(kind, cap):
            REJECTED_OVER_CAP.labels(kind).inc()
            log.warning("refused a %s request: %d already in flight", kind, cap)
            await self._refuse(send, kind, cap)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._release(kind)

    async def _admit(self, kind: str, cap: int) -> bool:
        """Take a slot: at once if one is free and nobody waits, else from the waiting
        room (a freed slot passes straight to the longest waiter)."""
        waiting = self._waiting[kind]
        if self.in_flight[kind] < cap and not waiting:
            self.in_flight[kind] += 1
            return True
        if len(waiting) >= self.queue.get(kind, 0):
            return False
        QUEUED_OVER_CAP.labels(kind).inc()
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting.append(slot)
        try:
            await asyncio.wait({slot}, timeout=self.queue_seconds)
        except asyncio.CancelledError:  # the client went away while waiting
            self._leave(kind, slot)
            raise
        if slot.done():
            return True
        self._leave(kind, slot)
        return False

    def _leave(self, kind: str, slot: asyncio.Future[None]) -> None:
        """Stop waiting; a slot handed over meanwhile is passed on."""
        if slot.done():
            self._release(kind)
            return
        slot.cancel()
        self._waiting[kind].remove(slot)

    def _release(self, kind: str) -> None:
        waiting = self._waiting[kind]
        while waiting:
            slot = waiting.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes on: in_flight stays
                return
        self.in_flight[kind] -= 1

    async def _refuse(self, send: Send, kind: str, cap: int) -> None:
        body = ErrorBody(
            error="unavailable",
            reason=f"the broker is busy: {cap} {kind} requests already in flight; retry later",
            component="broker",
            retryable=True,
        )
        payload = json.dumps(body.model_dump()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"retry-after", str(self.retry_after).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
