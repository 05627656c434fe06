"""The group committer's rules, with an in-memory write (the real-database test is in
tests/integration/test_audit_store.py): requests queued while the writer is busy share a
transaction; a request abandoned before the commit is left out and the rest written; a
group the database refuses is written again one by one so only the bad request fails."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from broker.audit.group_commit import AbandonedError, GroupCommitter, Pending


class Writer:
    """Commits strings; ``gate`` holds the first transaction until the test opens it."""

    def __init__(self) -> None:
        self.committed: list[list[str]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.abandon_in_its_group: Pending[str, str] | None = None

    def write(self, group: Sequence[Pending[str, str]]) -> list[str]:
        self.entered.set()
        self.gate.wait(5)
        if self.abandon_in_its_group is not None and self.abandon_in_its_group in group:
            self.abandon_in_its_group.abandoned.set()  # its caller gives up mid-transaction
            self.abandon_in_its_group = None
        if any(p.payload == "bad" for p in group):
            raise ValueError("refused value")
        if any(p.abandoned.is_set() for p in group):
            raise AbandonedError
        self.committed.append([p.payload for p in group])
        return [f"ok:{p.payload}" for p in group]


def test_requests_queued_while_busy_share_one_transaction() -> None:
    writer = Writer()
    committer: GroupCommitter[str, str] = GroupCommitter(writer.write, "test-writer")
    first = committer.submit("a")
    assert writer.entered.wait(5)
    rest = [committer.submit(x) for x in ("b", "c", "d")]
    writer.gate.set()
    assert [p.result.result(5) for p in (first, *rest)] == ["ok:a", "ok:b", "ok:c", "ok:d"]
    assert writer.committed == [["a"], ["b", "c", "d"]]
    assert committer.transactions == 2
    committer.close()


def test_an_abandoned_request_is_left_out_and_the_rest_committed() -> None:
    writer = Writer()
    committer: GroupCommitter[str, str] = GroupCommitter(writer.write, "test-writer")
    blocker = committer.submit("a")
    assert writer.entered.wait(5)
    kept, given_up = committer.submit("b"), committer.submit("c")
    writer.abandon_in_its_group = given_up
    writer.gate.set()
    assert blocker.result.result(5) == "ok:a"
    assert kept.result.result(5) == "ok:b"
    assert writer.committed == [["a"], ["b"]]  # [b, c] rolled back, then [b] alone
    assert not given_up.result.done()  # its caller already answered "unavailable"
    committer.close()


def test_a_refused_group_is_retried_one_by_one_so_only_the_bad_request_fails() -> None:
    writer = Writer()
    committer: GroupCommitter[str, str] = GroupCommitter(writer.write, "test-writer")
    blocker = committer.submit("a")
    assert writer.entered.wait(5)
    good, bad = committer.submit("b"), committer.submit("bad")
    writer.gate.set()
    assert blocker.result.result(5) == "ok:a" and good.result.result(5) == "ok:b"
    with pytest.raises(ValueError, match="refused value"):
        bad.result.result(5)
    committer.close()


def test_an_unreachable_database_fails_the_whole_group_at_once() -> None:
    writer = Writer()
    committer: GroupCommitter[str, str] = GroupCommitter(
        writer.write, "test-writer", one_by_one=lambda exc: not isinstance(exc, ValueError)
    )
    blocker = committer.submit("a")
    assert writer.entered.wait(5)
    good, bad = committer.submit("b"), committer.submit("bad")
    writer.gate.set()
    assert blocker.result.result(5) == "ok:a"
    for pending in (good, bad):
        with pytest.raises(ValueError, match="refused value"):
            pending.result.result(5)
    committer.close()
    with pytest.raises(RuntimeError, match="closed"):
        committer.submit("late")
