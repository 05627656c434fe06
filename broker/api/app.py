"""The broker's HTTP API (FastAPI). Thin: authenticate, call the services, map errors.
Every error body is an ErrorBody with a reason; none ever carries a secret value."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker.api.limits import InFlightLimiter
from broker.core.api_models import ErrorBody, LaunchRequest, LaunchView
from broker.core.models import Caller
from broker.core.report import ReportFilters
from broker.errors import BrokerError, DeniedError, TemporaryError, error_code, status_for
from broker.service.runtime import Runtime

log = logging.getLogger("podbroker.api")


def error_response(exc: BrokerError) -> JSONResponse:
    """The ErrorBody and headers for ``exc``; status and code from broker.errors.WIRE."""
    status = status_for(exc)
    body = ErrorBody(
        error=error_code(exc),
        reason=exc.reason,
        denied_secrets=exc.denied if isinstance(exc, DeniedError) else [],
        component=exc.component if isinstance(exc, TemporaryError) else None,
        retryable=exc.retryable,
    )
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, TemporaryError) else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    runtime: Runtime = request.app.state.runtime
    return runtime.authenticator.authenticate(authorization)


CallerDep = Annotated[Caller, Depends(_caller)]
LaunchId = Annotated[str, Path(pattern=r"^[0-9a-f]{20}$", description="from POST /v1/launches")]


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(
        title="podbroker",
        version="0.1.0",
        description="Launches Airflow task pods with only the secrets their policies grant.",
    )
    app.state.runtime = runtime
    app.add_middleware(InFlightLimiter, caps=runtime.settings.server.max_in_flight.model_dump())

    @app.exception_handler(BrokerError)
    async def _broker_error(_: Request, exc: BrokerError) -> JSONResponse:
        if status_for(exc) >= 500:
            log.warning("request failed: %s", exc.reason)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Echo locations and messages only: the offending input may hold anything.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'] if p != 'body')}: {err['msg']}"
            for err in exc.errors()
        )
        body = ErrorBody(error="invalid_request", reason=problems or "invalid request")
        return JSONResponse(body.model_dump(), status_code=422)

    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody} for code in (401, 403, 404, 409, 422, 503)
    }

    @app.post("/v1/launches", response_model=LaunchView, status_code=201, responses=responses)
    def launch(body: LaunchRequest, who: CallerDep, response: Response) -> LaunchView:
        """Launch (or reattach to) the pod of one task try."""
        view = runtime.launches.launch(who, body)
        if not view.created:
            response.status_code = 200
        return view

    @app.get("/v1/launches/{launch_id}", response_model=LaunchView, responses=responses)
    def status(launch_id: LaunchId, who: CallerDep) -> LaunchView:
        return runtime.lookup.status(who, launch_id)

    @app.get("/v1/launches/{launch_id}/logs", response_class=StreamingResponse, responses=responses)
    def logs(
        launch_id: LaunchId,
        who: CallerDep,
        follow: bool = False,
        since_seconds: Annotated[int | None, Query(ge=1)] = None,
        timestamps: bool = False,
    ) -> StreamingResponse:
        """The pod's log (its main container), streamed; ``follow`` keeps it open."""
        chunks: Iterator[bytes] = runtime.lookup.logs(
            who, launch_id, follow=follow, since_seconds=since_seconds, timestamps=timestamps
        )
        return StreamingResponse(chunks, media_type="text/plain; charset=utf-8")

    @app.delete("/v1/launches/{launch_id}", response_model=LaunchView, responses=responses)
    def kill(
        launch_id: LaunchId,
        who: CallerDep,
        reason: Annotated[str | None, Query(max_length=200, pattern=r"^[A-Za-z0-9_. -]*$")] = None,
    ) -> LaunchView:
        """Kill a launch: its pod and Secret are deleted and its leases revoked.
        ``reason`` (e.g. on_kill, on_finish_action) is recorded in the audit trail."""
        return runtime.lookup.kill(who, launch_id, reason)

    @app.get("/v1/audit/report", responses=responses)
    def report(
        who: CallerDep,
        format: Literal["json", "html", "csv", "table"] = "json",
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
        team: str | None = None,
        dag: str | None = None,
        task: str | None = None,
        secret: str | None = None,
    ) -> Response:
        """The secret-usage report, read-only (for the Airflow "Secret usage" page)."""
        del who  # any authenticated caller may read usage (names and counts, no values)
        text = runtime.render_report(
            format,
            since=since,
            until=until,
            filters=ReportFilters(team=team, dag=dag, task=task, secret=secret),
        )
        media = {
            "json": "application/json",
            "html": "text/html",
            "csv": "text/csv",
            "table": "text/plain",
        }[format]
        return Response(text, media_type=f"{media}; charset=utf-8")

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @app.get("/readyz", responses={503: {"model": ErrorBody}})
    def readyz() -> dict[str, str]:
        """Ready only when Vault, the API server and the audit store all answer."""
        runtime.check_ready()
        return {"vault": "ok", "kubernetes": "ok", "audit": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
