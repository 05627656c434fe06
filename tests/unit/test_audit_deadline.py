"""An audit-store operation the database does not answer in time: the caller gets a
retryable error within the deadline, and the abandoned append is rolled back, never
committed later (SQLite held by another writer stands in for a hung database)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.store import open_audit_store
from broker.core import audit_events as ev
from broker.errors import AuditUnavailableError


def test_a_held_database_gives_a_prompt_503_and_no_late_commit(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    key = Ed25519PrivateKey.generate()
    event = ev.launch_event(ev.EventKind.POD_CREATED, launch_id="L1", pod="p")
    with open_audit_store(f"sqlite:///{path}", key) as store:
        store.append(event)
        store.deadline = 0.5
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        # The deadline path (not the driver's own lock wait) is what answers.
        with pytest.raises(AuditUnavailableError, match=r"did not answer within 0\.5s") as caught:
            store.append(event)
        assert caught.value.retryable
        holder.execute("COMMIT")
        holder.close()
        time.sleep(0.3)  # the worker now gets the lock, sees it was abandoned, rolls back
        store.deadline = 5
        assert store.last_position() == 1
        assert store.verify(key.public_key()).ok
