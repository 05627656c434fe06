"""Caps on concurrent in-flight requests, per route class, as a pure ASGI middleware.

Each route class (launches, log streams, other API calls) has its own cap, so a slow
dependency that holds launches cannot also starve status polls and log streams, and the
sum stays below the worker-thread pool so health probes always get a thread. A request
over its class's cap is answered at once with 503 and ``Retry-After``: retryable, and
nothing was started. Health, readiness and metrics are never capped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from broker.core.api_models import ErrorBody
from broker.metrics import REJECTED_OVER_CAP

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
    refuses one over ``caps[class]``. A request counts until its response is complete,
    so a log stream counts for as long as it streams."""

    def __init__(self, app: ASGIApp, *, caps: dict[str, int], retry_after: int = 1) -> None:
        self.app = app
        self.caps = dict(caps)
        self.retry_after = retry_after
        self.in_flight = dict.fromkeys(self.caps, 0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind = route_class(scope.get("method", "GET"), scope.get("path", ""))
        cap = self.caps.get(kind) if kind is not None else None
        if kind is None or cap is None:
            await self.app(scope, receive, send)
            return
        if self.in_flight[kind] >= cap:
            REJECTED_OVER_CAP.labels(kind).inc()
            log.warning("refused a %s request: %d already in flight", kind, cap)
            await self._refuse(send, kind, cap)
            return
        self.in_flight[kind] += 1
        try:
            await self.app(scope, receive, send)
        finally:
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
