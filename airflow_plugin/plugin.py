"""Airflow plugin: a "Secret usage" page in the Airflow UI showing the broker's audit
report (GET /v1/audit/report?format=html). The FastAPI app is mounted by Airflow's API
server under /podbroker and guarded by Airflow's own auth (plugins view permission);
the external view puts it in the Browse menu. The report covers only the DAGs the
signed-in user may read (Airflow's auth manager, ``get_authorized_dag_ids``): a user
who may read none sees an empty page, never everything."""

from __future__ import annotations

import html
from typing import Annotated

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_view
from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import conf
from fastapi import Depends, FastAPI, Query
from fastapi.responses import HTMLResponse

from airflow_plugin.hook import BrokerHook
from airflow_plugin.settings import DEFAULT_CONN_ID, ConnectionConfigError
from broker.errors import BrokerError, TemporaryError

URL_PREFIX = "/podbroker"
REPORT_PATH = "/secret-usage"


def _conn_id() -> str:
    return conf.get("podbroker", "conn_id", fallback=DEFAULT_CONN_ID) or DEFAULT_CONN_ID


def _error_page(status: int, message: str) -> HTMLResponse:
    body = (
        "<!doctype html><html><head><title>Secret usage</title></head><body>"
        "<h1>Secret usage</h1><p>The report is unavailable: "
        f"{html.escape(message)}</p></body></html>"
    )
    return HTMLResponse(body, status_code=status)


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
        to the DAGs the user may read."""
        if not readable:
            return _empty_page(dag)
        try:
            with BrokerHook(_conn_id()).get_conn() as client:
                report = client.audit_report(
                    fmt="html", dag=dag, since=since, dag_ids=sorted(readable)
                )
        except TemporaryError as exc:
            return _error_page(503, exc.reason)
        except (BrokerError, ConnectionConfigError) as exc:
            return _error_page(502, str(exc))
        return HTMLResponse(report)

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
        }
    ]
