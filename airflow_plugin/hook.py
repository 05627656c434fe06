"""The hook owns the ``podbroker`` connection and the HTTP clients built from it.

Connection fields: host = broker URL (``https://podbroker.podbroker.svc:8443``, or host
plus extra ``scheme``), password = static token (development only), extra
``auth_method`` / ``token_file`` / ``ca_bundle`` / ``namespace`` / ``timeout``. In a
cluster the password stays empty and the projected ServiceAccount token file is read on
every request."""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook

from airflow_plugin.client import AsyncBrokerClient, BrokerClient
from airflow_plugin.settings import (
    CONN_TYPE,
    DEFAULT_CONN_ID,
    BrokerConnectionSettings,
    settings_from_connection,
)


def _settings(conn: Any) -> BrokerConnectionSettings:
    return settings_from_connection(
        host=conn.host, port=conn.port, password=conn.password, extra=conn.extra
    )


class BrokerHook(BaseHook):
    """Talks to the broker API on behalf of one Airflow connection.

    :param podbroker_conn_id: connection of type ``podbroker``.
    """

    conn_name_attr = "podbroker_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = CONN_TYPE
    hook_name = "Pod Broker"

    def __init__(self, podbroker_conn_id: str = DEFAULT_CONN_ID) -> None:
        super().__init__()
        self.podbroker_conn_id = podbroker_conn_id

    @cached_property
    def settings(self) -> BrokerConnectionSettings:
        """Settings read from the connection (once per hook)."""
        return _settings(self.get_connection(self.podbroker_conn_id))

    def get_conn(self) -> BrokerClient:
        """A new blocking client; close it (or use it as a context manager)."""
        return BrokerClient(self.settings)

    async def aget_settings(self) -> BrokerConnectionSettings:
        """Settings read through the async connection lookup (triggerer)."""
        return _settings(await self.aget_connection(self.podbroker_conn_id))

    async def aget_conn(self) -> AsyncBrokerClient:
        """A new non-blocking client; ``await client.aclose()`` when done."""
        return AsyncBrokerClient(await self.aget_settings())

    def test_connection(self) -> tuple[bool, str]:
        """Airflow's "Test" button: reads the audit report endpoint (any 2xx means the
        URL, TLS and token are right)."""
        try:
            with self.get_conn() as client:
                client.audit_report(fmt="json")
        except Exception as exc:
            return False, str(exc)
        return True, "the broker answered"
