"""One launch, executed: authorize, plan, decide, read secrets, create the pod and its
Secret. Every step is audited before it happens; if the audit write fails the step does
not happen (fail closed). What to do is computed in :mod:`broker.core.plan`; this module
only carries it out and undoes it on failure.

Critical path (what the benchmark measures): the pod is created while Vault is read
(when the catalog declares the keys), then the per-pod Secret, owned by the pod. The
kubelet does not start a container whose Secret is missing, so the pod waits for it."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from broker.core import audit_events as ev
from broker.core import podmeta
from broker.core.api_models import LaunchRequest, LaunchView
from broker.core.models import Caller
from broker.core.objects import launch_view
from broker.core.plan import (
    LaunchPlan,
    PlanPolicy,
    SecretLimits,
    build_plan,
    complete_plan,
    teams_of,
)
from broker.core.policy import Decision, decide
from broker.errors import BrokerError, ConflictError, DeniedError
from broker.metrics import DENIALS, LAUNCH_LATENCY, LAUNCHES, LIVE_SECRETS, VAULT_LATENCY
from broker.service.auth import authorize_dag
from broker.service.cleanup import Cleanup
from broker.service.ports import AuditSink, BundleLike, Cluster, PolicySource, SecretStore


def _holdings(bundle: BundleLike) -> podmeta.VaultHoldings:
    return podmeta.VaultHoldings(tuple(bundle.lease_ids), bundle.token_accessor)


class LaunchExecutor:
    def __init__(
        self,
        *,
        cluster: Cluster,
        policies: PolicySource,
        secrets: SecretStore,
        audit: AuditSink,
        cleanup: Cleanup,
        plan_policy: PlanPolicy,
        limits: SecretLimits | None = None,
        workers: int = 16,
    ) -> None:
        self.cluster = cluster
        self.policies = policies
        self.secrets = secrets
        self.audit = audit
        self.cleanup = cleanup
        self.plan_policy = plan_policy
        self.limits = limits or SecretLimits()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="launch")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

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
        requested = ev.launch_requested(
            launch_id=plan.launch_id,
            caller=caller,
            task=task,
            secret_names=plan.secret_names,
            namespace=plan.namespace,
            image=request.container.image,
        )
        # A retry of the same try reattaches; look for its pod while deciding.
        existing_future = self._pool.submit(self.cluster.read_pod, plan.namespace, plan.pod_name)
        try:
            with VAULT_LATENCY.labels("decide").time():
                policy = self.policies.current()
            decision = decide(policy, task, request.secrets)
        except BrokerError as exc:
            with contextlib.suppress(BrokerError):
                self.audit.append_many([requested, self._failure(plan, caller, "decide", exc)])
            raise
        decided = self._decided_event(plan, caller, decision)
        if not decision.allowed:
            self.audit.append_many([requested, decided])
            DENIALS.inc()
            decision.raise_for_denial()
        plan = complete_plan(plan, policy, decision, self.limits)
        existing = existing_future.result()
        if existing is not None:
            self.audit.append_many([requested, decided, self._reattached_event(plan, caller)])
            return launch_view(existing, created=False)
        # Before anything is recorded or read: refs that cannot work are the caller's 422.
        pod_manifest = plan.initial_pod()
        intent = ev.launch_event(
            ev.EventKind.POD_CREATED,
            launch_id=plan.launch_id,
            task=task,
            caller=caller,
            secret_names=plan.secret_names,
            teams=plan.teams,
            namespace=plan.namespace,
            pod=plan.pod_name,
        )
        # One commit before any side effect: if it fails, nothing has happened.
        self.audit.append_many([requested, decided, intent])
        return self._execute(plan, caller, pod_manifest)

    def _execute(
        self, plan: LaunchPlan, caller: Caller, pod_manifest: dict[str, Any] | None
    ) -> LaunchView:
        bundle_future: Future[BundleLike] | None = None
        if plan.secrets is not None and plan.secrets.reads:
            bundle_future = self._pool.submit(self._resolve, plan)
        if pod_manifest is None:
            # Keys are learnt from the values: the pod must wait for Vault.
            assert bundle_future is not None
            bundle = self._await_bundle(bundle_future, plan, caller, pod_created=False)
            try:
                pod_manifest = plan.pod_with_secret_refs(
                    {s.name: list(s.keys) for s in bundle.secrets}
                )
            except BrokerError as exc:
                self._rollback(plan, caller, _holdings(bundle), "plan_secret_refs", exc)
                raise
        try:
            pod_ref = self.cluster.create_pod(pod_manifest)
        except ConflictError:
            # Same task try already launched (retry or concurrent duplicate): reattach.
            if bundle_future is not None:
                self._discard_bundle(bundle_future, plan, caller)
            existing = self.cluster.read_pod(plan.namespace, plan.pod_name)
            if existing is None:
                raise
            return launch_view(existing, created=False)
        except BrokerError as exc:
            if bundle_future is not None:
                self._discard_bundle(bundle_future, plan, caller)
            self._audit_failure(plan, caller, "create_pod", exc)
            raise
        if bundle_future is None:
            return self._view_after_create(plan)
        bundle = self._await_bundle(bundle_future, plan, caller, pod_created=True)
        try:
            self._create_secret(plan, caller, bundle, pod_ref.uid)
        except BrokerError as exc:
            self._rollback(plan, caller, _holdings(bundle), "create_secret", exc)
            raise
        return self._view_after_create(plan)

    def _resolve(self, plan: LaunchPlan) -> BundleLike:
        assert plan.secrets is not None
        with VAULT_LATENCY.labels("resolve").time():
            return self.secrets.resolve(plan.secrets, launch_id=plan.launch_id)

    def _await_bundle(
        self, future: Future[BundleLike], plan: LaunchPlan, caller: Caller, *, pod_created: bool
    ) -> BundleLike:
        try:
            return future.result()
        except BrokerError as exc:
            if pod_created:
                self._rollback(plan, caller, podmeta.VaultHoldings(), "resolve_secrets", exc)
            else:
                self._audit_failure(plan, caller, "resolve_secrets", exc)
            raise

    def _discard_bundle(self, future: Future[BundleLike], plan: LaunchPlan, caller: Caller) -> None:
        with contextlib.suppress(BrokerError):
            bundle = future.result()
            self.cleanup.revoke(
                _holdings(bundle), launch_id=plan.launch_id, task=plan.task, caller=caller
            )

    def _create_secret(
        self, plan: LaunchPlan, caller: Caller, bundle: BundleLike, pod_uid: str
    ) -> None:
        resolved = ev.secrets_resolved(
            launch_id=plan.launch_id,
            caller=caller,
            task=plan.task,
            secrets=[
                {
                    "name": s.name,
                    "path": s.vault_path,
                    "version": s.version,
                    "lease_id": s.lease_id,
                    "keys": sorted(s.keys),
                }
                for s in bundle.secrets
            ],
            token_accessor=bundle.token_accessor,
            teams=plan.teams,
        )
        values = {s.name: s.keys for s in bundle.secrets}
        sources = [podmeta.SecretSource(s.name, s.vault_path, s.version) for s in bundle.secrets]
        manifest = plan.secret_manifest(values, pod_uid, sources, _holdings(bundle))
        created = ev.launch_event(
            ev.EventKind.SECRET_CREATED,
            launch_id=plan.launch_id,
            task=plan.task,
            caller=caller,
            secret_names=sorted(values),
            teams=plan.teams,
            namespace=plan.namespace,
            secret=plan.secret_name,
        )
        self.audit.append_many([resolved, created])
        self.cluster.create_secret(manifest)
        LIVE_SECRETS.inc()

    @staticmethod
    def _view_after_create(plan: LaunchPlan) -> LaunchView:
        return LaunchView(
            launch_id=plan.launch_id,
            task=plan.task,
            namespace=plan.namespace,
            pod_name=plan.pod_name,
            phase="Pending",
            secret_names=plan.secret_names,
        )

    # -- audit events ---------------------------------------------------------------------

    @staticmethod
    def _decided_event(plan: LaunchPlan, caller: Caller, decision: Decision) -> ev.AuditEvent:
        return ev.decision(
            launch_id=plan.launch_id,
            caller=caller,
            task=plan.task,
            secret_names=plan.secret_names,
            allowed=decision.allowed,
            matched_grants={n: [d.grant] for n, d in decision.secrets.items()},
            reasons=decision.reasons,
            denied=[*decision.denied, *decision.unknown],
            teams=teams_of(decision.matched_grants),
        )

    @staticmethod
    def _reattached_event(plan: LaunchPlan, caller: Caller) -> ev.AuditEvent:
        return ev.launch_event(
            ev.EventKind.LAUNCH_REATTACHED,
            launch_id=plan.launch_id,
            task=plan.task,
            caller=caller,
            secret_names=plan.secret_names,
            namespace=plan.namespace,
            pod=plan.pod_name,
        )

    @staticmethod
    def _failure(plan: LaunchPlan, caller: Caller, stage: str, exc: BaseException) -> ev.AuditEvent:
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
        self.cleanup.record_quietly(self._failure(plan, caller, stage, exc))

    def _rollback(
        self,
        plan: LaunchPlan,
        caller: Caller,
        holdings: podmeta.VaultHoldings,
        stage: str,
        exc: BaseException,
    ) -> None:
        """Undo a half-made launch: the pod (its Secret goes with it), any leases and the
        child token. Undoing comes first; recording it never blocks it."""
        with contextlib.suppress(BrokerError):
            self.cluster.delete_pod(plan.namespace, plan.pod_name)
        with contextlib.suppress(BrokerError):
            self.cluster.delete_secret(plan.namespace, plan.secret_name)
        if holdings:
            self.cleanup.revoke(holdings, launch_id=plan.launch_id, task=plan.task, caller=caller)
        self._audit_failure(plan, caller, stage, exc)
