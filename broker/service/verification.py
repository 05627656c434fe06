"""Checks a launch against the task instance it names, in Airflow, with a brief cache
so a burst of launches for one run does not become a burst of Airflow calls."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Protocol

from broker.core.models import Caller, TaskIdentity
from broker.core.verification import (
    LAUNCHABLE_STATES,
    PodBinding,
    TaskInstanceBatch,
    TaskInstanceRecord,
    Verdict,
    VerificationMode,
    check_task_instance,
    verdict,
)
from broker.errors import AirflowUnavailableError
from broker.metrics import AIRFLOW_LATENCY, VERIFICATIONS

log = logging.getLogger("podbroker.verification")


class TaskInstanceSource(Protocol):
    """Airflow's view of task instances (the Airflow REST API adapter)."""

    def get(self, task: TaskIdentity) -> TaskInstanceRecord | None: ...
    def get_many(self, tasks: Sequence[TaskIdentity]) -> TaskInstanceBatch: ...


@dataclass(frozen=True)
class VerificationResult:
    verdict: Verdict
    failure: str | None = None

    @property
    def refuses(self) -> bool:
        return self.verdict == "enforce" and self.failure is not None

    def audit_details(self) -> dict[str, object] | None:
        if self.verdict == "skip":
            return None
        return {"verdict": self.verdict, "ok": self.failure is None, "reason": self.failure}


class TaskVerifier:
    def __init__(
        self,
        source: TaskInstanceSource | None,
        mode: VerificationMode,
        *,
        cache_seconds: float = 5.0,
        launchable_states: Sequence[str] = LAUNCHABLE_STATES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.mode = mode
        self.cache_seconds = cache_seconds
        self.launchable_states = tuple(launchable_states)
        self._clock = clock
        self._cache: dict[tuple[str, str, str, int], tuple[float, TaskInstanceRecord | None]] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether reconciling against Airflow is possible at all."""
        return self.source is not None

    def prefetch(
        self, pool: Executor, task: TaskIdentity
    ) -> Future[TaskInstanceRecord | None] | None:
        """Start asking Airflow now (beside the policy fetch) when the mode will need the
        answer anyway; None when it may not (mode off: no Airflow call on the path)."""
        if self.mode == "off" or self.source is None:
            return None
        return pool.submit(self._lookup, task)

    def verify(
        self,
        caller: Caller,
        task: TaskIdentity,
        *,
        grant_requires: bool,
        prefetched: Future[TaskInstanceRecord | None] | None = None,
    ) -> VerificationResult:
        """Check ``task`` when the mode or a grant asks for it; Airflow calls stay off the
        path otherwise. Raises AirflowUnavailableError (503) when Airflow cannot answer
        and the check enforces; in ``warn`` mode an outage is logged, not fatal."""
        level = verdict(self.mode, grant_requires)
        if level == "skip":
            return VerificationResult("skip")
        if self.source is None:
            VERIFICATIONS.labels(level, "unconfigured").inc()
            return VerificationResult(
                level, "verification is required but this broker has no airflow.api_url"
            )
        try:
            record = prefetched.result() if prefetched is not None else self._lookup(task)
        except AirflowUnavailableError:
            if level == "enforce":
                VERIFICATIONS.labels(level, "unavailable").inc()
                raise
            log.warning("Airflow unreachable; launch for %s not verified (warn mode)", task.dag_id)
            VERIFICATIONS.labels(level, "unavailable").inc()
            return VerificationResult(level, "Airflow unreachable")
        binding = PodBinding(caller.bound_pod, caller.bound_pod_uid) if caller.bound_pod else None
        failure = check_task_instance(task, record, binding, self.launchable_states)
        VERIFICATIONS.labels(level, "ok" if failure is None else "failed").inc()
        if failure is not None and level == "warn":
            log.warning("task verification failed (warn mode): %s", failure)
        return VerificationResult(level, failure)

    def _lookup(self, task: TaskIdentity) -> TaskInstanceRecord | None:
        assert self.source is not None
        key = task.instance_key
        now = self._clock()
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            record = cached[1]
            # A cached record only answers for the try it saw; a new try asks again.
            if record is None or record.try_number == task.try_number:
                return record
        with AIRFLOW_LATENCY.labels("get_task_instance").time():
            record = self.source.get(task)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = (now + self.cache_seconds, record)
        return record

    def records(self, tasks: Sequence[TaskIdentity]) -> TaskInstanceBatch:
        """Airflow's records of several task instances in one batched question
        (reconciler); uncached: ending a pod acts on Airflow's current answer."""
        if self.source is None or not tasks:
            return TaskInstanceBatch()
        with AIRFLOW_LATENCY.labels("list_task_instances").time():
            return self.source.get_many(tasks)
