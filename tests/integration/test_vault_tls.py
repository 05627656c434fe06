"""The broker's Vault session over TLS: trusts exactly the CA it is given."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import VaultUnavailableError
from broker.vault.client import VaultAuth, VaultSession
from podbroker_devstack.openbao import OpenBao, start_openbao


@pytest.fixture
def tls_vault(tmp_path: Path) -> Iterator[OpenBao]:
    server = start_openbao(tmp_path / "openbao", tls=True)
    yield server
    server.stop()


def test_session_over_tls_uses_the_given_ca_and_refuses_without_it(tls_vault: OpenBao) -> None:
    assert tls_vault.url.startswith("https://")
    assert tls_vault.ca_file is not None
    session = VaultSession.connect(
        tls_vault.url, VaultAuth.token(tls_vault.root_token), ca_file=str(tls_vault.ca_file)
    )
    session.ping()
    child = session.new_client(tls_vault.root_token)
    assert child.sys.read_health_status(method="GET")["sealed"] is False

    with pytest.raises(VaultUnavailableError) as refused:
        VaultSession.connect(tls_vault.url, VaultAuth.token(tls_vault.root_token))
    assert tls_vault.root_token not in str(refused.value)
