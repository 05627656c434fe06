"""BrokerPodOperator: runs one container in a Kubernetes pod launched by the podbroker
service, with secrets named by the DAG author and delivered by the broker straight into
the pod. The worker sends names, receives status and log lines: never a secret value.

Parameters mirror KubernetesPodOperator where they overlap (image, cmds, arguments,
env_vars, container_resources, labels, annotations, node_selector, tolerations, affinity,
startup_timeout_seconds, schedule_timeout_seconds, get_logs, on_finish_action,
on_kill_action, skip_on_exit_code, do_xcom_push, deferrable, poll_interval,
logging_interval); docs/migration-from-kpo.md maps every KPO parameter."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any, Literal

from airflow.sdk import BaseOperator, Context, conf
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException
from pydantic import ValidationError

from airflow_plugin.client import TERMINAL_PHASES, BrokerClient
from airflow_plugin.hook import BrokerHook
from airflow_plugin.inputs import affinity_dict, env_dict, resources
from airflow_plugin.inputs import tolerations as tolerations_of
from airflow_plugin.launch_watch import LaunchWatcher, OutageTimeoutError, StartupFailedError
from airflow_plugin.links import BrokerLaunchLink
from airflow_plugin.result import (
    ResultTooLargeError,
    ResultUncheckedError,
    ResultWithheldError,
    task_result,
)
from airflow_plugin.retry import DEFAULT_UNAVAILABLE_TIMEOUT_SECONDS, Outage
from airflow_plugin.secrets import SecretSpec, parse_secrets
from airflow_plugin.settings import DEFAULT_CONN_ID, ConnectionConfigError
from airflow_plugin.trigger import ON_KILL_ACTIONS, BrokerLaunchTrigger, OnKillAction
from broker.core.api_models import (
    MAX_GRACE_SECONDS,
    ContainerSpec,
    LaunchDryRun,
    LaunchRequest,
    LaunchView,
    ResourceRequirements,
    Scheduling,
    Toleration,
)
from broker.core.models import SecretRequest, TaskIdentity
from broker.errors import (
    AuthenticationError,
    BrokerError,
    DeniedError,
    MisconfiguredError,
    TemporaryError,
)

OnFinishAction = Literal["delete_pod", "delete_succeeded_pod", "keep_pod"]
_ON_FINISH_ACTIONS = ("delete_pod", "delete_succeeded_pod", "keep_pod")
# How long a succeeded pod's return value waits for the broker's leak guard verdict
# (given as the broker cleans up the ended pod, normally within a second).
RESULT_CHECK_TIMEOUT_SECONDS = 60.0


# The broker's longest launch timeout (LaunchRequest.timeout_seconds): the deadline of a
# task that names none and has no execution_timeout. Never a silent hour.
DEFAULT_LAUNCH_TIMEOUT_SECONDS = 7 * 24 * 3600
# Fields a newer broker's request model may have; sent only when it does.
_AFFINITY_FIELD = "affinity"


def _exit_codes(value: int | Collection[int] | None) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(code) for code in value)


def _deadline(
    launch_timeout_seconds: int | None, execution_timeout_seconds: float | None
) -> tuple[int, str]:
    """The launch timeout sent to the broker and where it came from (for the task log)."""
    if launch_timeout_seconds is not None:
        return launch_timeout_seconds, "launch_timeout_seconds"
    if execution_timeout_seconds is not None:
        seconds = max(1, math.ceil(execution_timeout_seconds))
        if seconds > DEFAULT_LAUNCH_TIMEOUT_SECONDS:
            return (
                DEFAULT_LAUNCH_TIMEOUT_SECONDS,
                "execution_timeout, capped at the broker's maximum",
            )
        return seconds, "execution_timeout"
    return DEFAULT_LAUNCH_TIMEOUT_SECONDS, "default: 7 days, the broker's maximum"


def _airflow_error(exc: BrokerError, action: str) -> AirflowException:
    if isinstance(exc, DeniedError):
        names = ", ".join(exc.denied) or "(unnamed)"
        return AirflowFailException(
            f"podbroker denied {action}: secrets not granted: {names}. {exc.reason}"
        )
    if isinstance(exc, AuthenticationError):
        # Retryable: a projected token may be mid-rotation.
        return AirflowException(
            f"podbroker did not accept the worker's credentials during {action} (retryable): {exc}"
        )
    if isinstance(exc, TemporaryError):
        return AirflowException(f"podbroker unavailable during {action} (will retry): {exc}")
    if isinstance(exc, MisconfiguredError):
        return AirflowFailException(
            f"podbroker is misconfigured ({action}); its operator must fix it: {exc}"
        )
    return AirflowFailException(f"podbroker refused {action}: {exc}")


@contextmanager
def broker_errors(action: str) -> Iterator[None]:
    """Map the broker error tree to Airflow's retry semantics: permanent errors (denied,
    invalid, unknown, a misconfigured broker) fail the task without retry; unavailability
    is retryable, also once an outage outlasted the unavailability timeout."""
    try:
        yield
    except OutageTimeoutError as exc:
        raise _airflow_error(exc.error, f"{action} (for {exc.seconds:.0f}s)") from exc.error
    except BrokerError as exc:
        raise _airflow_error(exc, action) from exc
    except ConnectionConfigError as exc:
        raise AirflowFailException(f"podbroker connection is misconfigured: {exc}") from exc


class BrokerPodOperator(BaseOperator):
    """Run ``image`` in a pod launched by the podbroker service.

    :param image: container image.
    :param cmds: entrypoint (KPO ``cmds``), templated.
    :param arguments: arguments (KPO ``arguments``), templated.
    :param env_vars: non-secret environment, templated: a dict, or ``[{"name", "value"}]``
        / ``V1EnvVar`` items (turned into a dict when the DAG is parsed, so their values
        are templated too). ``valueFrom`` (fieldRef, secretKeyRef, ...) is refused.
    :param secrets: secret names (``["warehouse-db"]``) or delivery objects from
        :func:`airflow_plugin.secrets.env_secret` / :func:`file_secret` (or their dicts).
        Not templated: the names and deliveries are what ``podbroker policies check-dags``
        decides on when the DAG is parsed.
    :param pod_template: a platform-defined template name known to the broker, templated.
    :param namespace: pod namespace (default: the connection's, else the broker's).
    :param service_account_name: pod ServiceAccount (the broker checks it is allowed).
    :param container_resources: ``{"requests": {...}, "limits": {...}}`` or
        ``V1ResourceRequirements``, templated.
    :param labels, annotations, node_selector: templated dicts.
    :param tolerations: dicts (KPO camelCase keys accepted), ``V1Toleration`` or Toleration.
    :param affinity: a dict in Kubernetes form or ``V1Affinity``; sent as
        ``scheduling.affinity`` where the broker's request model has it, refused otherwise.
    :param schedule_timeout_seconds: fail (retryable) if the pod is not scheduled after
        this (default: ``startup_timeout_seconds``, as KPO).
    :param startup_timeout_seconds: fail (retryable) if the scheduled pod has not started
        after this. A pod the broker reports as permanently unable to start (invalid
        image, config error) fails at once. Waiting reasons and the pod's events are
        shown in the task log as they change.
    :param get_logs: copy the pod's log into the task log.
    :param do_xcom_push: push the task container's termination message
        (``/dev/termination-log``, at most 4095 bytes, parsed as JSON when it is JSON)
        as XCom ``return_value`` when the pod succeeds. Default False, as KPO. The
        broker withholds a message that contains a value it issued to the launch (the
        task then fails without retry and nothing is pushed).
    :param skip_on_exit_code: exit code(s) of the task container that mark the task
        skipped instead of failed (int or list), as KPO.
    :param on_finish_action: delete_pod | delete_succeeded_pod | keep_pod.
    :param on_kill_action: delete_pod (default) | keep_pod: what a user's kill (mark
        failed / succeeded, clear) does to the launch, also while deferred.
    :param termination_grace_period: seconds (0 to 3600) between SIGTERM and SIGKILL when
        the pod is stopped (its ``terminationGracePeriodSeconds``), as KPO; the broker
        also deletes the pod with it on a kill. Default: the Kubernetes default (30s)
        for the kubelet, and the broker's kills stop the pod at once.
    :param deferrable: free the worker slot while the pod runs (async trigger polls).
    :param poll_interval: seconds between status polls.
    :param logging_interval: deferrable only: every this many seconds while the pod
        runs, resume, copy the new log lines into the task log and defer again (KPO).
        None: the log is copied once the pod has ended.
    :param launch_timeout_seconds: the broker stops the pod after this. Default:
        ``execution_timeout`` if set, else 7 days (the broker's maximum); logged at launch.
    :param broker_unavailable_timeout_seconds: keep retrying the launch, and while the
        pod runs the status polls and log reconnects, that find the broker unavailable
        (503, connection errors; for polls also a 401 during token rotation) with capped
        exponential backoff (honouring Retry-After) for this long before failing the try
        (0: fail at once). A try that fails after its launch was
        created deletes the launch first, so a retry never runs beside an orphaned pod.
    :param podbroker_conn_id: the ``podbroker`` connection.
    :param dry_run: launch nothing: ask the broker for the launch plan and its policy
        decision (``POST /v1/launches?dry_run=true``; no pod, no Secret, nothing read
        from Vault, audited as a dry run), show both in the task log, push the plan as
        XCom ``dry_run`` and return it. A denial fails the task (without retry) after
        the plan is shown, so a CI run of the DAG catches it.

    Reattaching: the launch is idempotent per task instance *try*. The same try started
    again (a resumed deferral, a restarted ``airflow tasks run``) gets the existing launch
    back and follows it. A new try never reattaches to an earlier try's pod: the broker
    ends that pod (and revokes its secrets) when the newer try launches.
    """

    template_fields: Sequence[str] = (
        "image",
        "cmds",
        "arguments",
        "env_vars",
        "pod_template",
        "namespace",
        "container_resources",
        "labels",
        "annotations",
        "node_selector",
    )
    template_fields_renderers = {
        "cmds": "py",
        "arguments": "py",
        "env_vars": "json",
        "container_resources": "json",
        "labels": "json",
        "annotations": "json",
        "node_selector": "json",
    }
    operator_extra_links = (BrokerLaunchLink(),)
    ui_color = "#d7eef4"

    def __init__(
        self,
        *,
        image: str,
        cmds: list[str] | None = None,
        arguments: list[str] | None = None,
        env_vars: Mapping[str, str] | Sequence[Any] | None = None,
        secrets: Sequence[SecretSpec] | None = None,
        pod_template: str | None = None,
        namespace: str | None = None,
        service_account_name: str | None = None,
        container_resources: Mapping[str, Any] | ResourceRequirements | Any | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        node_selector: Mapping[str, str] | None = None,
        tolerations: Sequence[Toleration | Mapping[str, Any] | Any] | None = None,
        affinity: Mapping[str, Any] | Any | None = None,
        startup_timeout_seconds: int = 120,
        schedule_timeout_seconds: int | None = None,
        get_logs: bool = True,
        do_xcom_push: bool = False,
        skip_on_exit_code: int | Collection[int] | None = None,
        on_finish_action: OnFinishAction = "delete_pod",
        on_kill_action: OnKillAction = "delete_pod",
        termination_grace_period: int | None = None,
        deferrable: bool | None = None,
        poll_interval: float = 2.0,
        logging_interval: int | None = None,
        launch_timeout_seconds: int | None = None,
        broker_unavailable_timeout_seconds: float = DEFAULT_UNAVAILABLE_TIMEOUT_SECONDS,
        podbroker_conn_id: str = DEFAULT_CONN_ID,
        dry_run: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(do_xcom_push=do_xcom_push, **kwargs)
        if on_finish_action not in _ON_FINISH_ACTIONS:
            raise ValueError(
                f"on_finish_action must be one of {', '.join(_ON_FINISH_ACTIONS)}, "
                f"not {on_finish_action!r}"
            )
        if on_kill_action not in ON_KILL_ACTIONS:
            raise ValueError(
                f"on_kill_action must be one of {', '.join(ON_KILL_ACTIONS)}, "
                f"not {on_kill_action!r}"
            )
        if poll_interval <= 0 or startup_timeout_seconds <= 0:
            raise ValueError("poll_interval and startup_timeout_seconds must be positive")
        if schedule_timeout_seconds is not None and schedule_timeout_seconds <= 0:
            raise ValueError("schedule_timeout_seconds must be positive")
        if logging_interval is not None and logging_interval <= 0:
            raise ValueError("logging_interval must be positive")
        if broker_unavailable_timeout_seconds < 0:
            raise ValueError("broker_unavailable_timeout_seconds must not be negative")
        if termination_grace_period is not None and not (
            0 <= termination_grace_period <= MAX_GRACE_SECONDS
        ):
            raise ValueError(
                f"termination_grace_period must be between 0 and {MAX_GRACE_SECONDS} seconds"
            )
        self.image = image
        self.cmds = list(cmds or [])
        self.arguments = list(arguments or [])
        # A dict from here on, so Airflow renders the values of list-style env vars too.
        self.env_vars: dict[str, str] = env_dict(env_vars)
        # Parsed now: a malformed secret list breaks DAG parsing, not the pod start.
        self.secret_requests: tuple[SecretRequest, ...] = parse_secrets(secrets)
        self.pod_template = pod_template
        self.namespace = namespace
        self.service_account_name = service_account_name
        # A plain dict, so requests and limits are templated whatever the input type.
        self.container_resources: dict[str, Any] = resources(container_resources).model_dump()
        self.labels = dict(labels or {})
        self.annotations = dict(annotations or {})
        self.node_selector = dict(node_selector or {})
        self.tolerations = tolerations_of(tolerations)
        self.affinity = affinity_dict(affinity)
        if self.affinity is not None and _AFFINITY_FIELD not in Scheduling.model_fields:
            raise ValueError(
                "affinity is not supported by this podbroker version yet; use node_selector "
                "and tolerations, or a pod_template defined by the platform team"
            )
        self.startup_timeout_seconds = startup_timeout_seconds
        self.schedule_timeout_seconds = schedule_timeout_seconds or startup_timeout_seconds
        self.get_logs = get_logs
        self.skip_on_exit_code = _exit_codes(skip_on_exit_code)
        self.on_finish_action: OnFinishAction = on_finish_action
        self.on_kill_action: OnKillAction = on_kill_action
        self.termination_grace_period = termination_grace_period
        self.deferrable = (
            deferrable
            if deferrable is not None
            else conf.getboolean("operators", "default_deferrable", fallback=False)
        )
        self.poll_interval = poll_interval
        self.logging_interval = logging_interval
        self.launch_timeout_seconds = launch_timeout_seconds
        self.broker_unavailable_timeout_seconds = broker_unavailable_timeout_seconds
        self.podbroker_conn_id = podbroker_conn_id
        # Not `self.dry_run`: that is BaseOperator's method (render the templates only).
        self.plan_only = dry_run
        self._launch_id: str | None = None
        # The launch this try deleted, so a failing try does not delete it twice.
        self._deleted_launch: str | None = None

    @property
    def secret_names(self) -> list[str]:
        """The secret names this task declares (what ``check-dags`` checks)."""
        return [r.name for r in self.secret_requests]

    @cached_property
    def hook(self) -> BrokerHook:
        return BrokerHook(podbroker_conn_id=self.podbroker_conn_id)

    def deadline(self) -> tuple[int, str]:
        """Seconds after which the broker stops the pod, and where that number comes from."""
        execution_timeout = (
            self.execution_timeout.total_seconds() if self.execution_timeout is not None else None
        )
        return _deadline(self.launch_timeout_seconds, execution_timeout)

    # -- request -----------------------------------------------------------------

    def build_request(self, context: Context) -> LaunchRequest:
        """The LaunchRequest for this task instance (names of secrets, never values)."""
        ti = context["ti"]
        map_index = getattr(ti, "map_index", -1)
        scheduling: dict[str, Any] = {
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "node_selector": dict(self.node_selector),
            "tolerations": list(self.tolerations),
        }
        if self.affinity is not None:
            scheduling[_AFFINITY_FIELD] = self.affinity
        try:
            return LaunchRequest(
                task=TaskIdentity(
                    dag_id=ti.dag_id,
                    task_id=ti.task_id,
                    run_id=ti.run_id,
                    try_number=ti.try_number,
                    map_index=-1 if map_index is None else map_index,
                    # The broker checks this id with Airflow's API (task verification).
                    ti_id=str(ti_id) if (ti_id := getattr(ti, "id", None)) else None,
                ),
                container=ContainerSpec(
                    image=self.image,
                    command=[str(c) for c in self.cmds],
                    args=[str(a) for a in self.arguments],
                    env=env_dict(self.env_vars),
                    resources=resources(self.container_resources),
                ),
                secrets=list(self.secret_requests),
                scheduling=Scheduling.model_validate(scheduling),
                namespace=self.namespace or self.hook.settings.namespace,
                service_account=self.service_account_name,
                pod_template=self.pod_template,
                timeout_seconds=self.deadline()[0],
                termination_grace_period_seconds=self.termination_grace_period,
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise AirflowFailException(f"invalid BrokerPodOperator arguments: {problems}") from None
        except ValueError as exc:
            raise AirflowFailException(f"invalid BrokerPodOperator arguments: {exc}") from None

    # -- execution ---------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        with broker_errors("the connection"):
            request = self.build_request(context)
        if self.plan_only:
            return self._dry_run(request, context)
        with self.hook.get_conn() as client:
            view = self._launch(client, request)
            self._launch_id = view.launch_id
            context["ti"].xcom_push(key="launch_id", value=view.launch_id)
            context["ti"].xcom_push(key="pod_name", value=view.pod_name)
            if view.created:
                self.log.info(
                    "launched pod %s/%s (launch %s) with secrets: %s",
                    view.namespace,
                    view.pod_name,
                    view.launch_id,
                    ", ".join(self.secret_names) or "none",
                )
            else:
                self.log.info(
                    "reattached to existing launch %s of this try (pod %s/%s, phase %s)",
                    view.launch_id,
                    view.namespace,
                    view.pod_name,
                    view.phase,
                )
            self.log.info(
                "the broker stops pod %s after %ss (%s)",
                view.pod_name,
                request.timeout_seconds,
                self.deadline()[1],
            )
            if self.deferrable and view.phase not in TERMINAL_PHASES:
                self._defer(view.launch_id, started_at=time.time(), last_log_ns=None)
            watcher = self._watcher(client)
            try:
                with broker_errors("reading the launch status"):
                    try:
                        view = watcher.wait_for_start(
                            view,
                            startup_timeout=self.startup_timeout_seconds,
                            schedule_timeout=self.schedule_timeout_seconds,
                        )
                    except StartupFailedError as exc:
                        self._kill_quietly(client, view.launch_id, exc.failure.kind)
                        raise AirflowException(f"{exc.failure.message}; deleted") from None
                    if self.get_logs:
                        watcher.follow_logs(view)
                    view = watcher.wait_for_end(view)
            except Exception:
                # The pod may still run: delete it before this try fails, or the retry
                # (a new try_number, a new launch) runs beside it with its secrets.
                self._abandon(client, view.launch_id, "task_failed")
                raise
            return self._finish(client, view)

    def _dry_run(self, request: LaunchRequest, context: Context) -> dict[str, Any]:
        """Plan and decide only (``dry_run=True``): log the plan and the decision, push
        the plan as XCom ``dry_run``, fail on a denial. The plan holds names, Vault paths
        and Secret references, never a value."""
        action = f"planning {request.task.dag_id}.{request.task.task_id} (dry run)"
        with self.hook.get_conn() as client, broker_errors(action):
            plan = client.dry_run(request)
        self._log_plan(plan)
        value = plan.model_dump(mode="json")
        context["ti"].xcom_push(key="dry_run", value=value)
        decision = plan.decision
        if not decision.allowed:
            names = ", ".join([*decision.denied, *decision.unknown]) or "(unnamed)"
            reasons = "; ".join(decision.reasons) or "no grant matches"
            raise AirflowFailException(
                f"dry run: podbroker would deny this launch: secrets not granted: {names}. "
                f"{reasons}"
            )
        return value

    def _log_plan(self, plan: LaunchDryRun) -> None:
        decision = plan.decision
        self.log.info(
            "dry run: nothing launched. Launch %s would run pod %s/%s with Secret %s",
            plan.launch_id,
            plan.namespace,
            plan.pod_name,
            plan.secret_name,
        )
        self.log.info(
            "dry run: policy decision: %s; matched grants: %s; denied: %s; unknown: %s%s",
            "allowed" if decision.allowed else "DENIED",
            ", ".join(decision.matched_grants) or "none",
            ", ".join(decision.denied) or "none",
            ", ".join(decision.unknown) or "none",
            f"; reasons: {'; '.join(decision.reasons)}" if decision.reasons else "",
        )
        if decision.requires_verified_task:
            self.log.info(
                "dry run: a grant needs the task instance confirmed with Airflow "
                "(not asked in a dry run)"
            )
        for read in plan.vault_reads:
            self.log.info(
                "dry run: would read %s (%s) at %s under grant %s",
                read.name,
                read.kind,
                read.path,
                read.grant,
            )
        if plan.token is not None:
            self.log.info(
                "dry run: child token with policies %s, ttl %ss, %s uses",
                ", ".join(plan.token.policies),
                plan.token.ttl_seconds,
                plan.token.num_uses,
            )
        if not plan.secret_keys_known:
            self.log.info("dry run: secret keys are learnt at launch: the pod shows no secret env")
        self.log.info("dry run: pod manifest:\n%s", json.dumps(plan.pod, indent=2, sort_keys=True))

    def _defer(self, launch_id: str, *, started_at: float, last_log_ns: int | None) -> None:
        self.defer(
            trigger=BrokerLaunchTrigger(
                launch_id=launch_id,
                podbroker_conn_id=self.podbroker_conn_id,
                poll_interval=self.poll_interval,
                startup_timeout_seconds=self.startup_timeout_seconds,
                started_at=started_at,
                broker_unavailable_timeout_seconds=self.broker_unavailable_timeout_seconds,
                schedule_timeout_seconds=self.schedule_timeout_seconds,
                logging_interval=self.logging_interval if self.get_logs else None,
                last_log_ns=last_log_ns,
                on_kill_action=self.on_kill_action,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        """Resume after the trigger: on ``running`` (``logging_interval``) copy the new
        log lines and defer again; at the end fetch the log, apply on_finish_action,
        skip or raise on failure, and return the result when ``do_xcom_push``."""
        launch_id = str(event.get("launch_id"))
        self._launch_id = launch_id
        status = event.get("status")
        if status == "error":
            message = f"podbroker trigger failed for launch {launch_id}: {event.get('message')}"
            # The pod may still run: delete it before failing the try (see execute).
            try:
                with self.hook.get_conn() as client:
                    self._abandon(client, launch_id, "trigger_error")
            except Exception as exc:  # never hide the trigger's error behind this one
                self.log.warning("could not delete launch %s: %s", launch_id, exc)
            if event.get("retryable"):
                raise AirflowException(message)
            raise AirflowFailException(message)
        with self.hook.get_conn() as client:
            if status in ("startup_failed", "startup_timeout"):
                kind = str(event.get("kind") or "startup_timeout")
                self._kill_quietly(client, launch_id, kind)
                message = event.get("message") or (
                    f"pod of launch {launch_id} still Pending after {self.startup_timeout_seconds}s"
                )
                raise AirflowException(f"{message}; deleted")
            watcher = self._watcher(client)
            last_log_ns = event.get("last_log_ns")
            watcher.last_log_ns = int(last_log_ns) if last_log_ns is not None else None
            if status == "running":
                try:
                    with broker_errors("reading the launch status"):
                        view = watcher.status(launch_id)
                        if self.get_logs:
                            watcher.read_new_logs(view)
                except Exception:
                    self._abandon(client, launch_id, "task_failed")
                    raise
                if view.phase not in TERMINAL_PHASES:
                    started_at = event.get("started_at")
                    self._defer(
                        launch_id,
                        started_at=float(started_at) if started_at is not None else time.time(),
                        last_log_ns=watcher.last_log_ns,
                    )
                return self._finish(client, view)
            # The trigger saw the pod end: nothing left to delete if this read fails.
            with broker_errors("reading the launch status"):
                view = watcher.status(launch_id)
            if self.get_logs:
                if watcher.last_log_ns is None:
                    watcher.copy_logs(view)
                else:
                    watcher.read_new_logs(view)
            return self._finish(client, view)

    def on_kill(self) -> None:
        """Airflow killed the task: kill the launch (the broker deletes pod and Secret),
        unless ``on_kill_action="keep_pod"``. While deferred, the trigger's on_kill does
        the same."""
        if not self._launch_id:
            return
        if self.on_kill_action == "keep_pod":
            self.log.info("task killed: keeping launch %s (on_kill_action)", self._launch_id)
            return
        self.log.info("task killed: deleting launch %s", self._launch_id)
        with self.hook.get_conn() as client:
            self._kill_quietly(client, self._launch_id, "on_kill")

    # -- steps -------------------------------------------------------------------

    def _launch(self, client: BrokerClient, request: LaunchRequest) -> LaunchView:
        """POST the launch; while the broker is unavailable retry in-process, as status
        polls do, for ``broker_unavailable_timeout_seconds`` (the POST is idempotent per
        task identity, so a lost response cannot start a second pod). This rides out a
        broker restart, and the wait after a broker died mid-launch until its sweep has
        given back what that attempt held."""
        action = f"launching {request.task.dag_id}.{request.task.task_id}"
        outage = Outage(self.broker_unavailable_timeout_seconds)
        while True:
            try:
                return client.launch(request)
            except TemporaryError as exc:
                delay = outage.next_delay(exc.retry_after)
                if delay is None:
                    with broker_errors(action):
                        raise
                self.log.warning("broker unavailable (%s); retrying in %.0fs", exc.reason, delay)
                time.sleep(delay)
            except BrokerError:
                with broker_errors(action):
                    raise

    def _watcher(self, client: BrokerClient) -> LaunchWatcher:
        """Status polls ride out outages for ``broker_unavailable_timeout_seconds``; the
        pod's lines and warnings go to the task log."""
        return LaunchWatcher(
            client,
            poll_interval=self.poll_interval,
            unavailable_timeout=self.broker_unavailable_timeout_seconds,
            log=self.log,
        )

    def _kill_quietly(self, client: BrokerClient, launch_id: str, reason: str) -> None:
        """DELETE /v1/launches/{id}?reason=...; a failure is only logged."""
        try:
            client.kill(launch_id, reason=reason)
        except BrokerError as exc:
            # The broker's reconciler deletes it at launch timeout anyway.
            self.log.warning("could not delete launch %s: %s", launch_id, exc.reason)
            return
        self._deleted_launch = launch_id

    def _abandon(self, client: BrokerClient, launch_id: str, reason: str) -> None:
        """This try is failing while its pod may still run: DELETE the launch unless
        already done (startup timeout). Best effort: never raises, so the try's own
        error is the one Airflow records."""
        if self._deleted_launch == launch_id:
            return
        self.log.warning("deleting launch %s before failing the try", launch_id)
        try:
            self._kill_quietly(client, launch_id, reason)
        except Exception as exc:
            self.log.warning("could not delete launch %s: %s", launch_id, exc)

    def _finish(self, client: BrokerClient, view: LaunchView) -> Any:
        """Apply on_finish_action, then: the result (``do_xcom_push``) of a succeeded
        pod, AirflowSkipException for an exit code in ``skip_on_exit_code``, or the
        failure."""
        succeeded = view.phase == "Succeeded"
        if succeeded and self.do_xcom_push:
            # Before on_finish_action: the verdict is written on the pod.
            with broker_errors("reading the launch status"):
                view = self._watcher(client).wait_for_result_check(
                    view, timeout=RESULT_CHECK_TIMEOUT_SECONDS
                )
        if view.phase != "Deleted" and (
            self.on_finish_action == "delete_pod"
            or (self.on_finish_action == "delete_succeeded_pod" and succeeded)
        ):
            self._kill_quietly(client, view.launch_id, "on_finish_action")
        if view.exit_code is not None and view.exit_code in self.skip_on_exit_code:
            raise AirflowSkipException(
                f"pod {view.pod_name} exited with code {view.exit_code} (skip_on_exit_code)"
            )
        if succeeded:
            self.log.info("pod %s succeeded", view.pod_name)
            return self._result(view) if self.do_xcom_push else None
        if view.phase == "Deleted":
            raise AirflowException(f"launch {view.launch_id} was deleted before the pod finished")
        raise AirflowException(
            f"pod {view.pod_name} ended {view.phase} with exit code {view.exit_code}: "
            f"{view.reason or 'no reason given'}"
        )

    def _result(self, view: LaunchView) -> Any:
        """The termination message for XCom ``return_value`` (see airflow_plugin.result);
        None, so nothing is pushed, when the task wrote none. The value is not logged."""
        try:
            value = task_result(view)
        except (ResultTooLargeError, ResultWithheldError) as exc:
            raise AirflowFailException(str(exc)) from None
        except ResultUncheckedError as exc:
            raise AirflowException(f"{exc} (retryable)") from None
        if value is None:
            self.log.info("the task wrote no termination message: no return_value pushed")
        else:
            self.log.info("returning the task's termination message as return_value")
        return value
