"""The chain walk (pure): each kind of tampering is reported at its position."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.chain import (
    GENESIS_HASH,
    ChainHead,
    StoredRow,
    make_row,
    record_hash,
    sign_head,
    verify_rows,
)
from broker.core import audit_events as ev

KEY = Ed25519PrivateKey.generate()


def chain(n: int = 6) -> tuple[list[StoredRow], ChainHead]:
    rows: list[StoredRow] = []
    prev = GENESIS_HASH
    for i in range(1, n + 1):
        event = ev.launch_event(
            ev.EventKind.POD_CREATED,
            launch_id=f"L{i}",
            time=datetime(2026, 1, 1, 0, i, tzinfo=UTC),
            pod=f"p{i}",
        )
        row = make_row(event, i, prev, KEY)
        rows.append(row)
        prev = row.hash
    last = rows[-1]
    return rows, ChainHead(
        last.position, last.hash, sign_head(KEY, last.position, last.hash), last.key_id
    )


def test_intact_chain_verifies() -> None:
    rows, head = chain()
    result = verify_rows(rows, head, [KEY.public_key()])
    assert result.ok and result.records_checked == 6 and result.last_position == 6


def test_changed_content_is_caught() -> None:
    rows, head = chain()
    rows[2] = dataclasses.replace(rows[2], event_json=rows[2].event_json.replace("p3", "p9"))
    result = verify_rows(rows, head, [KEY.public_key()])
    assert (result.ok, result.first_break_position) == (False, 3)
    assert "changed" in (result.problem or "")


def test_rehashed_change_fails_the_signature() -> None:
    rows, head = chain()
    r = rows[2]
    forged_json = r.event_json.replace("p3", "p9")
    rows[2] = dataclasses.replace(
        r, event_json=forged_json, hash=record_hash(3, r.prev_hash, forged_json)
    )
    result = verify_rows(rows, head, [KEY.public_key()])
    assert result.first_break_position == 3 and "signature" in (result.problem or "")


def test_deleted_record_is_caught() -> None:
    rows, head = chain()
    del rows[3]
    result = verify_rows(rows, head, [KEY.public_key()])
    assert result.first_break_position == 4 and "deleted" in (result.problem or "")


def test_reordered_records_are_caught() -> None:
    rows, head = chain()
    a, b = rows[1], rows[2]
    rows[1] = dataclasses.replace(b, position=2)
    rows[2] = dataclasses.replace(a, position=3)
    result = verify_rows(rows, head, [KEY.public_key()])
    assert result.first_break_position == 2 and not result.ok


def test_truncated_tail_is_caught_by_the_head() -> None:
    rows, head = chain()
    result = verify_rows(rows[:-2], head, [KEY.public_key()])
    assert result.first_break_position == 5 and "end were deleted" in (result.problem or "")


def test_unknown_key_is_caught() -> None:
    rows, head = chain()
    result = verify_rows(rows, head, [Ed25519PrivateKey.generate().public_key()])
    assert result.first_break_position == 1 and "unknown key" in (result.problem or "")


@pytest.mark.parametrize("field", ["time", "kind", "launch_id", "dag_id"])
def test_index_columns_must_agree_with_the_signed_event(field: str) -> None:
    rows, head = chain()
    rows[0] = dataclasses.replace(rows[0], **{field: "x"})
    result = verify_rows(rows, head, [KEY.public_key()])
    assert result.first_break_position == 1 and "indexed columns" in (result.problem or "")
