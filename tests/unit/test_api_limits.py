"""The in-flight cap (pure ASGI): over a route class's cap a request is refused at once
with 503 + Retry-After; other classes and health probes are unaffected."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from broker.api.limits import InFlightLimiter, route_class


class SlowApp:
    """Answers 200 once ``release`` is set; counts the requests it was given."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.seen = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.seen += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def call(app: Any, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path}, receive, send)
    start = sent[0]
    headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def test_route_classes() -> None:
    assert route_class("POST", "/v1/launches") == "launch"
    assert route_class("GET", "/v1/launches/abc/logs") == "logs"
    assert route_class("GET", "/v1/launches/abc") == "other"
    assert route_class("DELETE", "/v1/launches/abc") == "other"
    assert route_class("GET", "/readyz") is None and route_class("GET", "/healthz") is None


def test_over_the_cap_is_refused_at_once_and_other_classes_go_on() -> None:
    async def scenario() -> None:
        inner = SlowApp()
        app = InFlightLimiter(inner, caps={"launch": 2, "logs": 1, "other": 1})
        held = [asyncio.create_task(call(app, "POST", "/v1/launches")) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert app.in_flight["launch"] == 2

        status, headers, body = await asyncio.wait_for(call(app, "POST", "/v1/launches"), 1)
        assert status == 503 and headers["retry-after"] == "1"
        error = json.loads(body)
        assert error["error"] == "unavailable" and error["retryable"] is True
        assert error["component"] == "broker" and "busy" in error["reason"]
        assert inner.seen == 2  # the refused request never reached the app

        status_task = asyncio.create_task(call(app, "GET", "/v1/launches/x"))
        ready_task = asyncio.create_task(call(app, "GET", "/readyz"))
        await asyncio.sleep(0.01)
        assert inner.seen == 4  # another class and the probe were let through
        inner.release.set()
        results = await asyncio.gather(*held, status_task, ready_task)
        assert [r[0] for r in results] == [200, 200, 200, 200]
        assert app.in_flight == {"launch": 0, "logs": 0, "other": 0}
        assert (await call(app, "POST", "/v1/launches"))[0] == 200

    asyncio.run(scenario())


def test_a_failing_request_frees_its_slot() -> None:
    async def boom(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("handler failed")

    async def scenario() -> None:
        app = InFlightLimiter(boom, caps={"launch": 1, "logs": 1, "other": 1})
        for _ in range(3):
            with contextlib.suppress(RuntimeError):
                await call(app, "POST", "/v1/launches")
        assert app.in_flight["launch"] == 0

    asyncio.run(scenario())


def test_over_the_cap_a_launch_waits_in_the_room_for_a_freed_slot() -> None:
    async def scenario() -> None:
        inner = SlowApp()
        app = InFlightLimiter(inner, caps={"launch": 1, "logs": 1, "other": 1}, queue={"launch": 2})
        running = asyncio.create_task(call(app, "POST", "/v1/launches"))
        waiting = [asyncio.create_task(call(app, "POST", "/v1/launches")) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert inner.seen == 1 and len(app._waiting["launch"]) == 2
        # The room is full: the next one is refused at once.
        status, headers, _ = await asyncio.wait_for(call(app, "POST", "/v1/launches"), 1)
        assert status == 503 and headers["retry-after"] == "1"
        inner.release.set()
        results = await asyncio.gather(running, *waiting)
        assert [r[0] for r in results] == [200, 200, 200] and inner.seen == 3
        assert app.in_flight["launch"] == 0 and not app._waiting["launch"]

    asyncio.run(scenario())


def test_a_launch_that_waits_too_long_or_goes_away_gives_its_place_back() -> None:
    async def scenario() -> None:
        inner = SlowApp()
        app = InFlightLimiter(
            inner,
            caps={"launch": 1, "logs": 1, "other": 1},
            queue={"launch": 4},
            queue_seconds=0.05,
        )
        running = asyncio.create_task(call(app, "POST", "/v1/launches"))
        await asyncio.sleep(0.01)
        status, _, body = await call(app, "POST", "/v1/launches")  # waits, then gives up
        assert status == 503 and json.loads(body)["retryable"] is True
        app.queue_seconds = 30
        gone = asyncio.create_task(call(app, "POST", "/v1/launches"))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client disconnected while waiting
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        assert not app._waiting["launch"]
        inner.release.set()
        assert (await running)[0] == 200
        assert app.in_flight["launch"] == 0
        assert (await call(app, "POST", "/v1/launches"))[0] == 200  # no slot was leaked

    asyncio.run(scenario())
