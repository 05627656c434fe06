"""HTTP client of the broker API (/v1), sync and async, on httpx. The one place where
HTTP responses and transport failures become ``broker.errors`` exceptions, so the hook,
operator and trigger only ever see: DeniedError (403, names the secrets not granted),
InvalidRequestError (422), AuthenticationError (401), NotFoundError (404),
ConflictError (409), MisconfiguredError (500 naming the broker's own setup: its
operator must fix it) and TemporaryError (other 5xx, connection failures; retry later).

Nothing secret travels through here: requests carry secret *names*; responses carry
launch status and pod log lines (the task's own output)."""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator, Sequence
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from airflow_plugin.settings import BrokerConnectionSettings
from broker.core.api_models import (
    ErrorBody,
    LaunchDryRun,
    LaunchRequest,
    LaunchView,
    ReportQuery,
)
from broker.core.timeline import TaskTry, TaskTryAudit
from broker.errors import (
    BrokerError,
    BrokerUnavailableError,
    InvalidRequestError,
    error_for_status,
)

TERMINAL_PHASES = frozenset({"Succeeded", "Failed", "Deleted"})
_USER_AGENT = "podbroker-airflow/0.1"


class _BearerAuth(httpx.Auth):
    """Adds ``Authorization: Bearer`` with a token read at request time, so a rotated
    projected ServiceAccount token is picked up without restarting anything."""

    def __init__(self, settings: BrokerConnectionSettings) -> None:
        self._settings = settings

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._settings.bearer_token()}"
        yield request


def _retry_after(response: httpx.Response) -> int:
    try:
        return max(1, int(response.headers.get("Retry-After", "5")))
    except ValueError:
        return 5


def error_from_response(response: httpx.Response, body_text: str) -> BrokerError:
    """Translate a 4xx/5xx response into the broker error tree (never raises), with the
    one table the API answers from (``broker.errors.error_for_status``)."""
    status = response.status_code
    code: str | None
    try:
        body = ErrorBody.model_validate(json.loads(body_text))
        reason, code, denied, component = (
            body.reason,
            body.error,
            body.denied_secrets,
            body.component,
        )
    except (ValueError, TypeError):
        reason = body_text.strip()[:300] or response.reason_phrase
        code, denied, component = None, [], None
    return error_for_status(
        status,
        f"broker answered {status}: {reason}",
        code=code,
        denied=denied,
        component=component,
        retry_after=_retry_after(response),
    )


def _transport_error(exc: httpx.TransportError, url: str) -> BrokerUnavailableError:
    # The message names the URL and the failure class only: no headers (the token).
    return BrokerUnavailableError(f"broker unreachable at {url}: {type(exc).__name__}: {exc}")


def _launch_path(launch_id: str) -> str:
    return f"/v1/launches/{quote(launch_id, safe='')}"


def _log_params(follow: bool, since_seconds: int | None, timestamps: bool) -> dict[str, str | int]:
    params: dict[str, str | int] = {
        "follow": "true" if follow else "false",
        "timestamps": "true" if timestamps else "false",
    }
    if since_seconds is not None:
        params["since_seconds"] = max(1, since_seconds)
    return params


class BrokerClient:
    """Blocking client, used by the operator and by the UI plugin."""

    def __init__(
        self, settings: BrokerConnectionSettings, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.settings = settings
        self._http = httpx.Client(
            base_url=settings.base_url,
            auth=_BearerAuth(settings),
            verify=settings.verify,
            timeout=settings.timeout,
            headers={"User-Agent": _USER_AGENT},
            transport=transport,
        )

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.settings.base_url) from exc
        if response.status_code >= 400:
            raise error_from_response(response, response.text)
        return response

    def launch(self, request: LaunchRequest) -> LaunchView:
        """POST /v1/launches. Idempotent per task identity: a repeat returns the earlier
        launch with ``created=False``."""
        response = self._request(
            "POST", "/v1/launches", json=request.model_dump(mode="json", exclude_defaults=False)
        )
        return LaunchView.model_validate_json(response.content)

    def dry_run(self, request: LaunchRequest) -> LaunchDryRun:
        """POST /v1/launches?dry_run=true: the launch plan (pod manifest with Secret
        references only, the Vault reads by path, the child token's policies) and the
        policy decision. The broker creates nothing and reads no secret; a denial is a
        decision in the answer, not an error."""
        response = self._request(
            "POST",
            "/v1/launches",
            params={"dry_run": "true"},
            json=request.model_dump(mode="json", exclude_defaults=False),
        )
        return LaunchDryRun.model_validate_json(response.content)

    def get_launch(self, launch_id: str) -> LaunchView:
        """GET /v1/launches/{id}: phase, exit code, reason."""
        return LaunchView.model_validate_json(self._request("GET", _launch_path(launch_id)).content)

    def kill(self, launch_id: str, *, reason: str | None = None) -> LaunchView:
        """DELETE /v1/launches/{id}: the broker deletes the pod and its Secret and
        revokes the launch's leases. ``reason`` (``on_kill``, ``on_finish_action``,
        ``startup_timeout``) goes along as a query parameter for the audit trail."""
        params = {"reason": reason} if reason else None
        return LaunchView.model_validate_json(
            self._request("DELETE", _launch_path(launch_id), params=params).content
        )

    def iter_log_lines(
        self,
        launch_id: str,
        *,
        follow: bool,
        since_seconds: int | None = None,
        timestamps: bool = False,
        idle_timeout: float | None = None,
    ) -> Iterator[str]:
        """GET /v1/launches/{id}/logs as lines, as they arrive when ``follow``.

        With ``idle_timeout``, a followed stream that stays silent that long simply
        ends: the caller checks the launch status and reconnects if the pod still runs
        (a follow stream is not guaranteed to close when the container ends)."""
        read_timeout = idle_timeout if follow else self.settings.timeout
        timeout = httpx.Timeout(self.settings.timeout, read=read_timeout)
        try:
            with self._http.stream(
                "GET",
                f"{_launch_path(launch_id)}/logs",
                params=_log_params(follow, since_seconds, timestamps),
                timeout=timeout,
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_from_response(response, response.text)
                try:
                    yield from response.iter_lines()
                except httpx.ReadTimeout:
                    if not (follow and idle_timeout):
                        raise
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.settings.base_url) from exc

    def audit_report(
        self,
        *,
        fmt: Literal["html", "json"] = "html",
        since: str | None = None,
        dag: str | None = None,
        dag_ids: Sequence[str] | None = None,
    ) -> str:
        """POST /v1/audit/report: the secret-usage report as HTML or JSON text.
        ``dag_ids`` limits it to exactly those DAGs: every DAG an Airflow user may read,
        thousands of ids for an admin, so the query travels as a JSON body (a URL holds
        a few hundred). An empty sequence means no DAG at all, so the broker is not
        asked and this raises ValueError: the caller shows an empty report instead."""
        if dag_ids is not None and not dag_ids:
            raise ValueError("no DAG ids: an empty report needs no broker call")
        try:
            query = ReportQuery(
                format=fmt,
                since=since,  # type: ignore[arg-type]  # RFC 3339 text, read as a datetime
                dag=dag,
                dag_ids=sorted(set(dag_ids)) if dag_ids is not None else None,
            )
        except ValidationError as exc:  # the broker would answer 422 naming the field
            fields = ", ".join(".".join(map(str, e["loc"])) for e in exc.errors())
            raise InvalidRequestError(f"invalid report query: {fields}") from None
        body = query.model_dump(mode="json", exclude_none=True)
        return self._request("POST", "/v1/audit/report", json=body).text

    def launch_audit(self, task: TaskTry, *, max_pages: int = 10) -> TaskTryAudit:
        """GET /v1/audit/launches: what happened to the secrets of one task try (every
        try when ``task.try_number`` is None), names only. Follows the broker's pages
        (at most ``max_pages``; ``next_cursor`` is kept when more remain)."""
        params: dict[str, object] = dict(task.model_dump(exclude_none=True))
        response = self._request("GET", "/v1/audit/launches", params=params)
        audit = TaskTryAudit.model_validate_json(response.content)
        launches = list(audit.launches)
        for _ in range(max_pages - 1):
            if audit.next_cursor is None:
                break
            params["cursor"] = audit.next_cursor
            response = self._request("GET", "/v1/audit/launches", params=params)
            audit = TaskTryAudit.model_validate_json(response.content)
            launches.extend(audit.launches)
        return audit.model_copy(update={"launches": launches})


class AsyncBrokerClient:
    """Non-blocking client for the trigger (runs in the triggerer's event loop)."""

    def __init__(
        self,
        settings: BrokerConnectionSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self._http = httpx.AsyncClient(
            base_url=settings.base_url,
            auth=_BearerAuth(settings),
            verify=settings.verify,
            timeout=settings.timeout,
            headers={"User-Agent": _USER_AGENT},
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.settings.base_url) from exc
        if response.status_code >= 400:
            raise error_from_response(response, response.text)
        return response

    async def get_launch(self, launch_id: str) -> LaunchView:
        """GET /v1/launches/{id}."""
        response = await self._request("GET", _launch_path(launch_id))
        return LaunchView.model_validate_json(response.content)

    async def kill(self, launch_id: str, *, reason: str | None = None) -> LaunchView:
        """DELETE /v1/launches/{id} (see :meth:`BrokerClient.kill`); the trigger's
        on_kill sends ``reason="on_kill"``."""
        params = {"reason": reason} if reason else None
        response = await self._request("DELETE", _launch_path(launch_id), params=params)
        return LaunchView.model_validate_json(response.content)
