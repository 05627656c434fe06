"""Airflow's public REST API, as the broker uses it: read task instances to check that
a launch is for a running one. Every call is bounded by a timeout; failures become
:class:`AirflowUnavailableError` (retryable 503), never a hang and never an allow.

Authentication: the broker's own Airflow credential. ``password``: ``POST /auth/token``
with a username and password (Airflow 3's auth managers issue a JWT there), refreshed
when Airflow answers 401; ``token``: a JWT read from a file on every login (rotated by
whatever writes the file)."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx

from broker.core.models import TaskIdentity
from broker.core.verification import TaskInstanceBatch, TaskInstanceRecord
from broker.errors import AirflowUnavailableError

log = logging.getLogger("podbroker.airflow")

LIST_PATH = "/api/v2/dags/~/dagRuns/~/taskInstances/list"


@dataclass(frozen=True)
class AirflowCredential:
    method: Literal["password", "token"]
    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None

    def __repr__(self) -> str:
        return f"AirflowCredential(method={self.method!r}, username={self.username!r})"


def _record(item: dict[str, Any]) -> TaskInstanceRecord:
    return TaskInstanceRecord(
        id=str(item.get("id") or ""),
        dag_id=str(item.get("dag_id") or ""),
        run_id=str(item.get("dag_run_id") or item.get("run_id") or ""),
        task_id=str(item.get("task_id") or ""),
        map_index=int(item.get("map_index") or 0) if item.get("map_index") is not None else -1,
        try_number=int(item.get("try_number") or 0),
        state=item.get("state"),
        hostname=item.get("hostname") or None,
    )


class AirflowTaskInstances:
    """``GET /api/v2/dags/{dag}/dagRuns/{run}/taskInstances/{task}[/{map_index}]`` and
    the batch ``POST /api/v2/dags/~/dagRuns/~/taskInstances/list``."""

    def __init__(
        self,
        api_url: str,
        credential: AirflowCredential,
        *,
        ca_file: str | None = None,
        timeout: float = 5.0,
        page_size: int = 1000,
        list_budget_seconds: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        verify: ssl.SSLContext | bool = True
        if ca_file:
            verify = ssl.create_default_context(cafile=ca_file)
        self.api_url = api_url.rstrip("/")
        self._credential = credential
        self._http = httpx.Client(
            base_url=self.api_url,
            timeout=httpx.Timeout(timeout),
            verify=verify,
            headers={"User-Agent": "podbroker"},
            trust_env=False,
            transport=transport,
        )
        self.page_size = page_size
        self.list_budget_seconds = list_budget_seconds
        self._clock = clock
        self._token: str | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    # -- auth -----------------------------------------------------------------------------

    def _login(self) -> str:
        cred = self._credential
        if cred.method == "token":
            if cred.token_file is None:
                raise AirflowUnavailableError("airflow.auth.token_file is not set")
            return cred.token_file.read_text().strip()
        if not cred.username or cred.password_file is None:
            raise AirflowUnavailableError("airflow.auth needs username and password_file")
        password = cred.password_file.read_text().strip()
        response = self._send(
            "POST", "/auth/token", json={"username": cred.username, "password": password}
        )
        if response.status_code not in (200, 201):
            raise AirflowUnavailableError(
                f"Airflow refused the broker's login (HTTP {response.status_code}); "
                "check airflow.auth"
            )
        token = response.json().get("access_token")
        if not isinstance(token, str) or not token:
            raise AirflowUnavailableError("Airflow's login answer carried no access_token")
        return token

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise AirflowUnavailableError(f"Airflow API did not answer in time ({path})") from exc
        except httpx.TransportError as exc:
            raise AirflowUnavailableError(
                f"Airflow API unreachable ({type(exc).__name__})"
            ) from exc

    def _authorized(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(2):
            with self._lock:
                if self._token is None or attempt:
                    self._token = self._login()
                token = self._token
            response = self._send(
                method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs
            )
            if response.status_code != 401:
                return response
        raise AirflowUnavailableError("Airflow rejects the broker's credential (HTTP 401)")

    # -- task instances -------------------------------------------------------------------

    def ping(self) -> None:
        """GET /api/v2/monitor/health: is Airflow's API server answering."""
        response = self._send("GET", "/api/v2/monitor/health")
        if response.status_code >= 500:
            raise AirflowUnavailableError(f"Airflow API unhealthy (HTTP {response.status_code})")

    def get(self, task: TaskIdentity) -> TaskInstanceRecord | None:
        """The task instance a launch names, or None when Airflow has none."""
        path = "/api/v2/dags/{}/dagRuns/{}/taskInstances/{}".format(
            *(quote(part, safe="") for part in (task.dag_id, task.run_id, task.task_id))
        )
        if task.map_index >= 0:
            path += f"/{task.map_index}"
        response = self._authorized("GET", path)
        if response.status_code == 404:
            return None
        self._raise_for(response, "read a task instance")
        return _record(response.json())

    def get_many(self, tasks: Sequence[TaskIdentity]) -> TaskInstanceBatch:
        """The task instances of several launches (the reconciler's question), paged:
        the filter (every DAG x run x task id named, all map indexes) may match more than
        one page, so pages are read by ``page_offset`` until Airflow's ``total_entries``
        is covered, ordered by id so the pages do not overlap. Reading stops after
        ``list_budget_seconds``; an answer cut short (budget spent, a short page, the
        list changing while paged) comes back with ``complete=False``. Raises
        AirflowUnavailableError when a page cannot be read at all."""
        if not tasks:
            return TaskInstanceBatch()
        body: dict[str, Any] = {
            "dag_ids": sorted({t.dag_id for t in tasks}),
            "dag_run_ids": sorted({t.run_id for t in tasks}),
            "task_ids": sorted({t.task_id for t in tasks}),
            "order_by": "id",
            "page_limit": self.page_size,
        }
        deadline = self._clock() + self.list_budget_seconds
        found: dict[tuple[str, str, str, int], TaskInstanceRecord] = {}
        total: int | None = None
        offset = 0
        while True:
            response = self._authorized("POST", LIST_PATH, json={**body, "page_offset": offset})
            self._raise_for(response, "list task instances")
            page = response.json()
            items = page.get("task_instances") or []
            for item in items:
                record = _record(item)
                found[record.instance_key] = record
            # Airflow may cap page_limit: move on by what it sent, not by what was asked.
            offset += len(items)
            entries = page.get("total_entries")
            if not isinstance(entries, int) or (total is not None and entries != total):
                complete = False  # no total to cover, or the list changed under the pages
                break
            total = entries
            if offset >= total:
                # Rows that moved between pages show up twice and leave others out.
                complete = len(found) >= total
                break
            if not items or self._clock() >= deadline:
                complete = False
                break
        if not complete:
            log.warning(
                "Airflow's task-instance list was cut short (%d of %s records read)",
                len(found),
                total if total is not None else "unknown",
            )
        return TaskInstanceBatch(tuple(found.values()), complete=complete)

    @staticmethod
    def _raise_for(response: httpx.Response, what: str) -> None:
        if response.status_code >= 400:
            # Airflow's own body may quote the request: name the status only.
            raise AirflowUnavailableError(
                f"Airflow API could not {what} (HTTP {response.status_code})"
            )
