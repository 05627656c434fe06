"""Airflow plugin: a "Secret usage" page in the Airflow UI showing the broker's audit
report (GET /v1/audit/report?format=html). The FastAPI app is mounted by Airflow's API
server under /podbroker and guarded by Airflow's own auth (plugins view permission);
the external view puts it in the Browse menu."""

from __future__ import annotations

import html
from typing import Annotated

from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
from airflow.api_fastapi.core_api.security import requires_access_view
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


def create_app() -> FastAPI:
    """The plugin's app; every route requires Airflow's PLUGINS view permission."""
    app = FastAPI(
        title="podbroker secret usage",
        dependencies=[Depends(requires_access_view(AccessView.PLUGINS))],
    )

    @app.get(REPORT_PATH, response_class=HTMLResponse)
    def secret_usage(
        dag: Annotated[str | None, Query(max_length=250)] = None,
        since: Annotated[str | None, Query(max_length=64)] = None,
    ) -> HTMLResponse:
        """Proxy the broker's HTML report (the broker renders and escapes it)."""
        try:
            with BrokerHook(_conn_id()).get_conn() as client:
                report = client.audit_report(fmt="html", dag=dag, since=since)
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
