"""The broker's HTTP API (FastAPI). Thin: authenticate, call the services, map errors.
Every error body is an ErrorBody with a reason; none ever carries a secret value.

Before a route runs, :class:`~broker.api.guard.RequestGuard` bounds the body and
authenticates the caller. Refused requests (401, 403 out of scope, 413, 415, 422, and a
log read the leak guard refused, 409) are counted by the RefusalRecorder and end up in
the report's denials."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from fnmatch import fnmatchcase
from typing import Annotated, Any, Final

import anyio.to_thread
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BeforeValidator, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from broker.api.guard import (
    CALLER_STATE_KEY,
    RequestGuard,
    client_of,
    endpoint_of,
    reason_class,
)
from broker.api.limits import InFlightLimiter
from broker.core.api_models import (
    ErrorBody,
    LaunchDryRun,
    LaunchRequest,
    LaunchView,
    ReportFormat,
    ReportQuery,
)
from broker.core.models import (
    AIRFLOW_KEY_PATTERN,
    AIRFLOW_RUN_ID_PATTERN,
    INT32_MAX,
    PRINTABLE_PATTERN,
    Caller,
    Timestamp,
)
from broker.core.report import ReportFilters, UsageReport
from broker.core.timeline import TaskTry, TaskTryAudit, in_scope, task_try_audit
from broker.errors import (
    BrokerError,
    DeniedError,
    InvalidRequestError,
    TemporaryError,
    error_code,
    status_for,
)
from broker.service.lookup import UnmaskableLogError
from broker.service.refusals import RefusalRecorder
from broker.service.runtime import Runtime

log = logging.getLogger("podbroker.api")

SPARE_THREADS: Final = 8
"""Worker threads beyond the in-flight caps: health and readiness probes, /metrics."""

# Refusals the RefusalRecorder counts, and a log read the leak guard refused (409). A
# policy denial (403 naming secrets) is not among them: the launch's own ``decision``
# event records it.
REFUSAL_STATUSES: Final = frozenset({401, 403, 413, 415, 422})
LOG_UNMASKABLE: Final = "log_unmaskable"
"""The reason class of a log read refused because its values could not be masked."""
MAX_REPORT_DAG_IDS: Final = 1000
LAUNCH_AUDIT_PAGE: Final = 20
"""Launches per page of GET /v1/audit/launches unless ``limit`` says otherwise."""
LAUNCH_AUDIT_MAX_PAGE: Final = 100


def error_response(exc: BrokerError) -> JSONResponse:
    """The ErrorBody and headers for ``exc``; status and code from broker.errors.WIRE."""
    status, code = status_for(exc), error_code(exc)
    body = ErrorBody(
        error=code,
        reason=exc.reason,
        denied_secrets=exc.denied if isinstance(exc, DeniedError) else [],
        component=exc.component if isinstance(exc, TemporaryError) else None,
        retryable=exc.retryable,
    )
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, TemporaryError) else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


_bearer = HTTPBearer(auto_error=False, description="a Kubernetes ServiceAccount token")


def _caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The caller the guard authenticated (before the body was read)."""
    caller = getattr(request.state, CALLER_STATE_KEY, None)
    if isinstance(caller, Caller):
        return caller
    runtime: Runtime = request.app.state.runtime
    header = f"Bearer {credentials.credentials}" if credentials is not None else None
    return runtime.authenticator.authenticate(header)


CallerDep = Annotated[Caller, Depends(_caller)]
LaunchId = Annotated[str, Path(pattern=r"^[0-9a-f]{20}$", description="from POST /v1/launches")]

# Query values are text: accept exactly the spellings the schema promises, nothing lax
# ("1" is no boolean).


def _strict_bool(value: object) -> object:
    if isinstance(value, str) and value not in ("true", "false"):
        raise ValueError("use true or false")
    return value == "true" if isinstance(value, str) else value


StrictBool = Annotated[bool, BeforeValidator(_strict_bool)]
FilterText = Annotated[str | None, Query(max_length=250, pattern=PRINTABLE_PATTERN)]
DagIds = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=250, pattern=AIRFLOW_KEY_PATTERN)]] | None,
    Query(max_length=MAX_REPORT_DAG_IDS, description="repeat to keep only these DAG ids"),
]

_ERROR: Final = {"model": ErrorBody}
_UNAUTHENTICATED: Final = {
    "model": ErrorBody,
    "description": "no valid bearer token",
    "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
}
_UNAVAILABLE: Final = {
    "model": ErrorBody,
    "description": "a dependency is unavailable: retry after Retry-After seconds",
    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
}
# uvicorn answers this one itself, before the app sees the request.
_UNREADABLE: Final = {
    "description": "the HTTP request could not be read: malformed, or its URL is over the "
    "server's limit (about 64 KiB: mind many long repeated query values)",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}
_COMMON: Final[dict[int | str, dict[str, Any]]] = {
    400: _UNREADABLE,
    401: _UNAUTHENTICATED,
    403: {**_ERROR, "description": "denied (policy, or a DAG outside the caller's scope)"},
    413: {**_ERROR, "description": "request body over limits.max_body_bytes"},
    422: {**_ERROR, "description": "invalid request (the reason names the field)"},
    500: {**_ERROR, "description": "the broker is misconfigured, or failed unexpectedly"},
    503: _UNAVAILABLE,
}
_BY_ID: Final[dict[int | str, dict[str, Any]]] = {
    **_COMMON,
    404: {**_ERROR, "description": "no such launch"},
}
_NOT_JSON: Final[dict[int | str, dict[str, Any]]] = {
    415: {**_ERROR, "description": "the body is not application/json"}
}
_LAUNCH: Final[dict[int | str, dict[str, Any]]] = {
    **_BY_ID,
    200: {
        "model": LaunchView | LaunchDryRun,
        "description": "this task try was launched before: that launch; or, with "
        "dry_run=true, the plan and the decision",
    },
    404: {**_ERROR, "description": "a requested secret is not in the catalog"},
    409: {**_ERROR, "description": "conflicts with existing state"},
    **_NOT_JSON,
}
_REPORT_MEDIA: Final = {
    "json": "application/json",
    "html": "text/html",
    "csv": "text/csv",
    "table": "text/plain",
}


def create_app(runtime: Runtime, *, refusals: RefusalRecorder | None = None) -> FastAPI:
    limits = runtime.settings.limits
    recorder = refusals or RefusalRecorder(
        runtime.audit,
        interval_seconds=limits.refusal_interval_seconds,
        max_keys=limits.refusal_keys,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Sync routes run on anyio's thread pool (40 threads by default): size it from the
        # caps, so every admitted request gets a thread and probes still find one.
        caps = runtime.settings.server.max_in_flight
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = caps.launch + caps.logs + caps.other + SPARE_THREADS
        recorder.start()
        try:
            yield
        finally:
            recorder.stop()

    app = FastAPI(
        title="podbroker",
        version="0.1.0",
        description="Launches Airflow task pods with only the secrets their policies grant.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.refusals = recorder
    app.add_middleware(
        RequestGuard,
        authenticate=runtime.authenticator.authenticate,
        respond=error_response,
        refusals=recorder,
        max_body_bytes=limits.max_body_bytes,
    )
    # Added last, so outermost: over the cap a request is refused before anything else.
    caps = runtime.settings.server.max_in_flight
    app.add_middleware(
        InFlightLimiter,
        caps={"launch": caps.launch, "logs": caps.logs, "other": caps.other},
        queue={"launch": caps.launch_queue},
        queue_seconds=caps.launch_queue_seconds,
    )

    def refused(request: Request, exc: BrokerError) -> None:
        status = status_for(exc)
        if isinstance(exc, UnmaskableLogError):
            why = LOG_UNMASKABLE
        elif status in REFUSAL_STATUSES and not (isinstance(exc, DeniedError) and exc.denied):
            why = reason_class(exc)
        else:
            return
        caller = getattr(request.state, CALLER_STATE_KEY, None)
        recorder.record(
            caller=caller.identity if isinstance(caller, Caller) else None,
            client=client_of(request.scope),
            endpoint=endpoint_of(request.method, request.url.path),
            status=status,
            reason_class=why,
            reason=exc.reason,
        )

    @app.exception_handler(BrokerError)
    async def _broker_error(request: Request, exc: BrokerError) -> JSONResponse:
        if status_for(exc) >= 500:
            log.warning("request failed: %s", exc.reason)
        refused(request, exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Echo locations and messages only: the offending input may hold anything.
        problems = "; ".join(
            f"{'.'.join(_loc_part(p) for p in err['loc'] if p != 'body')}: {err['msg']}"
            for err in exc.errors()[:20]
        )
        error = InvalidRequestError(problems or "invalid request")
        refused(request, error)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; list every one.
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected failure: %s", type(exc).__name__, exc_info=exc)
        body = ErrorBody(error="internal", reason="internal error")
        return JSONResponse(body.model_dump(), status_code=500)

    @app.post(
        "/v1/launches",
        response_model=LaunchView | LaunchDryRun,
        status_code=201,
        responses=_LAUNCH,
    )
    def launch(
        body: LaunchRequest,
        who: CallerDep,
        response: Response,
        dry_run: Annotated[
            StrictBool,
            Query(description="plan and decide only: nothing created, nothing read from Vault"),
        ] = False,
    ) -> LaunchView | LaunchDryRun:
        """Launch (or reattach to) the pod of one task try: 201 when launched now, 200
        when this try was launched before (that launch is returned). With
        ``dry_run=true``: 200 with the launch plan and the policy decision (a denial is
        a decision, not an error); nothing is created and no secret is read."""
        if dry_run:
            response.status_code = 200
            return runtime.launches.dry_run(who, body)
        view = runtime.launches.launch(who, body)
        if not view.created:
            response.status_code = 200
        return view

    @app.get("/v1/launches/{launch_id}", response_model=LaunchView, responses=_BY_ID)
    def status(launch_id: LaunchId, who: CallerDep) -> LaunchView:
        return runtime.lookup.status(who, launch_id)

    @app.get(
        "/v1/launches/{launch_id}/logs",
        response_class=StreamingResponse,
        responses={
            **_BY_ID,
            200: {
                "description": "the log, streamed",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
        },
    )
    def logs(
        launch_id: LaunchId,
        who: CallerDep,
        follow: StrictBool = False,
        since_seconds: Annotated[int | None, Query(ge=1, le=10 * 365 * 86400)] = None,
        timestamps: StrictBool = False,
    ) -> StreamingResponse:
        """The pod's log (its main container), streamed; ``follow`` keeps it open."""
        chunks: Iterator[bytes] = runtime.lookup.logs(
            who, launch_id, follow=follow, since_seconds=since_seconds, timestamps=timestamps
        )
        return StreamingResponse(chunks, media_type="text/plain; charset=utf-8")

    @app.delete("/v1/launches/{launch_id}", response_model=LaunchView, responses=_BY_ID)
    def kill(
        launch_id: LaunchId,
        who: CallerDep,
        reason: Annotated[str | None, Query(max_length=200, pattern=r"^[A-Za-z0-9_. -]*$")] = None,
    ) -> LaunchView:
        """Kill a launch: its pod and Secret are deleted and its leases revoked.
        ``reason`` (e.g. on_kill, on_finish_action) is recorded in the audit trail."""
        return runtime.lookup.kill(who, launch_id, reason)

    report_responses: dict[int | str, dict[str, Any]] = {
        **_COMMON,
        200: {
            "model": UsageReport,
            "description": "the report in the asked format",
            "content": {
                "text/html": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
                "text/plain": {"schema": {"type": "string"}},
            },
        },
        403: {**_ERROR, "description": "the caller matches no callers rule"},
    }

    def report_response(who: Caller, query: ReportQuery) -> Response:
        text = runtime.render_report(
            query.format,
            since=query.since,
            until=query.until,
            filters=ReportFilters(
                team=query.team,
                dag=query.dag,
                task=query.task,
                secret=query.secret,
                dag_scope=_report_scope(runtime, who),
                dag_ids=tuple(query.dag_ids) if query.dag_ids is not None else None,
            ),
        )
        return Response(text, media_type=f"{_REPORT_MEDIA[query.format]}; charset=utf-8")

    @app.get("/v1/audit/report", response_model=None, responses=report_responses)
    def report(
        who: CallerDep,
        format: ReportFormat = "json",
        since: Timestamp = None,
        until: Timestamp = None,
        team: FilterText = None,
        dag: FilterText = None,
        task: FilterText = None,
        secret: FilterText = None,
        dag_ids: DagIds = None,
    ) -> Response:
        """The secret-usage report, read-only. A caller reads the DAGs its ``callers``
        rules cover (``auth.report_readers`` read every DAG, refused requests included);
        ``dag_ids`` narrows further (POST the same query for more ids than a URL holds)."""
        query = ReportQuery(
            format=format,
            since=since,
            until=until,
            team=team,
            dag=dag,
            task=task,
            secret=secret,
            dag_ids=dag_ids or None,
        )
        return report_response(who, query)

    @app.post("/v1/audit/report", response_model=None, responses={**report_responses, **_NOT_JSON})
    def report_by_body(who: CallerDep, query: ReportQuery) -> Response:
        """The report of GET /v1/audit/report, its query as a JSON body: what the Airflow
        "Secret usage" page sends, with every DAG id its user may read (up to
        20,000, within ``limits.max_body_bytes``). Reads only, like GET."""
        return report_response(who, query)

    @app.get(
        "/v1/audit/launches",
        response_model=TaskTryAudit,
        responses={
            **_COMMON,
            403: {**_ERROR, "description": "the DAG is outside the caller's scope"},
        },
    )
    def launch_audit(
        who: CallerDep,
        dag_id: Annotated[str, Query(min_length=1, max_length=250, pattern=AIRFLOW_KEY_PATTERN)],
        run_id: Annotated[str, Query(min_length=1, max_length=250, pattern=AIRFLOW_RUN_ID_PATTERN)],
        task_id: Annotated[str, Query(min_length=1, max_length=250, pattern=AIRFLOW_KEY_PATTERN)],
        map_index: Annotated[int, Query(ge=-1, le=INT32_MAX)] = -1,
        try_number: Annotated[int | None, Query(ge=0, le=INT32_MAX)] = None,
        limit: Annotated[
            int,
            Query(ge=1, le=LAUNCH_AUDIT_MAX_PAGE, description="launches per page"),
        ] = LAUNCH_AUDIT_PAGE,
        cursor: Annotated[
            str | None,
            Query(
                pattern=r"^[0-9]{1,18}$",
                description="next_cursor of the previous page (opaque)",
            ),
        ] = None,
        since: Annotated[
            Timestamp,
            Query(description="only launches whose first event is at or after this time"),
        ] = None,
    ) -> TaskTryAudit:
        """What happened to the secrets of one task try (every try without
        ``try_number``): requested, decided, delivered, removed, revoked, exposure.
        Names only; scoped like the report (the caller's DAG globs). Paginated: at most
        ``limit`` launches, oldest first; ``next_cursor`` (when not null) asks for the
        next page. Reads only the try's own events and its launches' records (indexed),
        never the whole trail."""
        scope = _report_scope(runtime, who)
        task = TaskTry(
            dag_id=dag_id,
            run_id=run_id,
            task_id=task_id,
            map_index=map_index,
            try_number=try_number,
        )
        if not in_scope(dag_id, scope):
            raise DeniedError(f"DAG {dag_id} is outside the scope of caller {who.identity}")
        page = runtime.audit.task_try_records(
            task, limit=limit, after=int(cursor) if cursor else 0, since=since
        )
        audit = task_try_audit((r.event for r in page.records), task, scope=scope)
        following = None if page.next_after is None else str(page.next_after)
        return audit.model_copy(update={"next_cursor": following})

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok"

    @app.get(
        "/readyz",
        responses={
            500: {**_ERROR, "description": "the broker is misconfigured"},
            503: _UNAVAILABLE,
        },
    )
    def readyz() -> dict[str, str]:
        """Ready only when Vault, the API server and the audit store all answer."""
        runtime.check_ready()
        return {"vault": "ok", "kubernetes": "ok", "audit": "ok"}

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            _tighten(schema)
            _bind_settings(schema, runtime)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _report_scope(runtime: Runtime, who: Caller) -> tuple[str, ...] | None:
    """The DAG globs ``who`` may read the report of (None: every DAG)."""
    if any(fnmatchcase(who.identity, glob) for glob in runtime.settings.auth.report_readers):
        return None
    if not who.allowed_dag_globs:
        raise DeniedError(
            f"caller {who.identity} matches no callers rule: it may read the report of no DAG"
        )
    return who.allowed_dag_globs


_SAFE_LOC = re.compile(r"^[A-Za-z0-9_.\[\]-]{1,64}$")


def _loc_part(part: object) -> str:
    """A location step of a validation error; a dict key that is not a plain name (it
    is the caller's input) is not echoed."""
    text = str(part)
    return text if _SAFE_LOC.match(text) else "<key>"


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        route_methods = getattr(route, "methods", None)
        if match != Match.NONE and route_methods:
            methods.update(route_methods)
    return sorted(methods)


def _bind_settings(schema: dict[str, Any], runtime: Runtime) -> None:
    """Name the values this broker accepts where its settings decide them: the task
    namespaces, the service accounts and the pod templates."""
    launch = schema.get("components", {}).get("schemas", {}).get("LaunchRequest")
    if not isinstance(launch, dict):
        return
    settings = runtime.settings
    choices = {
        "namespace": settings.kubernetes.task_namespaces,
        "service_account": settings.kubernetes.allowed_service_accounts,
        "pod_template": sorted(settings.pod_templates),
    }
    properties = launch.get("properties", {})
    for name, values in choices.items():
        if name in properties:
            options: list[dict[str, Any]] = [{"type": "null"}]
            if values:
                options.insert(0, {"type": "string", "enum": list(values)})
            properties[name] = {"anyOf": options, "title": properties[name].get("title", name)}


def _tighten(node: object) -> None:
    """Make the generated schema say what the validators do: maps whose keys follow a
    pattern take no other keys, and an optional query parameter is absent, never null."""
    if isinstance(node, dict):
        if "patternProperties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        if node.get("in") == "query" and isinstance(node.get("schema"), dict):
            schema = node["schema"]
            any_of = schema.get("anyOf")
            if isinstance(any_of, list):
                kept = [s for s in any_of if s != {"type": "null"}]
                if len(kept) == 1:
                    schema.pop("anyOf")
                    schema.update(kept[0])
                else:
                    schema["anyOf"] = kept
        for value in node.values():
            _tighten(value)
    elif isinstance(node, list):
        for item in node:
            _tighten(item)
