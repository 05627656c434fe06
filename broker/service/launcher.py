"""One launch, end to end: authorize, plan, decide, read secrets, create the pod and
its Secret, and clean up when the pod ends. Every step is audited before it happens;
if the audit write fails the step does not happen (fail closed).

Critical path (what the benchmark measures): the pod is created while Vault is read
(when the catalog declares the keys), then the per-pod Secret, owned by the pod. The
kubelet does not start a container whose Secret is missing, so the pod waits for it."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from queue import Empty, Full, Queue
from typing import Any, cast

from kubernetes import client
from prometheus_client import Counter, Gauge, Histogram

from broker.core import audit_events as ev
from broker.core.api_models import ContainerState, LaunchRequest, LaunchView, Phase
from broker.core.models import Caller, TaskIdentity
from broker.core.plan import (
    CONTAINER_NAME,
    LAUNCH_ID_LABEL,
    LEASES_ANNOTATION,
    SECRET_NAMES_ANNOTATION,
    SECRET_SOURCES_ANNOTATION,
    TASK_ANNOTATION,
    LaunchPlan,
    PlanPolicy,
    build_plan,
    secret_name_for,
)
from broker.core.policy import DatabaseSecret, KvSecret
from broker.errors import BrokerError, ConflictError, DeniedError, NotFoundError
from broker.kube.cluster import KubeCluster
from broker.service.auth import authorize_dag
from broker.service.ports import AuditSink, BundleLike, SecretSource

log = logging.getLogger("podbroker.launch")

CLEANED_ANNOTATION = "podbroker.dev/cleaned-at"
ACCESSOR_ANNOTATION = "podbroker.dev/token-accessor"
LAUNCHES = Counter("podbroker_launches_total", "Launch requests by outcome", ["outcome"])
DENIALS = Counter("podbroker_denials_total", "Launches denied by policy")
LAUNCH_LATENCY = Histogram(
    "podbroker_launch_seconds",
    "Time to accept a launch (pod and Secret created)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
VAULT_LATENCY = Histogram(
    "podbroker_vault_call_seconds",
    "Latency of Vault operations by the broker",
    ["operation"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LIVE_SECRETS = Gauge("podbroker_live_secrets", "Broker-made Secrets currently in the cluster")
DATABASE_KEYS = ("username", "password")


@dataclass(frozen=True)
class TaskPod:
    """A broker pod found in the cluster, with what the API needs to describe it."""

    namespace: str
    pod: client.V1Pod

    @property
    def launch_id(self) -> str:
        return str(self.pod.metadata.labels[LAUNCH_ID_LABEL])


def _task_from_pod(pod: client.V1Pod) -> TaskIdentity:
    annotations = pod.metadata.annotations or {}
    raw = annotations.get(TASK_ANNOTATION)
    if raw:
        return TaskIdentity.model_validate_json(raw)
    labels = pod.metadata.labels or {}
    return TaskIdentity(
        dag_id=labels.get("dag_id", "?"),
        task_id=labels.get("task_id", "?"),
        run_id=labels.get("run_id", "?"),
        try_number=int(labels.get("try_number", 0)),
        map_index=int(labels.get("map_index", -1)),
    )


def describe(pod: client.V1Pod, *, created: bool = True) -> LaunchView:
    """A LaunchView from a pod object (phase, container states, exit code)."""
    status = pod.status
    states: list[ContainerState] = []
    exit_code: int | None = None
    reason: str | None = status.reason if status else None
    for item in (status.container_statuses or []) if status else []:
        state = item.state
        if state and state.terminated:
            states.append(
                ContainerState(
                    name=item.name,
                    state="terminated",
                    exit_code=state.terminated.exit_code,
                    reason=state.terminated.reason,
                    message=state.terminated.message,
                )
            )
            if item.name == CONTAINER_NAME:
                exit_code = state.terminated.exit_code
                reason = reason or state.terminated.reason
        elif state and state.running:
            states.append(ContainerState(name=item.name, state="running"))
        elif state and state.waiting:
            states.append(
                ContainerState(
                    name=item.name,
                    state="waiting",
                    reason=state.waiting.reason,
                    message=state.waiting.message,
                )
            )
        else:
            states.append(ContainerState(name=item.name, state="unknown"))
    annotations = pod.metadata.annotations or {}
    names = [n for n in annotations.get(SECRET_NAMES_ANNOTATION, "").split(",") if n]
    phase = status.phase if status and status.phase else "Pending"
    if pod.metadata.deletion_timestamp and phase in ("Pending", "Running"):
        phase = "Deleted"
    return LaunchView(
        launch_id=pod.metadata.labels[LAUNCH_ID_LABEL],
        task=_task_from_pod(pod),
        namespace=pod.metadata.namespace,
        pod_name=pod.metadata.name,
        phase=cast(Phase, phase),
        containers=states,
        exit_code=exit_code,
        reason=reason,
        secret_names=names,
        created=created,
    )


class Launcher:
    def __init__(
        self,
        *,
        kube: KubeCluster,
        secrets: SecretSource,
        audit: AuditSink,
        plan_policy: PlanPolicy,
        workers: int = 16,
    ) -> None:
        self.kube = kube
        self.secrets = secrets
        self.audit = audit
        self.plan_policy = plan_policy
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="launch")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- launch ---------------------------------------------------------------------------

    def launch(self, caller: Caller, request: LaunchRequest) -> LaunchView:
        started = time.perf_counter()
        try:
            view = self._launch(caller, request)
        except DeniedError:
            LAUNCHES.labels("denied").inc()
            raise
        except BrokerError as exc:
            LAUNCHES.labels("retryable_error" if exc.retryable else "rejected").inc()
            raise
        LAUNCHES.labels("created" if view.created else "existing").inc()
        LAUNCH_LATENCY.observe(time.perf_counter() - started)
        return view

    def _launch(self, caller: Caller, request: LaunchRequest) -> LaunchView:
        task = request.task
        authorize_dag(caller, task.dag_id)
        plan = build_plan(request, self.plan_policy, caller.identity)
        names = [s.name for s in request.secrets]
        requested = ev.launch_requested(
            launch_id=plan.launch_id,
            caller=caller,
            task=task,
            secret_names=names,
            namespace=plan.namespace,
            image=request.container.image,
        )
        # A retry of the same try reattaches; look for its pod while deciding.
        existing_future = self._pool.submit(self.kube.read_pod, plan.namespace, plan.pod_name)
        try:
            with VAULT_LATENCY.labels("decide").time():
                decision = self.secrets.decide(task, request.secrets)
        except BrokerError as exc:
            with contextlib.suppress(BrokerError):
                self.audit.append_many(
                    [requested, self._failure_event(plan, caller, "decide", exc)]
                )
            raise
        teams = sorted({g.split("/", 1)[0] for g in decision.matched_grants})
        decided = ev.decision(
            launch_id=plan.launch_id,
            caller=caller,
            task=task,
            secret_names=names,
            allowed=decision.allowed,
            matched_grants={n: [d.grant] for n, d in decision.secrets.items()},
            reasons=decision.reasons,
            denied=[*decision.denied, *decision.unknown],
            teams=teams,
        )
        if not decision.allowed:
            self.audit.append_many([requested, decided])
            DENIALS.inc()
            decision.raise_for_denial()
        existing = existing_future.result()
        if existing is not None:
            self.audit.append_many(
                [
                    requested,
                    decided,
                    ev.launch_event(
                        ev.EventKind.LAUNCH_REATTACHED,
                        launch_id=plan.launch_id,
                        task=task,
                        caller=caller,
                        secret_names=names,
                        namespace=plan.namespace,
                        pod=plan.pod_name,
                    ),
                ]
            )
            return describe(existing, created=False)
        expected = self._expected_keys(request)
        pod_manifest = plan.pod_with_secret_refs(expected) if expected is not None else None
        pod_manifest = pod_manifest or plan.pod
        intent = ev.launch_event(
            ev.EventKind.POD_CREATED,
            launch_id=plan.launch_id,
            task=task,
            caller=caller,
            secret_names=names,
            teams=teams,
            namespace=plan.namespace,
            pod=plan.pod_name,
        )
        # One commit before any side effect: if it fails, nothing has happened.
        self.audit.append_many([requested, decided, intent])
        bundle_future: Future[BundleLike] | None = None
        if request.secrets:
            bundle_future = self._pool.submit(self._resolve, plan, request, decision)
        if expected is None and bundle_future is not None:
            # Keys are learnt from the values: the pod must wait for Vault.
            bundle = self._await_bundle(bundle_future, plan, caller, None)
            keys = {s.name: list(s.keys) for s in bundle.secrets}
            pod_manifest = plan.pod_with_secret_refs(keys)
        try:
            pod_ref = self.kube.create_pod(pod_manifest)
        except ConflictError:
            # Same task try already launched (retry or concurrent duplicate): reattach.
            if bundle_future is not None:
                self._discard_bundle(bundle_future, plan, caller)
            existing = self.kube.read_pod(plan.namespace, plan.pod_name)
            if existing is None:
                raise
            return describe(existing, created=False)
        except BrokerError as exc:
            if bundle_future is not None:
                self._discard_bundle(bundle_future, plan, caller)
            self._audit_failure(plan, caller, "create_pod", exc)
            raise
        if not request.secrets:
            return self._view_after_create(plan, pod_manifest)
        assert bundle_future is not None
        bundle = self._await_bundle(bundle_future, plan, caller, pod_ref.uid)
        try:
            self._create_secret(plan, caller, teams, bundle, pod_ref.uid)
        except BrokerError as exc:
            self._rollback(
                plan, caller, bundle.lease_ids, "create_secret", exc, accessor=bundle.token_accessor
            )
            raise
        return self._view_after_create(plan, pod_manifest)

    def _resolve(self, plan: LaunchPlan, request: LaunchRequest, decision: Any) -> BundleLike:
        with VAULT_LATENCY.labels("resolve").time():
            return self.secrets.resolve(
                request.task, request.secrets, decision, launch_id=plan.launch_id
            )

    def _await_bundle(
        self,
        future: Future[BundleLike],
        plan: LaunchPlan,
        caller: Caller,
        pod_uid: str | None,
    ) -> BundleLike:
        try:
            return future.result()
        except BrokerError as exc:
            if pod_uid is not None:
                self._rollback(plan, caller, [], "resolve_secrets", exc)
            else:
                self._audit_failure(plan, caller, "resolve_secrets", exc)
            raise

    def _discard_bundle(self, future: Future[BundleLike], plan: LaunchPlan, caller: Caller) -> None:
        with contextlib.suppress(BrokerError):
            bundle = future.result()
            self._revoke(plan, caller, bundle.lease_ids, accessor=bundle.token_accessor)

    def _expected_keys(self, request: LaunchRequest) -> dict[str, list[str]] | None:
        """Secret -> key names known from the catalog, or None if any must be read first."""
        catalog = self.secrets.policy_set().catalog
        keys: dict[str, list[str]] = {}
        for secret in request.secrets:
            entry = catalog.get(secret.name)
            if isinstance(entry, DatabaseSecret):
                keys[secret.name] = list(DATABASE_KEYS)
            elif isinstance(entry, KvSecret) and entry.keys:
                keys[secret.name] = list(entry.keys)
            else:
                return None
        return keys

    def _create_secret(
        self,
        plan: LaunchPlan,
        caller: Caller,
        teams: Sequence[str],
        bundle: BundleLike,
        pod_uid: str,
    ) -> None:
        sources = [
            {
                "name": s.name,
                "path": s.vault_path,
                "version": s.version,
                "lease_id": s.lease_id,
                "keys": sorted(s.keys),
            }
            for s in bundle.secrets
        ]
        resolved = ev.secrets_resolved(
            launch_id=plan.launch_id,
            caller=caller,
            task=plan.task,
            secrets=sources,
            token_accessor=bundle.token_accessor,
            teams=teams,
        )
        values = {s.name: s.keys for s in bundle.secrets}
        annotations = {
            SECRET_NAMES_ANNOTATION: ",".join(sorted(values)),
            SECRET_SOURCES_ANNOTATION: json.dumps(
                [
                    {"name": s.name, "path": s.vault_path, "version": s.version}
                    for s in bundle.secrets
                ],
                separators=(",", ":"),
            ),
            LEASES_ANNOTATION: ",".join(bundle.lease_ids),
            # An accessor can revoke its token but not use it (safe to keep, like lease ids).
            ACCESSOR_ANNOTATION: bundle.token_accessor,
        }
        manifest = plan.secret_manifest(values, pod_uid, annotations)
        created = ev.launch_event(
            ev.EventKind.SECRET_CREATED,
            launch_id=plan.launch_id,
            task=plan.task,
            caller=caller,
            secret_names=sorted(values),
            teams=teams,
            namespace=plan.namespace,
            secret=plan.secret_name,
        )
        self.audit.append_many([resolved, created])
        self.kube.create_secret(manifest)
        LIVE_SECRETS.inc()

    def _view_after_create(self, plan: LaunchPlan, pod: dict[str, Any]) -> LaunchView:
        names = [n for n in pod["metadata"]["annotations"][SECRET_NAMES_ANNOTATION].split(",") if n]
        return LaunchView(
            launch_id=plan.launch_id,
            task=plan.task,
            namespace=plan.namespace,
            pod_name=plan.pod_name,
            phase="Pending",
            secret_names=names,
        )

    @staticmethod
    def _failure_event(
        plan: LaunchPlan, caller: Caller, stage: str, exc: BaseException
    ) -> ev.AuditEvent:
        return ev.launch_event(
            ev.EventKind.LAUNCH_FAILED,
            launch_id=plan.launch_id,
            task=plan.task,
            caller=caller,
            stage=stage,
            error=type(exc).__name__,
        )

    def _audit_failure(
        self, plan: LaunchPlan, caller: Caller, stage: str, exc: BaseException
    ) -> None:
        with contextlib.suppress(BrokerError):
            self.audit.append(self._failure_event(plan, caller, stage, exc))

    def _rollback(
        self,
        plan: LaunchPlan,
        caller: Caller,
        lease_ids: Sequence[str],
        stage: str,
        exc: BaseException,
        accessor: str | None = None,
    ) -> None:
        """Undo a half-made launch: the pod (its Secret goes with it), any leases and the
        child token. Undoing comes first; recording it never blocks it."""
        with contextlib.suppress(BrokerError):
            self.kube.delete_pod(plan.namespace, plan.pod_name)
        with contextlib.suppress(BrokerError):
            self.kube.delete_secret(plan.namespace, plan.secret_name)
        if lease_ids or accessor:
            self._revoke(plan, caller, lease_ids, accessor=accessor)
        self._audit_failure(plan, caller, stage, exc)

    def _revoke(
        self,
        plan: LaunchPlan | None,
        caller: Caller | str | None,
        lease_ids: Sequence[str],
        launch_id: str | None = None,
        task: TaskIdentity | None = None,
        accessor: str | None = None,
    ) -> None:
        """Revoke leases (and the child token, when known), then record what happened:
        revocation reduces exposure, so it never waits for the audit store."""
        launch_id = plan.launch_id if plan else launch_id
        revoked, error = True, None
        try:
            with VAULT_LATENCY.labels("revoke").time():
                if lease_ids:
                    self.secrets.revoke(lease_ids)
                if accessor:
                    self.secrets.revoke_token(accessor)
        except BrokerError as exc:
            revoked, error = False, type(exc).__name__
            log.warning(
                "lease revocation failed for launch %s; leases expire on their TTL", launch_id
            )
        self.record_quietly(
            ev.launch_event(
                ev.EventKind.LEASES_REVOKED,
                launch_id=launch_id,
                task=plan.task if plan else task,
                caller=caller,
                lease_ids=list(lease_ids),
                token_accessor=accessor,
                revoked=revoked,
                error=error,
            )
        )

    def record_quietly(self, event: ev.AuditEvent) -> None:
        """Audit a clean-up step without letting a down audit store stop the clean-up."""
        try:
            self.audit.append(event)
        except BrokerError as exc:
            log.warning("audit store unavailable; %s not recorded: %s", event.kind, exc.reason)

    # -- lookups --------------------------------------------------------------------------

    def find(self, caller: Caller, launch_id: str) -> TaskPod:
        """The launch's pod, if ``caller`` may see launches of its DAG (404 otherwise
        would leak nothing more: ids are unguessable digests; 403 names the reason)."""
        for namespace in self.plan_policy.namespaces:
            for pod in self.kube.list_managed_pods(namespace, launch_id=launch_id):
                authorize_dag(caller, _task_from_pod(pod).dag_id)
                return TaskPod(namespace, pod)
        raise NotFoundError(f"no launch {launch_id!r}")

    def status(self, caller: Caller, launch_id: str) -> LaunchView:
        return describe(self.find(caller, launch_id).pod)

    def logs(
        self,
        caller: Caller,
        launch_id: str,
        *,
        follow: bool,
        since_seconds: int | None,
        timestamps: bool,
    ) -> Iterator[bytes]:
        """The pod's log. With ``follow`` the stream ends once the pod has finished and
        its log has gone quiet, even where the node keeps the stream open (kwok does)."""
        found = self.find(caller, launch_id)
        namespace, name = found.namespace, found.pod.metadata.name
        chunks = self.kube.pod_logs(
            namespace,
            name,
            container=CONTAINER_NAME,
            follow=follow,
            since_seconds=since_seconds,
            timestamps=timestamps,
        )
        if not follow:
            return chunks
        return self._follow(chunks, namespace, name)

    def _follow(self, chunks: Iterator[bytes], namespace: str, name: str) -> Iterator[bytes]:
        queue: Queue[bytes | None] = Queue(maxsize=256)
        stop = threading.Event()

        def pump() -> None:
            with contextlib.suppress(Exception):
                for chunk in chunks:
                    while not stop.is_set():
                        try:
                            queue.put(chunk, timeout=1.0)
                            break
                        except Full:
                            continue
                    if stop.is_set():
                        return
            with contextlib.suppress(Full):
                queue.put(None, timeout=1.0)

        def close_upstream() -> None:
            stop.set()
            close = getattr(chunks, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

        threading.Thread(target=pump, name=f"logs-{name}", daemon=True).start()
        try:
            while True:
                try:
                    chunk = queue.get(timeout=1.0)
                except Empty:
                    pod = self.kube.read_pod(namespace, name)
                    phase = pod.status.phase if pod is not None and pod.status else None
                    if pod is None or phase in ("Succeeded", "Failed"):
                        return
                    continue
                if chunk is None:
                    return
                yield chunk
        finally:
            # The client went away or the pod ended: stop the pump and the upstream stream.
            close_upstream()

    def kill(self, caller: Caller, launch_id: str, reason: str | None = None) -> LaunchView:
        """DELETE a launch. A running one is killed (recorded as launch_killed); a
        finished one is only tidied away (pod_deleted), so the trail tells them apart."""
        found = self.find(caller, launch_id)
        pod = found.pod
        task = _task_from_pod(pod)
        finished = bool(pod.status and pod.status.phase in ("Succeeded", "Failed"))
        kind = ev.EventKind.POD_DELETED if finished else ev.EventKind.LAUNCH_KILLED
        self.audit.append(
            ev.launch_event(
                kind,
                launch_id=launch_id,
                task=task,
                caller=caller,
                by=caller.identity,
                reason=reason or "DELETE /v1/launches",
            )
        )
        self.finish(found, reason="pod deleted" if finished else "killed")
        self.kube.delete_pod(found.namespace, pod.metadata.name)
        view = describe(pod)
        return view.model_copy(update={"phase": "Deleted"})

    # -- end of a pod ---------------------------------------------------------------------

    def finish(self, found: TaskPod, *, reason: str = "pod ended", force: bool = False) -> None:
        """Delete the pod's Secret and revoke its leases, once: the replica that claims
        the pod (an annotation written with the pod's resourceVersion as precondition)
        does it; the others see the claim and stop. ``force`` skips the claim (the sweep
        finishing what a crashed claimant left)."""
        pod = found.pod
        if not force and not self._claim(found):
            return
        launch_id = found.launch_id
        task = _task_from_pod(pod)
        secret = secret_name_for(launch_id)
        phase = pod.status.phase if pod.status else None
        view = describe(pod)
        if phase in ("Succeeded", "Failed") and not force:
            self.record_quietly(
                ev.launch_event(
                    ev.EventKind.POD_FINISHED,
                    launch_id=launch_id,
                    task=task,
                    secret_names=view.secret_names,
                    phase=phase,
                    exit_code=view.exit_code,
                )
            )
        meta = self.kube.read_secret_metadata(found.namespace, secret)
        if meta is None:
            return
        self.release_secret(
            found.namespace, meta, reason=reason, task=task, secret_names=view.secret_names
        )

    def release_secret(
        self,
        namespace: str,
        meta: dict[str, Any],
        *,
        reason: str,
        task: TaskIdentity | None = None,
        secret_names: Sequence[str] = (),
    ) -> None:
        """Delete a broker Secret and revoke the leases and child token its annotations
        name. Deleting comes first: values leave the cluster even if Vault or the
        audit store is down."""
        annotations = meta.get("annotations") or {}
        labels = meta.get("labels") or {}
        launch_id = labels.get(LAUNCH_ID_LABEL)
        name = str(meta.get("name"))
        if self.kube.delete_secret(namespace, name):
            LIVE_SECRETS.dec()
        self.record_quietly(
            ev.launch_event(
                ev.EventKind.SECRET_DELETED,
                launch_id=launch_id,
                task=task,
                secret_names=list(secret_names),
                namespace=namespace,
                secret=name,
                reason=reason,
            )
        )
        leases = [x for x in annotations.get(LEASES_ANNOTATION, "").split(",") if x]
        accessor = annotations.get(ACCESSOR_ANNOTATION) or None
        if leases or accessor:
            self._revoke(None, None, leases, launch_id=launch_id, task=task, accessor=accessor)

    def _claim(self, found: TaskPod) -> bool:
        """True if this replica now owns the cleanup of ``found``'s pod."""
        pod = found.pod
        for _ in range(3):
            if (pod.metadata.annotations or {}).get(CLEANED_ANNOTATION):
                return False
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if self.kube.claim_pod(
                found.namespace,
                pod.metadata.name,
                pod.metadata.resource_version,
                {CLEANED_ANNOTATION: stamp},
            ):
                return True
            fresh = self.kube.read_pod(found.namespace, pod.metadata.name)
            if fresh is None:
                return True  # gone already: nobody else will look at it again
            pod = fresh
        return False
