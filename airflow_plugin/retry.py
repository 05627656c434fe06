"""How long the Airflow side keeps trying when the broker is unavailable while a pod
runs. Giving up early is costly: the failed try's pod keeps running (with its secrets)
and the retry launches a second one, so polls ride out short outages with capped
exponential backoff and only give up after a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_UNAVAILABLE_TIMEOUT_SECONDS = 300.0
FIRST_DELAY_SECONDS = 1.0
MAX_DELAY_SECONDS = 30.0


def _clock() -> float:
    return time.monotonic()


class Outage:
    """One stretch of failed calls to the broker: when it began and the next delay.

    ``next_delay()`` after each failure gives the seconds to wait before trying again, or
    None once the outage has lasted ``timeout`` seconds (0 disables retrying);
    ``reset()`` after a success. No I/O here."""

    def __init__(
        self,
        timeout: float,
        *,
        first_delay: float = FIRST_DELAY_SECONDS,
        max_delay: float = MAX_DELAY_SECONDS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if timeout < 0:
            raise ValueError("the unavailability timeout must not be negative")
        self.timeout = timeout
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._clock = clock or _clock
        self._since: float | None = None
        self._next = first_delay

    @property
    def elapsed(self) -> float:
        """Seconds since the first failure of this outage (0 when there is none)."""
        return 0.0 if self._since is None else self._clock() - self._since

    def reset(self) -> None:
        self._since = None
        self._next = self.first_delay

    def next_delay(self, retry_after: float = 0.0) -> float | None:
        """Record a failure. ``retry_after`` is the broker's hint (Retry-After), honoured
        up to the cap. Never waits past the deadline."""
        now = self._clock()
        if self._since is None:
            self._since = now
        remaining = self._since + self.timeout - now
        if remaining <= 0:
            return None
        delay = min(self.max_delay, max(self._next, retry_after), remaining)
        self._next = min(self._next * 2, self.max_delay)
        return delay
