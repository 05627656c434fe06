"""The "Secret usage" plugin in a real Airflow API server: registered (plugins API),
guarded by Airflow's own auth (SimpleAuthManager), and showing the real broker's
report fetched through the podbroker connection."""

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


@pytest.fixture(scope="module")
def api_server(
    airflow_env: dict[str, str], broker: BrokerHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("api-server")
    passwords = folder / "passwords.json"
    passwords.write_text(json.dumps({"viewer": "viewer-pw"}))
    port = free_port()
    conn = {"conn_type": "podbroker", "host": broker.url, "password": broker.token}
    env = {
        **airflow_env,
        "AIRFLOW_CONN_PODBROKER_DEFAULT": json.dumps(conn),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "viewer:viewer",
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


def login(url: str) -> str:
    response = httpx.post(
        f"{url}/auth/token", json={"username": "viewer", "password": "viewer-pw"}, timeout=10
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
