"""The hash chain and its signatures, as pure functions over stored rows.

Record ``n`` (positions start at 1) stores ``prev_hash`` (record ``n-1``'s hash, or
:data:`GENESIS_HASH`), ``hash = sha256(domain | n | prev_hash | event_json)`` over the
exact stored event text, and an Ed25519 signature over that hash. A chain head row
(last position, last hash, signed separately) lets verify notice records cut off the end.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from broker.audit.keys import key_id
from broker.core.audit_events import AuditEvent, AuditEventError, canonical_json, format_time

GENESIS_HASH: Final = "0" * 64
_RECORD_DOMAIN: Final = b"podbroker-audit-record-v1"
_HEAD_DOMAIN: Final = b"podbroker-audit-head-v1"


def record_hash(position: int, prev_hash: str, event_json: str) -> str:
    digest = hashlib.sha256()
    for part in (
        _RECORD_DOMAIN,
        str(position).encode(),
        prev_hash.encode("ascii"),
        event_json.encode("utf-8"),
    ):
        # Length-prefix each part so no two different tuples hash the same bytes.
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _record_message(hash_hex: str) -> bytes:
    return _RECORD_DOMAIN + b":" + hash_hex.encode("ascii")


def _head_message(position: int, hash_hex: str) -> bytes:
    return _HEAD_DOMAIN + b":" + str(position).encode() + b":" + hash_hex.encode("ascii")


def sign_record(key: Ed25519PrivateKey, hash_hex: str) -> str:
    return base64.b64encode(key.sign(_record_message(hash_hex))).decode("ascii")


def sign_head(key: Ed25519PrivateKey, position: int, hash_hex: str) -> str:
    return base64.b64encode(key.sign(_head_message(position, hash_hex))).decode("ascii")


def _valid(key: Ed25519PublicKey, signature_b64: str, message: bytes) -> bool:
    try:
        key.verify(base64.b64decode(signature_b64, validate=True), message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class StoredRow:
    """A record exactly as stored, before any trust is placed in it."""

    position: int
    time: str
    kind: str
    launch_id: str | None
    dag_id: str | None
    event_json: str
    prev_hash: str
    hash: str
    signature: str
    key_id: str


@dataclass(frozen=True)
class ChainHead:
    position: int
    hash: str
    signature: str
    key_id: str


@dataclass(frozen=True)
class AuditRecord:
    """A stored event with its place in the chain."""

    position: int
    event: AuditEvent
    prev_hash: str
    hash: str
    signature: str
    key_id: str

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "signature": self.signature,
            "key_id": self.key_id,
            "event": json.loads(self.event.canonical_json()),
        }

    @classmethod
    def from_row(cls, row: StoredRow) -> AuditRecord:
        return cls(
            position=row.position,
            event=parse_event(row.event_json),
            prev_hash=row.prev_hash,
            hash=row.hash,
            signature=row.signature,
            key_id=row.key_id,
        )


def parse_event(event_json: str) -> AuditEvent:
    return AuditEvent.from_json_dict(json.loads(event_json))


def make_row(event: AuditEvent, position: int, prev_hash: str, key: Ed25519PrivateKey) -> StoredRow:
    event_json = event.canonical_json()
    hash_hex = record_hash(position, prev_hash, event_json)
    return StoredRow(
        position=position,
        time=format_time(event.time),
        kind=event.kind.value,
        launch_id=event.launch_id,
        dag_id=event.dag_id,
        event_json=event_json,
        prev_hash=prev_hash,
        hash=hash_hex,
        signature=sign_record(key, hash_hex),
        key_id=key_id(key.public_key()),
    )


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records_checked: int
    first_break_position: int | None = None
    problem: str | None = None
    last_position: int = 0
    last_hash: str = GENESIS_HASH

    def summary(self) -> str:
        if self.ok:
            return (
                f"audit chain OK: {self.records_checked} records, last position "
                f"{self.last_position}, head hash {self.last_hash}"
            )
        return (
            f"audit chain BROKEN at position {self.first_break_position}: {self.problem} "
            f"({self.records_checked} records checked)"
        )


def _check_row(
    row: StoredRow, expected: int, prev: str, keys: Mapping[str, Ed25519PublicKey]
) -> str | None:
    """The problem with ``row`` as the ``expected``-th record, or None."""
    if row.position > expected:
        return f"record {expected} is missing (next stored is {row.position}): a record was deleted"
    if row.position < expected:
        return f"record {row.position} appears twice or out of order: a record was inserted"
    if row.prev_hash != prev:
        return (
            "link to the previous record is broken: a record before it was deleted, "
            "inserted or reordered"
        )
    if record_hash(row.position, row.prev_hash, row.event_json) != row.hash:
        return "content does not match its hash: the record was changed"
    key = keys.get(row.key_id)
    if key is None:
        return f"signed by unknown key {row.key_id!r}: the record was forged or inserted"
    if not _valid(key, row.signature, _record_message(row.hash)):
        return "signature is invalid: the record was changed, forged or inserted"
    try:
        event = parse_event(row.event_json)
    except (ValueError, ValidationError, AuditEventError):
        return "the signed event is unreadable"
    if (row.time, row.kind, row.launch_id, row.dag_id) != (
        format_time(event.time),
        event.kind.value,
        event.launch_id,
        event.dag_id,
    ):
        return "indexed columns (time, kind, launch_id, dag_id) disagree with the signed event"
    return None


def verify_rows(
    rows: Iterable[StoredRow], head: ChainHead | None, public_keys: Iterable[Ed25519PublicKey]
) -> VerifyResult:
    """Walk ``rows`` in position order; report the first break with its position."""
    keys = {key_id(k): k for k in public_keys}
    expected, prev, checked = 1, GENESIS_HASH, 0
    for row in rows:
        checked += 1
        problem = _check_row(row, expected, prev, keys)
        if problem is not None:
            where = expected if row.position > expected else row.position
            return VerifyResult(False, checked, where, problem, expected - 1, prev)
        prev = row.hash
        expected += 1
    last = expected - 1
    if head is None:
        return VerifyResult(False, checked, last + 1, "the chain head row is missing", last, prev)
    if head.position > last:
        return VerifyResult(
            False,
            checked,
            last + 1,
            f"the chain head says {head.position} records but only {last} "
            "remain: records at the end were deleted",
            last,
            prev,
        )
    if head.position < last:
        return VerifyResult(
            False,
            checked,
            head.position + 1,
            f"records after position {head.position} are not covered by the "
            "chain head: they were inserted",
            last,
            prev,
        )
    if head.hash != prev:
        return VerifyResult(
            False, checked, last, "the chain head hash does not match the last record", last, prev
        )
    if last > 0:
        key = keys.get(head.key_id)
        if key is None or not _valid(key, head.signature, _head_message(head.position, head.hash)):
            return VerifyResult(
                False, checked, last, "the chain head signature is invalid", last, prev
            )
    return VerifyResult(True, checked, None, None, last, prev)


def canonical_record_line(record: AuditRecord) -> str:
    """One JSON line for a record (export format)."""
    return canonical_json(record.to_json_dict())
