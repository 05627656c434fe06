"""Keeps the cluster tidy without anyone asking: reacts to pods ending (Secret deleted,
leases revoked at once), and sweeps periodically for what a crash left behind."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass, field

from kubernetes import client

from broker.core import audit_events as ev
from broker.core.plan import LAUNCH_ID_LABEL, SECRET_NAMES_ANNOTATION, secret_name_for
from broker.errors import BrokerError
from broker.service.launcher import CLEANED_ANNOTATION, LIVE_SECRETS, Launcher, TaskPod

log = logging.getLogger("podbroker.reconciler")
FINISHED = ("Succeeded", "Failed")


def _age_seconds(stamp: dt.datetime | None, now: dt.datetime) -> float:
    return (now - stamp).total_seconds() if stamp else 0.0


@dataclass
class SweepResult:
    secrets_cleaned: int = 0
    orphan_secrets_deleted: int = 0
    orphan_pods_deleted: int = 0
    expired_pods_deleted: int = 0
    errors: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(self, launcher: Launcher, *, retention_seconds: int, grace_seconds: int) -> None:
        self.launcher = launcher
        self.kube = launcher.kube
        self.retention_seconds = retention_seconds
        self.grace_seconds = grace_seconds
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- event driven ---------------------------------------------------------------------

    def on_pod_event(self, namespace: str, kind: str, pod: client.V1Pod) -> None:
        """A watched pod changed: if it just ended, clean up its Secret and leases. A pod
        deleted by someone else takes its Secret along (garbage collector) but not its
        leases: revoke them while the Secret's annotations still name them."""
        if kind == "DELETED":
            if not (pod.metadata.annotations or {}).get(CLEANED_ANNOTATION):
                self._release_secret_of(namespace, pod, "pod deleted")
            return
        if pod.status is None or pod.status.phase not in FINISHED:
            return
        if (pod.metadata.annotations or {}).get(CLEANED_ANNOTATION):
            return
        try:
            self.launcher.finish(TaskPod(namespace, pod))
        except BrokerError as exc:
            log.warning(
                "cleanup of %s/%s failed (%s); the sweep will retry",
                namespace,
                pod.metadata.name,
                exc.reason,
            )

    # -- periodic sweep -------------------------------------------------------------------

    def sweep(self) -> SweepResult:
        """One pass over every task namespace (`podbroker gc` runs exactly this)."""
        result = SweepResult()
        now = dt.datetime.now(dt.UTC)
        live = 0
        for namespace in self.launcher.plan_policy.namespaces:
            try:
                live += self._sweep_namespace(namespace, now, result)
            except BrokerError as exc:
                result.errors.append(f"{namespace}: {exc.reason}")
        LIVE_SECRETS.set(live)
        return result

    def _sweep_namespace(self, namespace: str, now: dt.datetime, result: SweepResult) -> int:
        pods = {
            p.metadata.labels.get(LAUNCH_ID_LABEL): p
            for p in self.kube.list_managed_pods(namespace)
        }
        secrets = self.kube.list_managed_secrets(namespace)
        secret_ids = {s["metadata"].get("labels", {}).get(LAUNCH_ID_LABEL) for s in secrets}
        live = len(secrets)
        for secret in secrets:
            meta = secret["metadata"]
            launch_id = meta.get("labels", {}).get(LAUNCH_ID_LABEL)
            created = dt.datetime.fromisoformat(meta["creationTimestamp"].replace("Z", "+00:00"))
            if launch_id not in pods and _age_seconds(created, now) > self.grace_seconds:
                self._cleanup(namespace, launch_id, "delete orphan secret", meta["name"])
                self.launcher.release_secret(namespace, meta, reason="orphan")
                result.orphan_secrets_deleted += 1
                live -= 1
        for launch_id, pod in pods.items():
            phase = pod.status.phase if pod.status else None
            annotations = pod.metadata.annotations or {}
            wants_secret = bool(annotations.get(SECRET_NAMES_ANNOTATION))
            age = _age_seconds(pod.metadata.creation_timestamp, now)
            if phase in FINISHED and not annotations.get(CLEANED_ANNOTATION):
                self.launcher.finish(TaskPod(namespace, pod))
                result.secrets_cleaned += 1
            elif phase in FINISHED:
                cleaned = dt.datetime.fromisoformat(
                    annotations[CLEANED_ANNOTATION].replace("Z", "+00:00")
                )
                if launch_id in secret_ids and _age_seconds(cleaned, now) > self.grace_seconds:
                    # Claimed by a replica that died before deleting the Secret.
                    self.launcher.finish(TaskPod(namespace, pod), force=True)
                    result.secrets_cleaned += 1
                if _age_seconds(cleaned, now) > self.retention_seconds:
                    self._cleanup(namespace, launch_id, "delete retained pod", pod.metadata.name)
                    if self.kube.delete_pod(namespace, pod.metadata.name):
                        result.expired_pods_deleted += 1
            elif (
                wants_secret
                and launch_id not in secret_ids
                and age > self.grace_seconds
                and pod.metadata.deletion_timestamp is None
            ):
                # Created, but the broker died before its Secret: it can never start.
                if self.kube.secret_exists(namespace, secret_name_for(str(launch_id))):
                    continue
                self._cleanup(namespace, launch_id, "delete pod without secret", pod.metadata.name)
                if self.kube.delete_pod(namespace, pod.metadata.name):
                    result.orphan_pods_deleted += 1
            elif (
                phase == "Pending"
                and pod.metadata.deletion_timestamp is None
                and (
                    age > (pod.spec.active_deadline_seconds or 0) + self.grace_seconds
                    and pod.spec.active_deadline_seconds
                )
            ):
                # Never started (unschedulable): activeDeadlineSeconds only runs once a
                # node has it, so its Secret would otherwise stay forever.
                self._cleanup(
                    namespace, launch_id, "delete pod that never started", pod.metadata.name
                )
                self._release_secret_of(namespace, pod, "pod never started")
                if self.kube.delete_pod(namespace, pod.metadata.name):
                    result.orphan_pods_deleted += 1
        return live

    def _release_secret_of(self, namespace: str, pod: client.V1Pod, reason: str) -> None:
        launch_id = (pod.metadata.labels or {}).get(LAUNCH_ID_LABEL)
        if not launch_id:
            return
        try:
            meta = self.kube.read_secret_metadata(namespace, secret_name_for(launch_id))
            if meta is not None:
                self.launcher.release_secret(namespace, meta, reason=reason)
        except BrokerError as exc:
            log.warning(
                "releasing the secret of %s/%s failed: %s", namespace, pod.metadata.name, exc.reason
            )

    def _cleanup(self, namespace: str, launch_id: str | None, action: str, name: str) -> None:
        self.launcher.record_quietly(
            ev.launch_event(
                ev.EventKind.RECONCILER_CLEANUP,
                launch_id=launch_id,
                action=action,
                object=f"{namespace}/{name}",
            )
        )

    # -- background threads ---------------------------------------------------------------

    def start(self, interval_seconds: float) -> None:
        for namespace in self.launcher.plan_policy.namespaces:
            thread = threading.Thread(
                target=self.kube.watch_managed_pods,
                name=f"watch-{namespace}",
                daemon=True,
                args=(
                    namespace,
                    lambda kind, pod, ns=namespace: self.on_pod_event(ns, kind, pod),
                    self._stop.is_set,
                ),
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
