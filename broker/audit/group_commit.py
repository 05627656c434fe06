"""Group commit: one writer thread puts every append queued while it was busy into its
next transaction, so a burst of launches pays for one chain-head lock and one durable
commit per group instead of one per launch, and no append queues on the database's
write lock one by one.

Each request's events stay contiguous in the chain, and a request is durable or not
as a whole. A request whose caller stopped waiting before the commit is left out: the
group is rolled back and written again without it. A group the database refuses is
written again one request at a time, so one bad request fails only its own caller.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

log = logging.getLogger(__name__)

MAX_GROUP: Final = 256
"""Most requests in one transaction (bounds its size and the time one group holds the
chain head)."""

R = TypeVar("R")
P = TypeVar("P")


class AbandonedError(Exception):
    """A caller stopped waiting before the commit: roll back and write the rest again."""


@dataclass
class Pending(Generic[P, R]):
    """One caller's request and the future it waits on."""

    payload: P
    abandoned: threading.Event = field(default_factory=threading.Event)
    result: Future[R] = field(default_factory=Future)


class GroupCommitter(Generic[P, R]):
    """Runs ``write(requests)`` on its own thread for whatever is queued. ``write`` must
    do all of its work in one transaction, return one result per request in order, and
    raise :class:`AbandonedError` (rolling back) if any request's ``abandoned`` is set
    right before it commits."""

    def __init__(
        self,
        write: Callable[[Sequence[Pending[P, R]]], list[R]],
        name: str,
        *,
        one_by_one: Callable[[Exception], bool] = lambda _exc: True,
    ) -> None:
        """``one_by_one(exc)``: whether a group that failed with ``exc`` is worth writing
        again one request at a time (not when the database is simply unreachable)."""
        self._write = write
        self._name = name
        self._one_by_one = one_by_one
        self._queue: queue.SimpleQueue[Pending[P, R] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.transactions = 0
        """Transactions committed (a test and benchmark figure)."""

    def submit(self, payload: P) -> Pending[P, R]:
        pending: Pending[P, R] = Pending(payload)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put(pending)
        return pending

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            stop = False
            while len(group) < MAX_GROUP:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                group.append(more)
            self._commit(group)
            if stop:
                return

    def _commit(self, group: list[Pending[P, R]]) -> None:
        while True:
            live = [p for p in group if not p.abandoned.is_set()]
            if not live:
                return
            try:
                results = self._write(live)
            except AbandonedError:
                group = live
                continue  # someone gave up meanwhile: again without them
            except Exception as exc:
                if len(live) > 1 and self._one_by_one(exc):
                    for pending in live:  # isolate the request the database refuses
                        self._commit([pending])
                    return
                for pending in live:
                    pending.result.set_exception(exc)
                return
            self.transactions += 1
            for pending, result in zip(live, results, strict=True):
                pending.result.set_result(result)
            return
