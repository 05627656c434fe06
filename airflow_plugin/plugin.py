"""Airflow plugin: two pages in the Airflow UI, served by a FastAPI app that Airflow's
API server mounts under /podbroker, guarded by Airflow's own auth (plugins view
permission).

- "Secret usage" (Browse menu): the broker's audit report
  (GET /v1/audit/report?format=html) for only the DAGs the signed-in user may read
  (Airflow's auth manager, ``get_authorized_dag_ids``): a user who may read none sees
  an empty page, never everything.
- "Secrets" (a tab on the task instance page; also the operator's extra link): for one
  task try, which secrets were requested, decided, delivered, removed and revoked, and
  any exposure (GET /v1/audit/launches), if the user may read that DAG's task
  instances."""

from __future__ import annotations

import html
from datetime import UTC, datetime, timedelta
from typing import Annotated, overload

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import (
    AccessView,
    DagAccessEntity,
    DagDetails,
)
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_view
from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import conf
from airflow.sdk.exceptions import AirflowNotFoundException
from fastapi import Depends, FastAPI, Query
from fastapi.responses import HTMLResponse

from airflow_plugin.hook import BrokerHook
from airflow_plugin.settings import DEFAULT_CONN_ID, ConnectionConfigError
from broker.core.timeline import LaunchTimeline, TaskTry, TaskTryAudit
from broker.errors import BrokerError, TemporaryError

URL_PREFIX = "/podbroker"
REPORT_PATH = "/secret-usage"
TASK_INSTANCE_PATH = "/task-instance"
TI_TITLE = "Secrets of a task try"
# Airflow's UI fills these in for a task-instance view (an unmapped task has no map
# index: the placeholder stays, and means -1).
TASK_INSTANCE_HREF = (
    f"{URL_PREFIX}{TASK_INSTANCE_PATH}"
    "?dag_id={DAG_ID}&run_id={RUN_ID}&task_id={TASK_ID}&map_index={MAP_INDEX}"
)


def _conn_id() -> str:
    return conf.get("podbroker", "conn_id", fallback=DEFAULT_CONN_ID) or DEFAULT_CONN_ID


def _error_page(status: int, message: str, title: str = "Secret usage") -> HTMLResponse:
    body = (
        f"<!doctype html><html><head><title>{title}</title></head><body>"
        f"<h1>{title}</h1><p>The page is unavailable: "
        f"{html.escape(message)}</p></body></html>"
    )
    return HTMLResponse(body, status_code=status)


def _missing_connection() -> str:
    return (
        f"Airflow has no connection {_conn_id()!r} (type podbroker) for the API server: "
        "define it, e.g. as AIRFLOW_CONN_PODBROKER_DEFAULT"
    )


def readable_dag_ids(user: GetUserDep) -> frozenset[str]:
    """The DAG ids the signed-in user may read, as Airflow's auth manager decides."""
    return frozenset(get_auth_manager().get_authorized_dag_ids(user=user, method="GET"))


def _empty_page(dag: str | None) -> HTMLResponse:
    scope = f" for DAG {html.escape(dag)}" if dag else ""
    body = (
        "<!doctype html><html><head><title>Secret usage</title></head><body>"
        "<h1>Secret usage report</h1>"
        f"<p>No DAG you may read{scope}: nothing to show.</p></body></html>"
    )
    return HTMLResponse(body)


def may_read_task_instances(
    user: GetUserDep, dag_id: Annotated[str, Query(min_length=1, max_length=250)]
) -> bool:
    """Whether the signed-in user may read the task instances of ``dag_id``."""
    return bool(
        get_auth_manager().is_authorized_dag(
            method="GET",
            access_entity=DagAccessEntity.TASK_INSTANCE,
            details=DagDetails(id=dag_id),
            user=user,
        )
    )


@overload
def _index(value: str | None, default: int) -> int: ...
@overload
def _index(value: str | None, default: None) -> int | None: ...
def _index(value: str | None, default: int | None) -> int | None:
    """A query integer, where Airflow may leave its placeholder unfilled."""
    if value is None or value == "" or value.startswith("{"):
        return default
    if not value.lstrip("-").isdigit():
        raise ValueError(value)
    return int(value)


_TI_CSS = """
body{font-family:system-ui,sans-serif;margin:1em 1.5em;color:#222;max-width:70em}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.2em} td.t{white-space:nowrap}
table{border-collapse:collapse;margin:.5em 0 1.2em;width:100%}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top;
overflow-wrap:break-word}
th{background:#f3f3f3;white-space:nowrap} .muted{color:#777} .ok{color:#2a7d2a} .bad{color:#b42318}
.finding{background:#fff4e5;border-left:4px solid #f79009;padding:.4em .7em;margin:.3em 0}
"""


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _launch_html(launch: LaunchTimeline) -> str:
    verdict = (
        "no decision recorded"
        if launch.allowed is None
        else '<span class="ok">allowed</span>'
        if launch.allowed
        else '<span class="bad">denied</span>'
    )
    head = (
        f"<h2>Try {html.escape(str(launch.try_number))} "
        f'<span class="muted">launch {html.escape(launch.launch_id)}</span></h2>'
        f"<p>Requested {_when(launch.requested)} by {html.escape(launch.caller or '-')}"
        f"{', image ' + html.escape(launch.image) if launch.image else ''}: "
        f"{verdict}"
        + (f" ({html.escape('; '.join(launch.reasons))})" if launch.reasons else "")
        + "</p>"
    )
    findings = "".join(f'<p class="finding">{html.escape(f)}</p>' for f in launch.findings)
    rows = "".join(
        "<tr>"
        f"<td>{html.escape(f.secret)}</td>"
        f'<td class="{"ok" if f.decision == "granted" else "bad"}">{f.decision}</td>'
        f"<td>{html.escape(', '.join(f.grants)) or '-'}</td>"
        f'<td class="t">{_when(f.delivered)}</td><td class="t">{_when(f.removed)}</td>'
        f'<td class="t">{_when(f.revoked) if f.dynamic else "static"}</td>'
        f"<td>{'-' if f.exposure_seconds is None else f'{f.exposure_seconds:.1f} s'}</td>"
        "</tr>"
        for f in launch.secrets
    )
    secrets = (
        "<table><thead><tr><th>secret</th><th>decision</th><th>grants</th><th>delivered</th>"
        "<th>removed from the cluster</th><th>lease revoked</th><th>exposure</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        if rows
        else '<p class="muted">no secrets requested</p>'
    )
    events = "".join(
        f"<tr><td>{_when(e.time)}</td><td>{html.escape(e.kind.value)}</td>"
        f"<td>{html.escape(', '.join(e.secret_names))}</td>"
        f"<td>{html.escape('; '.join(f'{k}={v}' for k, v in e.details.items()))}</td></tr>"
        for e in launch.events
    )
    return (
        head
        + findings
        + secrets
        + "<details><summary>Audit events</summary><table><thead><tr><th>time</th>"
        "<th>event</th><th>secrets</th><th>details</th></tr></thead>"
        f"<tbody>{events}</tbody></table></details>"
    )


def _task_instance_page(audit: TaskTryAudit) -> HTMLResponse:
    t = audit.task
    title = (
        f"{t.dag_id} / {t.run_id} / {t.task_id}"
        + (f" [{t.map_index}]" if t.map_index >= 0 else "")
        + (f" try {t.try_number}" if t.try_number is not None else "")
    )
    launches = "".join(_launch_html(launch) for launch in reversed(audit.launches))
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Secrets of {html.escape(title)}</title><style>{_TI_CSS}</style></head><body>"
        f"<h1>Secrets of {html.escape(title)}</h1>"
        + (launches or '<p class="muted">The broker recorded no launch for this task.</p>')
        + "</body></html>"
    )
    return HTMLResponse(body)


DEFAULT_REPORT_WINDOW = timedelta(days=7)
"""The report page's window when the user names none: the report's cost grows with its
window, and a week answers in about a second on a trail of 10^6 events."""


def create_app() -> FastAPI:
    """The plugin's app; every route requires Airflow's PLUGINS view permission."""
    app = FastAPI(
        title="podbroker secret usage",
        dependencies=[Depends(requires_access_view(AccessView.PLUGINS))],
    )

    @app.get(REPORT_PATH, response_class=HTMLResponse)
    def secret_usage(
        readable: Annotated[frozenset[str], Depends(readable_dag_ids)],
        dag: Annotated[str | None, Query(max_length=250)] = None,
        since: Annotated[str | None, Query(max_length=64)] = None,
    ) -> HTMLResponse:
        """Proxy the broker's HTML report (the broker renders and escapes it), limited
        to the DAGs the user may read: the last 7 days unless ``since`` says otherwise
        (``since=all``: the whole trail, slower on a long one)."""
        if not readable:
            return _empty_page(dag)
        if since is None:
            since = (datetime.now(UTC) - DEFAULT_REPORT_WINDOW).isoformat()
        elif since == "all":
            since = None
        try:
            with BrokerHook(_conn_id()).get_conn() as client:
                report = client.audit_report(
                    fmt="html", dag=dag, since=since, dag_ids=sorted(readable)
                )
        except TemporaryError as exc:
            return _error_page(503, exc.reason)
        except (BrokerError, ConnectionConfigError) as exc:
            return _error_page(502, str(exc))
        except AirflowNotFoundException:
            return _error_page(502, _missing_connection())
        return HTMLResponse(report)

    @app.get(TASK_INSTANCE_PATH, response_class=HTMLResponse)
    def task_instance(
        readable: Annotated[bool, Depends(may_read_task_instances)],
        dag_id: Annotated[str, Query(min_length=1, max_length=250)],
        run_id: Annotated[str, Query(min_length=1, max_length=250)],
        task_id: Annotated[str, Query(min_length=1, max_length=250)],
        map_index: Annotated[str | None, Query(max_length=12)] = None,
        try_number: Annotated[str | None, Query(max_length=12)] = None,
    ) -> HTMLResponse:
        """One task try (every try without ``try_number``) as the broker recorded it."""
        if not readable:
            return _error_page(
                403, f"you may not read the task instances of DAG {dag_id}", TI_TITLE
            )
        try:
            task = TaskTry(
                dag_id=dag_id,
                run_id=run_id,
                task_id=task_id,
                map_index=_index(map_index, -1),
                try_number=_index(try_number, None),
            )
        except ValueError:
            return _error_page(422, "map_index and try_number are whole numbers", TI_TITLE)
        try:
            with BrokerHook(_conn_id()).get_conn() as client:
                audit = client.launch_audit(task)
        except TemporaryError as exc:
            return _error_page(503, exc.reason, TI_TITLE)
        except (BrokerError, ConnectionConfigError) as exc:
            return _error_page(502, str(exc), TI_TITLE)
        except AirflowNotFoundException:
            return _error_page(502, _missing_connection(), TI_TITLE)
        return _task_instance_page(audit)

    return app


class PodbrokerPlugin(AirflowPlugin):
    """Registered through the ``airflow.plugins`` entry point."""

    name = "podbroker"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "podbroker"}]
    external_views = [
        {
            "name": "Secret usage",
            "href": f"{URL_PREFIX}{REPORT_PATH}",
            "destination": "nav",
            "category": "browse",
            "url_route": "secret-usage",
        },
        {
            "name": "Secrets",
            "href": TASK_INSTANCE_HREF,
            "destination": "task_instance",
            "url_route": "podbroker-task-secrets",
        },
    ]
