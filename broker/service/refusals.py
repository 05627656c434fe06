"""Refused requests (401, 403 out of scope, 413, 415, 422; 409 for a log read the leak
guard refused) leave a trace that a flood cannot inflate: they are counted per (caller,
endpoint, status, reason class) and one ``request_refused`` audit event is written per
key per interval, carrying the count. The first refusal of a key is written at once (by
a background thread, so the refusing request never waits for the audit store). Never the
request body: only the caller, the endpoint, the status, a reason class and the first
refusal's message."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime

from broker.core import audit_events as ev
from broker.errors import BrokerError
from broker.service.ports import AuditSink

log = logging.getLogger("podbroker.refusals")

OVERFLOW_CALLER = "(other callers)"
"""The shared key once ``max_keys`` distinct keys are counted in one interval."""


@dataclass(frozen=True)
class RefusalKey:
    caller: str | None
    """The authenticated identity; None when the refusal is a 401."""
    client: str | None
    """For a 401: the peer address (the only thing known about who asked)."""
    endpoint: str
    status: int
    reason_class: str


@dataclass
class _Tally:
    pending: int = 0
    first: datetime | None = None
    last: datetime | None = None
    reason: str = ""
    written_at: float | None = None  # monotonic time of the last write, None if never


class RefusalRecorder:
    def __init__(
        self,
        audit: AuditSink,
        *,
        interval_seconds: float = 60.0,
        max_keys: int = 1000,
    ) -> None:
        self.audit = audit
        self.interval = interval_seconds
        self.max_keys = max_keys
        self._tallies: dict[RefusalKey, _Tally] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(
        self,
        *,
        caller: str | None,
        client: str | None,
        endpoint: str,
        status: int,
        reason_class: str,
        reason: str,
    ) -> None:
        """Count one refusal. Never blocks on the audit store and never raises."""
        key = RefusalKey(caller, client if caller is None else None, endpoint, status, reason_class)
        now = ev.utc_now()
        with self._lock:
            tally = self._tallies.get(key)
            if tally is None:
                if len(self._tallies) >= self.max_keys:
                    key = RefusalKey(OVERFLOW_CALLER, None, endpoint, status, reason_class)
                    tally = self._tallies.get(key)
                if tally is None:
                    tally = self._tallies[key] = _Tally()
            if tally.pending == 0:
                tally.first, tally.reason = now, reason
            tally.pending += 1
            tally.last = now
            prompt = tally.written_at is None
        if prompt:
            self._wake.set()

    def flush(self, *, force: bool = False) -> int:
        """Write every key whose interval has passed (all pending ones with ``force``);
        forget keys quiet for two intervals. Returns how many events were written."""
        now = time.monotonic()
        due: list[tuple[RefusalKey, _Tally, ev.AuditEvent]] = []
        with self._lock:
            for key, tally in list(self._tallies.items()):
                idle = tally.written_at is not None and now - tally.written_at >= self.interval
                if tally.pending == 0:
                    if tally.written_at is None or now - tally.written_at >= 2 * self.interval:
                        del self._tallies[key]
                    continue
                if not (force or tally.written_at is None or idle):
                    continue
                assert tally.first is not None and tally.last is not None
                event = ev.request_refused(
                    caller=key.caller,
                    client=key.client,
                    endpoint=key.endpoint,
                    status=key.status,
                    reason_class=key.reason_class,
                    reason=tally.reason,
                    count=tally.pending,
                    first_time=tally.first,
                    last_time=tally.last,
                )
                sent = _Tally(tally.pending, tally.first, tally.last, tally.reason)
                due.append((key, sent, event))
                tally.pending, tally.written_at = 0, now
        if not due:
            return 0
        try:
            self.audit.append_many([event for _, _, event in due])
        except BrokerError as exc:
            log.warning("could not record %d refused-request counts: %s", len(due), exc.reason)
            self._restore(due)
            return 0
        for key, tally, _ in due:
            log.warning(
                "refused %s -> %d (%s) %d time(s) for %s: %s",
                key.endpoint,
                key.status,
                key.reason_class,
                tally.pending,
                key.caller or f"unauthenticated client {key.client or '?'}",
                tally.reason,
            )
        return len(due)

    def _restore(self, due: list[tuple[RefusalKey, _Tally, ev.AuditEvent]]) -> None:
        """Put counts that could not be written back, to be tried next time."""
        with self._lock:
            for key, lost, _ in due:
                tally = self._tallies.setdefault(key, _Tally())
                tally.pending += lost.pending
                firsts = [t for t in (tally.first, lost.first) if t is not None]
                lasts = [t for t in (tally.last, lost.last) if t is not None]
                tally.first = min(firsts) if firsts else None
                tally.last = max(lasts) if lasts else None
                tally.reason = tally.reason or lost.reason
                tally.written_at = None  # retried on the writer's next round

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="refusals", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the writer and write what is still counted."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.flush(force=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=min(1.0, self.interval))
            self._wake.clear()
            if self._stop.is_set():
                return
            self.flush()
