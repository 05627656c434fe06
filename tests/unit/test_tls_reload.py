"""The broker's TLS context picks up a rotated certificate without a restart: a real
uvicorn server, two real certificates, the files replaced the way a Secret volume does."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from cryptography import x509

from broker.cli.tls import ReloadingTLSContext
from podbroker_devstack.pki import CertPair, LocalCA
from tests.helpers import eventually


async def _hello(scope: dict[str, object], receive: object, send: object) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _replace(source: CertPair, target: CertPair) -> None:
    """Swap both files in atomically (new inode), as the kubelet's ..data link swap does."""
    for src, dst in ((source.cert, target.cert), (source.key, target.key)):
        tmp = dst.with_suffix(".new")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _served_serial(port: int, ca: Path) -> int:
    client = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        client.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert b"200" in tls.recv(1024)
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[LocalCA, CertPair, ReloadingTLSContext, int]]:
    ca = LocalCA(tmp_path / "ca")
    first = ca.issue("first", common_name="broker", server=True)
    live = CertPair(cert=tmp_path / "tls.crt", key=tmp_path / "tls.key")
    _replace(first, live)
    reloading = ReloadingTLSContext(live.cert, live.key, check_interval=0)
    port = _free_port()
    config = uvicorn.Config(_hello, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    config.load()
    config.ssl = reloading.context
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    if not eventually(lambda: bool(server.started), timeout=10, interval=0.02):
        raise RuntimeError("uvicorn did not start")
    yield ca, live, reloading, port
    server.should_exit = True
    thread.join(10)


def _serial(pair: CertPair) -> int:
    return x509.load_pem_x509_certificate(pair.cert.read_bytes()).serial_number


def test_a_rotated_certificate_is_served_without_a_restart(
    served: tuple[LocalCA, CertPair, ReloadingTLSContext, int],
) -> None:
    ca, live, reloading, port = served
    first_serial = _serial(live)
    assert _served_serial(port, ca.cert_path) == first_serial

    second = ca.issue("second", common_name="broker", server=True)
    _replace(second, live)

    assert _served_serial(port, ca.cert_path) == _serial(second) != first_serial
    assert reloading.reloads == 1
    assert _served_serial(port, ca.cert_path) == _serial(second)  # loaded once, kept
    assert reloading.reloads == 1


def test_a_half_written_pair_keeps_the_previous_certificate(
    served: tuple[LocalCA, CertPair, ReloadingTLSContext, int],
) -> None:
    ca, live, reloading, port = served
    first_serial = _serial(live)
    second = ca.issue("second", common_name="broker", server=True)
    # The new certificate has arrived, its key not yet: they do not match.
    shutil.copyfile(second.cert, live.cert.with_suffix(".new"))
    os.replace(live.cert.with_suffix(".new"), live.cert)

    assert _served_serial(port, ca.cert_path) == first_serial
    assert reloading.reloads == 0

    _replace(second, live)  # the key follows
    assert _served_serial(port, ca.cert_path) == _serial(second)
    assert reloading.reloads == 1


def test_files_are_checked_at_most_once_per_interval(tmp_path: Path) -> None:
    ca = LocalCA(tmp_path / "ca")
    live = CertPair(cert=tmp_path / "tls.crt", key=tmp_path / "tls.key")
    _replace(ca.issue("first", common_name="broker", server=True), live)
    now = [100.0]
    reloading = ReloadingTLSContext(live.cert, live.key, check_interval=5, clock=lambda: now[0])
    before = reloading.current()
    _replace(ca.issue("second", common_name="broker", server=True), live)
    now[0] += 1
    assert reloading.current() is before  # not looked at yet
    now[0] += 5
    assert reloading.current() is not before
    assert reloading.reloads == 1
