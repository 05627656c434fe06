"""One launch, executed: authorize, plan, decide, read secrets, create the pod and its
Secret. Every step is audited before it happens; if the audit write fails the step does
not happen (fail closed). What to do is computed in :mod:`broker.core.plan`; this module
only carries it out and undoes it on failure.

Critical path (what the benchmark measures): the pod is created while Vault is read
(when the catalog declares the keys), then the per-pod Secret, owned by the pod. The
kubelet does not start a container whose Secret is missing, so the pod waits for it."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from broker.core import audit_events as ev
from broker.core import podmeta
from broker.core.api_models import (
    LaunchDryRun,
    LaunchRequest,
    LaunchView,
    PlannedDecision,
    PlannedRead,
    PlannedToken,
)
from broker.core.models import Caller
from broker.core.objects import LaunchInProgressError, PodInfo, launch_view
from broker.core.plan import (
    LaunchPlan,
    PlanPolicy,
    SecretLimits,
    build_plan,
    complete_plan,
    task_labels,
    teams_of,
)
from broker.core.policy import Decision, decide
from broker.errors import BrokerError, ConflictError, DeniedError
from broker.metrics import DENIALS, LAUNCH_LATENCY, LAUNCHES, LIVE_SECRETS, VAULT_LATENCY
from broker.service.auth import authorize_dag
from broker.service.cleanup import Cleanup
from broker.service.ports import AuditSink, BundleLike, Cluster, PolicySource, SecretStore
from broker.service.renewal import LeaseRenewer
from broker.service.verification import TaskVerifier, VerificationResult

log = logging.getLogger("podbroker.launch")

OTHER_ATTEMPT_WAIT_SECONDS = 10.0
"""How long a duplicate request waits for the pod of the attempt already launching its
task try before answering 503 (well under the Airflow client's request timeout)."""
OTHER_ATTEMPT_POLL_SECONDS = 0.2


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
        verifier: TaskVerifier | None = None,
        limits: SecretLimits | None = None,
        workers: int = 16,
        renewals: LeaseRenewer | None = None,
        other_attempt_wait: float = OTHER_ATTEMPT_WAIT_SECONDS,
    ) -> None:
        self.cluster = cluster
        self.policies = policies
        self.secrets = secrets
        self.audit = audit
        self.cleanup = cleanup
        self.plan_policy = plan_policy
        self.verifier = verifier or TaskVerifier(None, "off")
        self.limits = limits or SecretLimits()
        self.renewals = renewals
        self.other_attempt_wait = other_attempt_wait
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

    def dry_run(self, caller: Caller, request: LaunchRequest) -> LaunchDryRun:
        """The plan and the policy decision for ``request``, audited as a dry run.
        Creates nothing, reads no secret from Vault and mints no token (the grants are
        read, as for any decision); Airflow is not asked about the task instance."""
        authorize_dag(caller, request.task.dag_id)
        plan = build_plan(request, self.plan_policy, caller.identity)
        with VAULT_LATENCY.labels("decide").time():
            policy = self.policies.current()
        decision = decide(
            policy,
            request.task,
            request.secrets,
            image=request.container.image,
            pod_template=request.pod_template,
        )
        pod: dict[str, Any] | None = plan.pod
        if decision.allowed:
            plan = complete_plan(plan, policy, decision, self.limits)
            pod = plan.initial_pod()
        secrets = plan.secrets
        self.audit.append(
            ev.launch_event(
                ev.EventKind.LAUNCH_DRY_RUN,
                launch_id=plan.launch_id,
                task=request.task,
                caller=caller,
                secret_names=plan.secret_names,
                teams=teams_of(decision.matched_grants),
                namespace=plan.namespace,
                allowed=decision.allowed,
                denied=[*decision.denied, *decision.unknown],
                reasons=list(decision.reasons),
            )
        )
        return LaunchDryRun(
            launch_id=plan.launch_id,
            namespace=plan.namespace,
            pod_name=plan.pod_name,
            secret_name=plan.secret_name,
            decision=PlannedDecision(
                allowed=decision.allowed,
                matched_grants=decision.matched_grants,
                denied=decision.denied,
                unknown=decision.unknown,
                reasons=decision.reasons,
                requires_verified_task=decision.requires_verified_task,
            ),
            pod=pod if pod is not None else plan.pod,
            secret_keys_known=pod is not None,
            vault_reads=[
                PlannedRead(
                    name=read.name,
                    kind=read.kind,
                    path=read.vault_path,
                    grant=read.grant,
                    version=read.version,
                    keys=list(read.keys) if read.keys is not None else None,
                    lease_cap_seconds=read.lease_cap,
                )
                for read in (secrets.reads if secrets else ())
            ],
            token=(
                PlannedToken(
                    policies=list(secrets.token.policies),
                    ttl_seconds=secrets.token.ttl_seconds,
                    num_uses=secrets.token.num_uses,
                )
                if secrets is not None and secrets.reads
                else None
            ),
        )

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
        # A retry of the same try reattaches; look for its pod (and ask Airflow about the
        # task instance, when verification is on) while deciding.
        existing_future = self._pool.submit(self.cluster.read_pod, plan.namespace, plan.pod_name)
        record_future = self.verifier.prefetch(self._pool, task)
        try:
            with VAULT_LATENCY.labels("decide").time():
                policy = self.policies.current()
            decision = decide(
                policy,
                task,
                request.secrets,
                image=request.container.image,
                pod_template=request.pod_template,
            )
            verified = self.verifier.verify(
                caller,
                task,
                grant_requires=decision.allowed and decision.requires_verified_task,
                prefetched=record_future,
            )
        except BrokerError as exc:
            with contextlib.suppress(BrokerError):
                self.audit.append_many([requested, self._failure(plan, caller, "decide", exc)])
            raise
        decided = self._decided_event(plan, caller, decision, verified)
        if not decision.allowed or verified.refuses:
            self.audit.append_many([requested, decided])
            DENIALS.inc()
            decision.raise_for_denial()
            raise DeniedError(
                f"task instance not verified with Airflow: {verified.failure}",
                denied=plan.secret_names,
            )
        plan = complete_plan(plan, policy, decision, self.limits)
        existing = existing_future.result()
        if existing is not None:
            return self._reattach(plan, existing, caller, [requested, decided])
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
        # One commit before any side effect: if it fails, nothing has happened. It also
        # opens the launch in the holdings ledger, so a crash from here on is swept.
        try:
            self.audit.append_many(
                [requested, decided, intent], opens=(plan.launch_id, plan.namespace)
            )
        except LaunchInProgressError:
            # A concurrent duplicate (an HTTP retry, two schedulers): reattach to the pod
            # the other attempt makes, as a duplicate that came a moment later would.
            existing = self._await_other_attempt(plan)
            if existing is None:
                raise
            return self._reattach(plan, existing, caller, [requested, decided])
        view = self._execute(plan, caller, pod_manifest)
        if view.created and plan.task.try_number > 1:
            self._pool.submit(self._end_earlier_tries, plan)
        return view

    def _reattach(
        self, plan: LaunchPlan, existing: PodInfo, caller: Caller, decided: list[ev.AuditEvent]
    ) -> LaunchView:
        """This task try's pod exists: answer with it if this request describes it (else
        409), recorded after the request and its decision."""
        self._check_same_request(plan, existing, caller, decided)
        self.audit.append_many([*decided, self._reattached_event(plan, caller)])
        return launch_view(existing, created=False)

    def _await_other_attempt(self, plan: LaunchPlan) -> PodInfo | None:
        """The pod of the attempt that holds this task try, once it exists; None if it
        did not appear in time (that attempt is slow, failed, or died and awaits the
        sweep)."""
        give_up = time.monotonic() + self.other_attempt_wait
        while True:
            existing = self.cluster.read_pod(plan.namespace, plan.pod_name)
            if existing is not None or time.monotonic() >= give_up:
                return existing
            time.sleep(OTHER_ATTEMPT_POLL_SECONDS)

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
            self._check_same_request(plan, existing, caller, [])
            return launch_view(existing, created=False)
        except BrokerError as exc:
            if bundle_future is not None:
                self._discard_bundle(bundle_future, plan, caller)
            else:
                self._give_back(plan, caller, podmeta.VaultHoldings())  # close its row
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

    def _check_same_request(
        self,
        plan: LaunchPlan,
        existing: PodInfo,
        caller: Caller,
        pending: list[ev.AuditEvent],
    ) -> None:
        """Reattach only to what this request describes: whoever launched first must
        not choose the pod (image, command, secrets...) the genuine task attaches to."""
        theirs = podmeta.request_digest_of(existing.annotations)
        ours = podmeta.request_digest_of(plan.pod["metadata"]["annotations"])
        if theirs is None or theirs == ours:
            return
        conflict = ConflictError("a different request made this task try's pod")
        with contextlib.suppress(BrokerError):
            self.audit.append_many([*pending, self._failure(plan, caller, "reattach", conflict)])
        raise ConflictError(
            f"task try {plan.task.try_number} of {plan.task.dag_id}.{plan.task.task_id} "
            "already has a pod made from a different request (image, command, env, secrets "
            "or scheduling differ); it is not reattached"
        )

    def _end_earlier_tries(self, plan: LaunchPlan) -> None:
        """Pods of earlier tries of this task instance keep no secrets once a newer try
        runs: kill them and revoke what they hold."""
        try:
            pods = self.cluster.list_managed_pods(plan.namespace, labels=task_labels(plan.task))
        except BrokerError as exc:
            log.warning("could not look for earlier tries of %s: %s", plan.launch_id, exc.reason)
            return
        task = plan.task
        for pod in pods:
            other = pod.task
            earlier = other.instance_key == task.instance_key and other.try_number < task.try_number
            if not earlier or pod.finished or pod.deleting:
                continue
            try:
                self.cleanup.end_launch(
                    pod, f"superseded by try {task.try_number}", cleanup_reason="superseded"
                )
            except BrokerError as exc:
                log.warning("could not end earlier try %s: %s", pod.name, exc.reason)

    def _resolve(self, plan: LaunchPlan) -> BundleLike:
        assert plan.secrets is not None
        ledger = self.cleanup.ledger

        def record(accessor: str | None, lease_ids: Sequence[str]) -> None:
            # Durable before any value is used: every later undo starts from this. A
            # batch token (KV-only launch) has no accessor and no lease: nothing to undo,
            # so no commit (the launch's row was opened with its intent).
            if ledger is not None and (accessor or lease_ids):
                ledger.hold(
                    plan.launch_id, plan.namespace, token_accessor=accessor, lease_ids=lease_ids
                )

        with VAULT_LATENCY.labels("resolve").time():
            bundle = self.secrets.resolve(plan.secrets, launch_id=plan.launch_id, on_issue=record)
        if self.renewals is not None and bundle.lease_ids:
            self.renewals.track(plan.launch_id, bundle)
        return bundle

    def _await_bundle(
        self, future: Future[BundleLike], plan: LaunchPlan, caller: Caller, *, pod_created: bool
    ) -> BundleLike:
        try:
            return future.result()
        except BrokerError as exc:
            if pod_created:
                self._rollback(plan, caller, podmeta.VaultHoldings(), "resolve_secrets", exc)
            else:
                self._give_back(plan, caller, podmeta.VaultHoldings())
                self._audit_failure(plan, caller, "resolve_secrets", exc)
            raise

    def _discard_bundle(self, future: Future[BundleLike], plan: LaunchPlan, caller: Caller) -> None:
        with contextlib.suppress(BrokerError):
            bundle = future.result()
            self._give_back(plan, caller, _holdings(bundle))

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
        # The leak guard masks the launch's log with these, even once its Secret is gone.
        self.cleanup.issued.hold(
            plan.launch_id, {s.name: list(s.keys.values()) for s in bundle.secrets}
        )
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
    def _decided_event(
        plan: LaunchPlan, caller: Caller, decision: Decision, verified: VerificationResult
    ) -> ev.AuditEvent:
        refused = decision.allowed and verified.refuses
        return ev.decision(
            launch_id=plan.launch_id,
            caller=caller,
            task=plan.task,
            secret_names=plan.secret_names,
            allowed=decision.allowed and not refused,
            matched_grants={n: [d.grant] for n, d in decision.secrets.items()},
            reasons=[
                *decision.reasons,
                *([f"task not verified: {verified.failure}"] if refused else []),
            ],
            denied=plan.secret_names if refused else [*decision.denied, *decision.unknown],
            teams=teams_of(decision.matched_grants),
            verification=verified.audit_details(),
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

    def _give_back(self, plan: LaunchPlan, caller: Caller, holdings: podmeta.VaultHoldings) -> None:
        """Revoke what the launch holds in Vault: ``holdings`` as this process knows
        them, together with what the ledger recorded (the ledger knows the token as soon
        as it was minted, even when its reads then failed)."""
        self.cleanup.settle(plan.launch_id, holdings, task=plan.task, caller=caller)

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
        self.cleanup.issued.forget(plan.launch_id)
        with contextlib.suppress(BrokerError):
            self.cluster.delete_pod(plan.namespace, plan.pod_name)
        with contextlib.suppress(BrokerError):
            self.cluster.delete_secret(plan.namespace, plan.secret_name)
        self._give_back(plan, caller, holdings)
        self._audit_failure(plan, caller, stage, exc)
