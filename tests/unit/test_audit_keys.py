"""Signing keys: written private (0600), read back, wrong kinds refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.audit.keys import (
    generate_signing_key,
    key_id,
    load_public_key,
    load_signing_key,
    public_path,
)
from broker.errors import InvalidRequestError


def test_generate_then_load(tmp_path: Path) -> None:
    path = tmp_path / "k" / "audit.key"
    key = generate_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = load_signing_key(path)
    assert key_id(loaded.public_key()) == key_id(key.public_key())
    assert key_id(load_public_key(public_path(path))) == key_id(key.public_key())
    assert key_id(load_public_key(path)) == key_id(key.public_key())  # private file works too


def test_wrong_or_missing_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="cannot read"):
        load_signing_key(tmp_path / "missing")
    junk = tmp_path / "junk"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    with pytest.raises(InvalidRequestError, match="not an unencrypted PEM") as info:
        load_signing_key(junk)
    assert "base64" not in str(info.value)
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(InvalidRequestError, match="must be Ed25519"):
        load_signing_key(ec_key)
