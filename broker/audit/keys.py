"""Ed25519 keys that sign the audit chain.

The private key is a PEM file (PKCS#8, unencrypted): on a workstation a file written by
``podbroker audit keygen``, in a cluster a Kubernetes Secret mounted as a file (the
broker reads the file; it never calls the Kubernetes API for it). The public key (PEM,
SubjectPublicKeyInfo) is what ``podbroker audit verify`` needs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.errors import InvalidRequestError


def generate_signing_key(path: str | Path, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Write a new private key to ``path`` (mode 0600) and its public key to
    ``path.pub``; refuse to overwrite an existing key unless asked."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise InvalidRequestError(f"{target}: a key already exists; not overwritten")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    os.chmod(target, 0o600)
    public_path(target).write_bytes(public_pem(key.public_key()))
    return key


def public_path(private_path: str | Path) -> Path:
    p = Path(private_path)
    return p.with_name(p.name + ".pub")


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_signing_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM) from a file or a mounted Kubernetes Secret."""
    target = Path(path)
    try:
        data = target.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(
            f"{target}: cannot read the audit signing key: {exc.strerror}"
        ) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # The message of the underlying error could quote key material: do not chain text.
        raise InvalidRequestError(f"{target}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidRequestError(f"{target}: the audit signing key must be Ed25519")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key (PEM); a private key file is accepted too."""
    target = Path(path)
    try:
        data = target.read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"{target}: cannot read the public key: {exc.strerror}") from exc
    if b"PRIVATE KEY" in data:
        return load_signing_key(target).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise InvalidRequestError(f"{target}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidRequestError(f"{target}: the audit public key must be Ed25519")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """Short fingerprint recorded with each signature (lets verify pick among keys)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]
