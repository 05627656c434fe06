"""The leak guard's mask material: the values issued to each launch, held in this
replica's memory only, from the moment the broker creates the launch's Secret (it has
the values then) until a bounded time after the launch ends. A log read after the pod
ended (its Secret deleted) is masked from here; with nothing held it is refused (see
:meth:`broker.service.lookup.LaunchLookup.logs`). Nothing here is ever written anywhere.

Bounded twice: ``retain_seconds`` after the end, and at most ``max_launches`` launches
(the oldest ended ones go first, then the oldest running ones, whose values can still be
read back from their Secret)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping

from broker.core.secret_value import SecretValue

DEFAULT_RETAIN_SECONDS = 3600
DEFAULT_MAX_LAUNCHES = 10_000


class IssuedValues:
    def __init__(
        self,
        *,
        retain_seconds: float = DEFAULT_RETAIN_SECONDS,
        max_launches: int = DEFAULT_MAX_LAUNCHES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.retain_seconds = retain_seconds
        self.max_launches = max_launches
        self._clock = clock
        self._lock = threading.Lock()
        # launch id -> (hold sequence number, secret name -> values), oldest first
        self._held: OrderedDict[str, tuple[int, dict[str, list[SecretValue]]]] = OrderedDict()
        # launch id -> when its values go, in end order (= deadline order)
        self._ended: OrderedDict[str, float] = OrderedDict()
        self._sequence = 0

    def __repr__(self) -> str:
        return f"IssuedValues({len(self._held)} launches)"

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._held)

    def hold(self, launch_id: str, values: Mapping[str, Iterable[SecretValue]]) -> None:
        """Keep ``values`` (secret name -> its values) of ``launch_id`` for its log reads.
        A launch held already keeps what it has (and its end, if it ended)."""
        if self.max_launches <= 0:
            return
        with self._lock:
            self._expire()
            if launch_id in self._held:
                return
            self._sequence += 1
            self._held[launch_id] = (self._sequence, {k: list(v) for k, v in values.items()})
            while len(self._held) > self.max_launches:
                if self._ended:
                    oldest, _ = self._ended.popitem(last=False)
                    self._held.pop(oldest, None)
                else:
                    self._held.popitem(last=False)

    def values(self, launch_id: str) -> dict[str, list[SecretValue]] | None:
        """The values held for ``launch_id``, or None."""
        with self._lock:
            self._expire()
            held = self._held.get(launch_id)
            return {k: list(v) for k, v in held[1].items()} if held is not None else None

    def holds(self, launch_id: str) -> bool:
        with self._lock:
            self._expire()
            return launch_id in self._held

    def ended(self, launch_id: str | None) -> None:
        """``launch_id`` ended: its values go ``retain_seconds`` from now (from its first
        end: a second one does not extend it)."""
        if launch_id is None:
            return
        with self._lock:
            self._end(launch_id)
            self._expire()

    def checkpoint(self) -> int:
        """A mark for :meth:`ended_unless`: launches held after it are not concerned."""
        with self._lock:
            return self._sequence

    def ended_unless(self, alive: Collection[str | None], *, held_by: int) -> int:
        """Every launch held at mark ``held_by`` and not in ``alive`` has ended (the
        sweep's catch-all for ends this replica did not see). Returns how many ended now."""
        count = 0
        with self._lock:
            for launch_id, (sequence, _) in list(self._held.items()):
                if sequence <= held_by and launch_id not in alive and launch_id not in self._ended:
                    self._end(launch_id)
                    count += 1
            self._expire()
        return count

    def forget(self, launch_id: str) -> None:
        """Drop ``launch_id`` now (a launch rolled back: no log will be read)."""
        with self._lock:
            self._held.pop(launch_id, None)
            self._ended.pop(launch_id, None)

    def _end(self, launch_id: str) -> None:
        if launch_id in self._held and launch_id not in self._ended:
            self._ended[launch_id] = self._clock() + self.retain_seconds

    def _expire(self) -> None:
        now = self._clock()
        while self._ended:
            launch_id, deadline = next(iter(self._ended.items()))
            if deadline > now:
                return
            self._ended.popitem(last=False)
            self._held.pop(launch_id, None)
