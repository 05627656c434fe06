"""Keeps the cluster tidy without anyone asking: reacts to pods ending (Secret deleted,
leases revoked at once), and sweeps periodically for what a crash left behind."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from broker.core import audit_events as ev
from broker.core.objects import PodInfo
from broker.core.plan import secret_name_for
from broker.core.verification import ended_reason
from broker.errors import BrokerError
from broker.metrics import CLEANUP_BACKLOG, LIVE_SECRETS, SWEEP_ERRORS, SWEEP_FINDINGS
from broker.service.cleanup import Cleanup
from broker.service.ports import Cluster
from broker.service.verification import TaskVerifier

log = logging.getLogger("podbroker.reconciler")


@dataclass
class SweepResult:
    secrets_cleaned: int = 0
    orphan_secrets_deleted: int = 0
    orphan_pods_deleted: int = 0
    expired_pods_deleted: int = 0
    ended_task_pods_killed: int = 0
    orphan_holdings_revoked: int = 0
    interrupted_launches_closed: int = 0
    errors: list[str] = field(default_factory=list)


def _count_findings(result: SweepResult) -> None:
    """Export one sweep's findings (podbroker_sweep_findings_total by kind)."""
    for kind, count in vars(result).items():
        if isinstance(count, int) and count:
            SWEEP_FINDINGS.labels(kind).inc(count)
    if result.errors:
        SWEEP_ERRORS.inc(len(result.errors))


class Reconciler:
    def __init__(
        self,
        *,
        cluster: Cluster,
        cleanup: Cleanup,
        namespaces: Sequence[str],
        retention_seconds: int,
        grace_seconds: int,
        verifier: TaskVerifier | None = None,
        ended_grace_seconds: int = 60,
        clock: Callable[[], float] = time.monotonic,
        cleanup_workers: int = 0,
    ) -> None:
        self.cluster = cluster
        self.cleanup = cleanup
        self.namespaces = tuple(namespaces)
        self.retention_seconds = retention_seconds
        self.grace_seconds = grace_seconds
        self.verifier = verifier
        self.ended_grace_seconds = ended_grace_seconds
        self._clock = clock
        self._ended_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Pods ending together are cleaned up side by side (sharing audit commits), not
        # one after another on the watch thread (0: inline, as the unit tests expect).
        self._cleanups = (
            ThreadPoolExecutor(cleanup_workers, thread_name_prefix="cleanup")
            if cleanup_workers
            else None
        )
        self._cleaning: set[str] = set()
        self._cleaning_lock = threading.Lock()

    # -- event driven ---------------------------------------------------------------------

    def on_pod_event(self, kind: str, pod: PodInfo) -> None:
        """A watched pod changed: if it just ended, clean up its Secret and leases. A pod
        deleted by someone else takes its Secret along (garbage collector) but not its
        leases: revoke them while the Secret's annotations still name them."""
        if kind == "DELETED":
            if not pod.claimed:
                self._release_secret_of(pod, "pod deleted")
            return
        if not pod.finished:
            if pod.phase == "Running" and pod.secret_names:
                self._keep_values(pod)
            return
        if pod.claimed:
            return
        if self._cleanups is None:
            self._finish(pod)
            return
        key = f"{pod.namespace}/{pod.name}"
        with self._cleaning_lock:
            if key in self._cleaning:
                return  # already being cleaned up
            self._cleaning.add(key)
        self._cleanups.submit(self._finish, pod, key)

    def _keep_values(self, pod: PodInfo) -> None:
        """Every replica holds the leak guard's values of the launches it sees run, so a
        log read after the end is masked whichever replica answers it (one Secret read
        per launch on replicas that did not make it; off the watch thread)."""
        if pod.launch_id is None or self.cleanup.issued.holds(pod.launch_id):
            return
        if self._cleanups is None:
            self.cleanup.keep_issued_values(pod)
            return
        key = f"values {pod.namespace}/{pod.name}"
        with self._cleaning_lock:
            if key in self._cleaning:
                return
            self._cleaning.add(key)

        def keep() -> None:
            try:
                self.cleanup.keep_issued_values(pod)
            except Exception:  # a worker thread: say why instead of losing it
                log.exception("holding the values of %s/%s failed", pod.namespace, pod.name)
            finally:
                with self._cleaning_lock:
                    self._cleaning.discard(key)

        self._cleanups.submit(keep)

    def _finish(self, pod: PodInfo, key: str | None = None) -> None:
        try:
            # Before the claim: the claimant deletes the Secret, then its values are gone.
            self.cleanup.keep_issued_values(pod)
            self.cleanup.finish(pod)
        except BrokerError as exc:
            log.warning(
                "cleanup of %s/%s failed (%s); the sweep will retry",
                pod.namespace,
                pod.name,
                exc.reason,
            )
        except Exception:  # a worker thread: say why instead of losing it
            log.exception("cleanup of %s/%s failed; the sweep will retry", pod.namespace, pod.name)
        finally:
            if key is not None:
                with self._cleaning_lock:
                    self._cleaning.discard(key)

    # -- periodic sweep -------------------------------------------------------------------

    def sweep(self) -> SweepResult:
        """One pass over every task namespace (`podbroker gc` runs exactly this)."""
        result = SweepResult()
        now = dt.datetime.now(dt.UTC)
        live = 0
        running: list[PodInfo] = []
        held_by = self.cleanup.issued.checkpoint()
        listed: set[str] = set()
        for namespace in self.namespaces:
            try:
                live += self._sweep_namespace(namespace, now, result, running)
                listed.add(namespace)
            except BrokerError as exc:
                result.errors.append(f"{namespace}: {exc.reason}")
        swept = listed == set(self.namespaces)
        if swept:
            # Ends this replica did not see start the retention of their held values.
            self.cleanup.issued.ended_unless({p.launch_id for p in running}, held_by=held_by)
        LIVE_SECRETS.set(live)
        try:
            self._end_pods_of_ended_tasks(running, result)
        except BrokerError as exc:
            result.errors.append(f"airflow: {exc.reason}")
        try:
            self._give_back_orphan_holdings(running, listed, now, result)
        except BrokerError as exc:
            result.errors.append(f"holdings: {exc.reason}")
        _count_findings(result)
        return result

    def _give_back_orphan_holdings(
        self, running: list[PodInfo], listed: set[str], now: dt.datetime, result: SweepResult
    ) -> None:
        """What Vault issued to a launch whose pod no longer runs is revoked, from the
        ledger: whatever deleted the pod or its Secret (a crash between the pod and its
        Secret, the garbage collector while the broker was down, a failed rollback).
        Only in the namespaces whose pods this pass could list (``listed``): when the
        API server does not answer, no pod seems to run, and every running launch would
        lose its leases."""
        ledger = self.cleanup.ledger
        if ledger is None:
            return
        alive = {pod.launch_id for pod in running}
        unreleased = ledger.unreleased()
        mine = [h for h in unreleased if h.namespace in listed]
        CLEANUP_BACKLOG.set(sum(1 for held in mine if held.launch_id not in alive))
        for held in mine:
            if held.launch_id in alive:
                continue
            if held.age_seconds(now) <= self.grace_seconds:
                continue  # its launch may still be creating the pod
            if held.holdings:
                self._step(held.namespace, held.launch_id, "revoke orphan holdings", held.launch_id)
                self.cleanup.revoke(held.holdings, launch_id=held.launch_id)
                result.orphan_holdings_revoked += 1
            else:
                # Recorded, then the broker stopped before its pod (or anything in Vault).
                self.cleanup.record_quietly(
                    ev.launch_event(
                        ev.EventKind.LAUNCH_FAILED,
                        launch_id=held.launch_id,
                        stage="interrupted",
                        error="no pod after the grace: the broker stopped mid-launch",
                    )
                )
                self.cleanup.settle(held.launch_id, held.holdings)
                result.interrupted_launches_closed += 1

    def _end_pods_of_ended_tasks(self, running: list[PodInfo], result: SweepResult) -> None:
        """Secrets live no longer than their task instance: ask Airflow (one batched,
        paged question) about every running launch; a pod whose task instance has ended,
        been reset or moved to a newer try is killed after ``ended_grace_seconds``. A
        launch missing from an answer that was cut short is unknown this pass: neither
        judged nor cleared (its grace clock, if started, keeps running)."""
        verifier = self.verifier
        if verifier is None or not verifier.active or verifier.mode == "off" or not running:
            self._ended_since.clear()
            return
        batch = verifier.records([pod.task for pod in running])
        records = {r.instance_key: r for r in batch.records}
        now = self._clock()
        flagged: set[str] = set()
        unknown = 0
        for pod in running:
            task = pod.task
            record = records.get(task.instance_key)
            if record is None and not batch.complete:
                unknown += 1
                if pod.launch_id is not None and pod.launch_id in self._ended_since:
                    flagged.add(pod.launch_id)
                continue
            why = ended_reason(task, record)
            if why is None or pod.launch_id is None:
                continue
            flagged.add(pod.launch_id)
            since = self._ended_since.setdefault(pod.launch_id, now)
            if now - since < self.ended_grace_seconds:
                continue
            self.cleanup.end_launch(
                pod, f"task instance ended in Airflow: {why}", cleanup_reason="task instance ended"
            )
            result.ended_task_pods_killed += 1
        self._ended_since = {k: v for k, v in self._ended_since.items() if k in flagged}
        if unknown:
            result.errors.append(
                f"airflow: its task-instance list was cut short; {unknown} running "
                "launch(es) not in it were left alone this pass"
            )

    def _sweep_namespace(
        self,
        namespace: str,
        now: dt.datetime,
        result: SweepResult,
        running: list[PodInfo],
    ) -> int:
        pods = {p.launch_id: p for p in self.cluster.list_managed_pods(namespace)}
        secrets = self.cluster.list_managed_secrets(namespace)
        secret_ids = {s.launch_id for s in secrets}
        live = len(secrets)
        for secret in secrets:
            if secret.launch_id not in pods and secret.age_seconds(now) > self.grace_seconds:
                self._step(namespace, secret.launch_id, "delete orphan secret", secret.name)
                self.cleanup.release_secret(secret, reason="orphan")
                result.orphan_secrets_deleted += 1
                live -= 1
        for launch_id, pod in pods.items():
            if not pod.finished and not pod.deleting:
                running.append(pod)
            age = pod.age_seconds(now)
            cleaned = pod.cleaned_at
            if pod.finished and not pod.claimed:
                self.cleanup.finish(pod)
                result.secrets_cleaned += 1
            elif pod.finished:
                since_cleaned = (now - cleaned).total_seconds() if cleaned else 0.0
                if launch_id in secret_ids and since_cleaned > self.grace_seconds:
                    # Claimed by a replica that died before deleting the Secret.
                    self.cleanup.finish(pod, force=True)
                    result.secrets_cleaned += 1
                if since_cleaned > self.retention_seconds:
                    self._step(namespace, launch_id, "delete retained pod", pod.name)
                    if self.cluster.delete_pod(namespace, pod.name):
                        result.expired_pods_deleted += 1
            elif (
                pod.secret_names
                and launch_id not in secret_ids
                and age > self.grace_seconds
                and not pod.deleting
            ):
                # Created, but the broker died before its Secret: it can never start.
                if self.cluster.secret_exists(namespace, secret_name_for(str(launch_id))):
                    continue
                self._step(namespace, launch_id, "delete pod without secret", pod.name)
                if self.cluster.delete_pod(namespace, pod.name):
                    result.orphan_pods_deleted += 1
            elif (
                pod.phase == "Pending"
                and not pod.deleting
                and pod.active_deadline_seconds
                and age > pod.active_deadline_seconds + self.grace_seconds
            ):
                # Never started (unschedulable): activeDeadlineSeconds only runs once a
                # node has it, so its Secret would otherwise stay forever.
                self._step(namespace, launch_id, "delete pod that never started", pod.name)
                self._release_secret_of(pod, "pod never started")
                if self.cluster.delete_pod(namespace, pod.name):
                    result.orphan_pods_deleted += 1
        return live

    def _release_secret_of(self, pod: PodInfo, reason: str) -> None:
        try:
            self.cleanup.release_secret_of(pod, reason)
        except BrokerError as exc:
            log.warning(
                "releasing the secret of %s/%s failed: %s", pod.namespace, pod.name, exc.reason
            )

    def _step(self, namespace: str, launch_id: str | None, action: str, name: str) -> None:
        self.cleanup.reconciler_step(namespace, launch_id, action, name)

    # -- background threads ---------------------------------------------------------------

    def start(self, interval_seconds: float) -> None:
        for namespace in self.namespaces:
            thread = threading.Thread(
                target=self.cluster.watch_managed_pods,
                name=f"watch-{namespace}",
                daemon=True,
                args=(namespace, self.on_pod_event, self._stop.is_set),
            )
            thread.start()
            self._threads.append(thread)
        sweeper = threading.Thread(
            target=self._sweep_loop, args=(interval_seconds,), name="sweeper", daemon=True
        )
        sweeper.start()
        self._threads.append(sweeper)

    def _sweep_loop(self, interval_seconds: float) -> None:
        while not self._stop.is_set():
            try:
                result = self.sweep()
            except Exception:  # keep sweeping; say why this pass failed
                log.exception("sweep failed")
            else:
                for error in result.errors:
                    log.warning("sweep: %s", error)
            self._stop.wait(interval_seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._cleanups is not None:
            self._cleanups.shutdown(wait=False, cancel_futures=True)
