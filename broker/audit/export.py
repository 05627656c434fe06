"""Export the audit trail as JSON lines for a SIEM, resumably.

Each line is one record: ``position``, ``prev_hash``, ``hash``, ``signature``,
``key_id`` and the ``event``, so the receiver can check the chain itself. With a cursor
file, the next export starts after the last position written; the cursor is replaced
atomically only after the lines are flushed and synced, so a crash re-sends (at most)
the last batch and never skips a record.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TextIO

from broker.audit.chain import canonical_record_line
from broker.audit.store import AuditStore
from broker.errors import InvalidRequestError


def read_cursor(path: Path) -> int:
    """The next position to export according to ``path`` (1 if it does not exist)."""
    if not path.exists():
        return 1
    text = path.read_text().strip()
    try:
        data = json.loads(text)
        return int(data["next_position"])
    except (ValueError, KeyError, TypeError):
        raise InvalidRequestError(f"{path}:1: not a podbroker export cursor") from None


def write_cursor(path: Path, next_position: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as out:
        out.write(json.dumps({"next_position": next_position}) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def export_jsonl(
    store: AuditStore,
    out: TextIO,
    *,
    start: int | None = None,
    cursor: Path | None = None,
    limit: int | None = None,
) -> tuple[int, int]:
    """Write records from ``start`` (else the cursor's position, else 1) to ``out``.
    Returns (records written, next position). Reads ``audit_records`` only."""
    first = start if start is not None else (read_cursor(cursor) if cursor else 1)
    if first < 1:
        raise InvalidRequestError("export: positions start at 1")
    end = None if limit is None else first + limit
    written, next_position = 0, first
    for record in store.records(first, end):
        out.write(canonical_record_line(record) + "\n")
        written += 1
        next_position = record.position + 1
    out.flush()
    # Not a file (a pipe or a test buffer): nothing to sync.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.fsync(out.fileno())
    if cursor is not None:
        write_cursor(cursor, next_position)
    return written, next_position
