"""Airflow's own API server on the local stack (SQLite, SimpleAuthManager), with a
read-only user for the broker: what the broker asks to verify task instances."""

from __future__ import annotations

import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from podbroker_devstack.procs import ManagedProcess, free_port, wait_until

BROKER_USER = "podbroker"
"""The broker's Airflow credential: Airflow's viewer role reads task instances."""


@dataclass
class AirflowApi:
    url: str
    process: ManagedProcess
    password_file: Path
    """Holds the broker user's password (what `airflow.auth.password_file` points at)."""
    passwords: dict[str, str]

    def settings(self, verification: str = "enforce") -> dict[str, object]:
        """The broker's `airflow` settings section for this server."""
        return {
            "api_url": self.url,
            "verification": verification,
            "cache_seconds": 1,
            "ended_grace_seconds": 5,
            "auth": {
                "method": "password",
                "username": BROKER_USER,
                "password_file": str(self.password_file),
            },
        }

    def token(self, user: str) -> str:
        response = httpx.post(
            f"{self.url}/auth/token",
            json={"username": user, "password": self.passwords[user]},
            timeout=10,
        )
        response.raise_for_status()
        return str(response.json()["access_token"])

    def stop(self) -> None:
        self.process.stop()


def start_airflow_api(
    folder: Path, airflow_env: dict[str, str], *, timeout: float = 180
) -> AirflowApi:
    """``airflow api-server`` on a free loopback port against the given AIRFLOW_HOME,
    with users ``podbroker`` (viewer, the broker's) and ``admin`` (tests mark task
    instances failed with it). Ready when ``/api/v2/monitor/health`` answers."""
    folder.mkdir(parents=True, exist_ok=True)
    passwords = {BROKER_USER: secrets.token_urlsafe(16), "admin": secrets.token_urlsafe(16)}
    users_file = folder / "simple-auth-passwords.json"
    users_file.write_text(json.dumps(passwords))
    users_file.chmod(0o600)
    password_file = folder / "broker-airflow-password"
    password_file.write_text(passwords[BROKER_USER])
    password_file.chmod(0o600)
    port = free_port()
    env = {
        **airflow_env,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{BROKER_USER}:viewer,admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(users_file),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
    }
    airflow = Path(sys.executable).parent / "airflow"
    process = ManagedProcess(
        "airflow-api-server",
        [str(airflow), "api-server", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"],
        folder / "api-server.log",
        env=env,
    ).start()
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        return httpx.get(f"{url}/api/v2/monitor/health", timeout=2).status_code == 200

    try:
        wait_until(healthy, timeout=timeout, what="Airflow API server", alive=process)
    except BaseException:
        process.stop()
        raise
    return AirflowApi(url, process, password_file, passwords)
