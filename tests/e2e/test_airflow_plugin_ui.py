"""The podbroker plugin in a real Airflow API server: registered (plugins API), guarded
by Airflow's own auth, and showing the real broker's report and task-try view fetched
through the podbroker connection. SimpleAuthManager's roles cannot limit DAGs (a viewer
reads all), so the server runs tests/e2e/dag_scoped_auth.py: SimpleAuthManager plus
per-user DAG globs, asked through the same auth manager interface a real one answers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from podbroker_devstack.broker_env import BrokerHandle
from podbroker_devstack.procs import free_port

pytestmark = [pytest.mark.stack, pytest.mark.airflow]

AIRFLOW = Path(sys.executable).parent / "airflow"
PAGE = "/podbroker/secret-usage"
TI_PAGE = "/podbroker/task-instance"
REPO = Path(__file__).resolve().parents[2]
PASSWORDS = {"viewer": "viewer-pw", "analyst": "analyst-pw", "nobody": "nobody-pw"}


@pytest.fixture(scope="module")
def api_server(
    airflow_env: dict[str, str], broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("api-server")
    passwords = folder / "passwords.json"
    passwords.write_text(json.dumps(PASSWORDS))
    port = free_port()
    conn = {"conn_type": "podbroker", "host": broker.url, "password": broker.token}
    env = {
        **airflow_env,
        "AIRFLOW_CONN_PODBROKER_DEFAULT": json.dumps(conn),
        "AIRFLOW__CORE__AUTH_MANAGER": "tests.e2e.dag_scoped_auth.DagScopedAuthManager",
        "PODBROKER_E2E_DAG_ACCESS": json.dumps({"analyst": ["analytics_*"], "nobody": []}),
        "PYTHONPATH": str(REPO),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:viewer" for u in PASSWORDS),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "AIRFLOW__API_AUTH__JWT_SECRET": "e2e-test-jwt-secret-0123456789abcdef",
    }
    # Airflow's auth manager authorizes DAGs it knows: serialize the test DAG folder.
    subprocess.run(
        [str(AIRFLOW), "dags", "reserialize"], env=env, check=True, capture_output=True, timeout=300
    )
    log = (folder / "api-server.log").open("w")
    process = subprocess.Popen(
        [str(AIRFLOW), "api-server", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"api-server exited: {(folder / 'api-server.log').read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{url}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("api-server did not become healthy in 120s")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def login(url: str, user: str = "viewer") -> str:
    response = httpx.post(
        f"{url}/auth/token", json={"username": user, "password": PASSWORDS[user]}, timeout=10
    )
    assert response.status_code == 201, response.text
    return str(response.json()["access_token"])


def test_page_requires_airflow_auth(api_server: str) -> None:
    assert httpx.get(f"{api_server}{PAGE}", timeout=10).status_code == 401
    forged = httpx.get(
        f"{api_server}{PAGE}", headers={"Authorization": "Bearer not-a-jwt"}, timeout=10
    )
    assert forged.status_code in (401, 403)


def test_page_shows_the_broker_report(api_server: str, broker: BrokerHandle) -> None:
    token = login(api_server)
    response = httpx.get(
        f"{api_server}{PAGE}", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code == 200, response.text[-2000:]
    assert "text/html" in response.headers["content-type"]
    assert "Secret usage report" in response.text
    # The UI's session cookie works the same way as the bearer header.
    by_cookie = httpx.get(f"{api_server}{PAGE}", cookies={"_token": token}, timeout=30)
    assert by_cookie.status_code == 200
    leaked = [v for v in broker.planted_values() if v in response.text]
    assert not leaked


def test_plugin_and_external_view_are_registered(api_server: str) -> None:
    token = login(api_server)
    response = httpx.get(
        f"{api_server}/api/v2/plugins", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    plugins = {p["name"]: p for p in response.json()["plugins"]}
    views = plugins["podbroker"]["external_views"]
    assert {"name": "Secret usage", "href": PAGE} in [
        {"name": v["name"], "href": v["href"]} for v in views
    ]


def test_page_shows_only_the_dags_the_user_may_read(
    api_server: str, broker: BrokerHandle, unique: str
) -> None:
    known = "analytics_etl_e2e_denied"  # in tests/dags, so Airflow authorizes reading it
    unknown = f"analytics_etl_not_in_airflow_{unique}"  # never shown to an Airflow user
    for dag_id in (known, unknown):
        denied = httpx.post(
            f"{broker.url}/v1/launches",
            headers=broker.headers(),
            timeout=30,
            json={
                "task": {"dag_id": dag_id, "task_id": "t", "run_id": f"r-{unique}"},
                "container": {"image": "python:3.12-slim"},
                "secrets": ["payments-api"],
            },
        )
        assert denied.status_code == 403, denied.text
    direct = httpx.get(
        f"{broker.url}/v1/audit/report",
        params={"format": "html"},
        headers=broker.headers(),
        timeout=30,
    )
    assert unknown in direct.text  # the broker has it; the page must not show it
    token = login(api_server)
    response = httpx.get(
        f"{api_server}{PAGE}", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert response.status_code == 200, response.text[-2000:]
    assert known in response.text
    assert unknown not in response.text


def deny_launch(broker: BrokerHandle, dag_id: str, run_id: str) -> None:
    denied = httpx.post(
        f"{broker.url}/v1/launches",
        headers=broker.headers(),
        timeout=30,
        json={
            "task": {"dag_id": dag_id, "task_id": "t", "run_id": run_id},
            "container": {"image": "python:3.12-slim"},
            "secrets": ["payments-api"],
        },
    )
    assert denied.status_code == 403, denied.text


def page_as(url: str, user: str, path: str, **params: str) -> httpx.Response:
    token = login(url, user)
    return httpx.get(
        f"{url}{path}", params=params, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def test_a_user_sees_only_the_dags_the_auth_manager_lets_them_read(
    api_server: str, broker: BrokerHandle, unique: str
) -> None:
    analytics, ml = "analytics_etl_e2e_denied", "ml_score_e2e_deferred"  # both in tests/dags
    for dag_id in (analytics, ml):
        deny_launch(broker, dag_id, f"r-{unique}")
    everything = page_as(api_server, "viewer", PAGE)
    assert analytics in everything.text and ml in everything.text
    scoped = page_as(api_server, "analyst", PAGE)
    assert scoped.status_code == 200, scoped.text[-2000:]
    assert analytics in scoped.text and ml not in scoped.text
    nothing = page_as(api_server, "nobody", PAGE)
    assert nothing.status_code == 200
    assert "No DAG you may read" in nothing.text
    assert analytics not in nothing.text and ml not in nothing.text


def test_the_task_instance_view_shows_one_try(
    api_server: str, broker: BrokerHandle, unique: str
) -> None:
    dag_id, run_id = "analytics_etl_e2e_allowed", f"manual__{unique}"
    task = {"dag_id": dag_id, "task_id": "extract", "run_id": run_id, "try_number": 1}
    launched = httpx.post(
        f"{broker.url}/v1/launches",
        headers=broker.headers(),
        timeout=30,
        json={
            "task": task,
            "container": {"image": "python:3.12-slim"},
            "secrets": ["warehouse-readonly"],
            "namespace": broker.namespace,
        },
    )
    assert launched.status_code == 201, launched.text
    launch_id = launched.json()["launch_id"]
    killed = httpx.delete(
        f"{broker.url}/v1/launches/{launch_id}", headers=broker.headers(), timeout=30
    )
    assert killed.status_code == 200, killed.text
    # As Airflow's task-instance tab links it: an unmapped task keeps {MAP_INDEX}.
    query = {"dag_id": dag_id, "run_id": run_id, "task_id": "extract", "map_index": "{MAP_INDEX}"}
    for user in ("viewer", "analyst"):
        response = page_as(api_server, user, TI_PAGE, **query)
        assert response.status_code == 200, response.text[-2000:]
        assert launch_id in response.text
        assert "warehouse-readonly" in response.text and "granted" in response.text
        assert "secret_deleted" in response.text
        assert not [v for v in broker.planted_values() if v in response.text]
    # The operator's extra link names the try.
    one_try = page_as(api_server, "viewer", TI_PAGE, **query, try_number="1")
    assert launch_id in one_try.text
    refused = page_as(api_server, "nobody", TI_PAGE, **query)
    assert refused.status_code == 403 and launch_id not in refused.text
    outside = page_as(
        api_server, "analyst", TI_PAGE, **{**query, "dag_id": "ml_score_e2e_deferred"}
    )
    assert outside.status_code == 403


def test_the_task_instance_view_is_a_registered_tab(api_server: str) -> None:
    token = login(api_server)
    response = httpx.get(
        f"{api_server}/api/v2/plugins", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    plugins = {p["name"]: p for p in response.json()["plugins"]}
    views = {v["name"]: v for v in plugins["podbroker"]["external_views"]}
    assert views["Secrets"]["destination"] == "task_instance"
    assert views["Secrets"]["href"].startswith(f"{TI_PAGE}?dag_id={{DAG_ID}}")
