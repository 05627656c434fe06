"""What happens to a /v1 request before any route sees it, in this order: a declared
body over the limit is refused (413) unread; the caller is authenticated (401) before
a byte of the body is read; a launch body that is not JSON is refused (415); the body is
read up to the limit (413 past it, chunked or not) and only then handed on to be
parsed. Every refusal is counted by the RefusalRecorder (never with the body)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.core.models import Caller
from broker.errors import (
    AuthenticationError,
    BrokerError,
    ContentTooLargeError,
    UnsupportedMediaTypeError,
    error_code,
    status_for,
)
from broker.service.refusals import RefusalRecorder

CALLER_STATE_KEY: Final = "caller"
"""Where the guard leaves the authenticated Caller in ``request.state``."""

JSON_BODY_PATHS: Final = frozenset({"/v1/launches", "/v1/audit/report"})
"""The routes that take a JSON body (POST); a POST elsewhere is the router's 405."""
_LAUNCH_ID_PATH = re.compile(r"^/v1/launches/[^/]+")
_KNOWN_ENDPOINTS: Final = frozenset(
    {
        "/v1/launches",
        "/v1/launches/{launch_id}",
        "/v1/launches/{launch_id}/logs",
        "/v1/audit/report",
    }
)


def endpoint_of(method: str, path: str) -> str:
    """``METHOD /template``: the route, not the concrete path (a bounded set of keys)."""
    template = _LAUNCH_ID_PATH.sub("/v1/launches/{launch_id}", path, count=1)
    if template not in _KNOWN_ENDPOINTS:
        template = "/v1/(other)"
    return f"{method} {template}"


def client_of(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticate: Callable[[str | None], Caller],
        respond: Callable[[BrokerError], Response],
        refusals: RefusalRecorder,
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self.authenticate = authenticate
        self.respond = respond
        self.refusals = refusals
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        caller: Caller | None = None
        try:
            self._check_declared_length(headers)
            caller = await run_in_threadpool(self.authenticate, headers.get("authorization"))
            if scope["method"] == "POST" and scope["path"] in JSON_BODY_PATHS:
                self._check_media_type(headers)
            body = await self._read_body(receive)
        except BrokerError as exc:
            await self._refuse(scope, receive, send, exc, caller)
            return
        scope.setdefault("state", {})[CALLER_STATE_KEY] = caller
        await self.app(scope, _replay(body, receive), send)

    def _check_declared_length(self, headers: Headers) -> None:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ContentTooLargeError(
                f"request body of {declared} bytes is over the limit of {self.max_body_bytes} bytes"
            )

    @staticmethod
    def _check_media_type(headers: Headers) -> None:
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            raise UnsupportedMediaTypeError("a request body must be application/json")

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ContentTooLargeError(
                    f"request body is over the limit of {self.max_body_bytes} bytes"
                )
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, exc: BrokerError, caller: Caller | None
    ) -> None:
        status = status_for(exc)
        self.refusals.record(
            caller=caller.identity if caller is not None else None,
            client=client_of(scope),
            endpoint=endpoint_of(scope["method"], scope["path"]),
            status=status,
            reason_class=reason_class(exc),
            reason=exc.reason,
        )
        response = self.respond(exc)
        await response(scope, receive, send)


def reason_class(exc: BrokerError) -> str:
    """A short, bounded name for why a request was refused."""
    if isinstance(exc, ContentTooLargeError | UnsupportedMediaTypeError):
        return error_code(exc)
    if isinstance(exc, AuthenticationError):
        return "unauthenticated"
    status = status_for(exc)
    if status == 403:
        return "out_of_scope"
    if status == 422:
        return "invalid_request"
    return f"status_{status}"


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, once; then whatever the connection says next."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
