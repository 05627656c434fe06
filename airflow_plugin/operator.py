"""BrokerPodOperator: runs one container in a Kubernetes pod launched by the podbroker
service, with secrets named by the DAG author and delivered by the broker straight into
the pod. The worker sends names, receives status and log lines: never a secret value.

Parameters mirror KubernetesPodOperator where they overlap (image, cmds, arguments,
env_vars, container_resources, labels, annotations, node_selector, tolerations,
startup_timeout_seconds, get_logs, on_finish_action, deferrable, poll_interval)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any, Literal

from airflow.sdk import BaseOperator, Context, conf
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from pydantic import ValidationError

from airflow_plugin.client import TERMINAL_PHASES, BrokerClient
from airflow_plugin.hook import BrokerHook
from airflow_plugin.launch_watch import LaunchWatcher, OutageTimeoutError
from airflow_plugin.retry import DEFAULT_UNAVAILABLE_TIMEOUT_SECONDS
from airflow_plugin.secrets import SecretSpec, parse_secrets
from airflow_plugin.settings import DEFAULT_CONN_ID, ConnectionConfigError
from airflow_plugin.trigger import BrokerLaunchTrigger
from broker.core.api_models import (
    ContainerSpec,
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
_LAUNCH_ATTEMPTS = 3


def _env_dict(env_vars: Mapping[str, Any] | Sequence[Any] | None) -> dict[str, str]:
    """Accept a dict or KPO-style ``[{"name": ..., "value": ...}]`` / V1EnvVar-like items."""
    if env_vars is None:
        return {}
    if isinstance(env_vars, Mapping):
        return {str(k): str(v) for k, v in env_vars.items()}
    result: dict[str, str] = {}
    for item in env_vars:
        name = item["name"] if isinstance(item, Mapping) else item.name
        value = item.get("value", "") if isinstance(item, Mapping) else item.value
        result[str(name)] = "" if value is None else str(value)
    return result


def _camel_to_snake(data: Mapping[str, Any]) -> dict[str, Any]:
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower(): v for k, v in data.items()}


def _resources(
    value: ResourceRequirements | Mapping[str, Any] | Any | None,
) -> ResourceRequirements:
    if value is None:
        return ResourceRequirements()
    if isinstance(value, ResourceRequirements):
        return value
    if not isinstance(value, Mapping):  # kubernetes V1ResourceRequirements-like
        value = {
            "requests": getattr(value, "requests", None),
            "limits": getattr(value, "limits", None),
        }
    return ResourceRequirements(
        requests={k: str(v) for k, v in (value.get("requests") or {}).items()},
        limits={k: str(v) for k, v in (value.get("limits") or {}).items()},
    )


def _tolerations(values: Sequence[Toleration | Mapping[str, Any]] | None) -> list[Toleration]:
    return [
        t if isinstance(t, Toleration) else Toleration.model_validate(_camel_to_snake(t))
        for t in values or ()
    ]


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
    :param env_vars: non-secret environment, dict or ``[{"name", "value"}]``, templated.
    :param secrets: secret names (``["warehouse-db"]``) or delivery objects from
        :func:`airflow_plugin.secrets.env_secret` / :func:`file_secret` (or their dicts).
    :param pod_template: a platform-defined template name known to the broker, templated.
    :param namespace: pod namespace (default: the connection's, else the broker's).
    :param service_account_name: pod ServiceAccount (the broker checks it is allowed).
    :param container_resources: ``{"requests": {...}, "limits": {...}}``, templated.
    :param labels, annotations, node_selector: templated dicts.
    :param tolerations: list of dicts (KPO camelCase keys accepted) or Toleration.
    :param startup_timeout_seconds: fail (retryable) if the pod is still Pending after this.
    :param get_logs: copy the pod's log into the task log.
    :param on_finish_action: delete_pod | delete_succeeded_pod | keep_pod.
    :param deferrable: free the worker slot while the pod runs (async trigger polls).
    :param poll_interval: seconds between status polls.
    :param launch_timeout_seconds: the broker stops the pod after this (default:
        ``execution_timeout`` if set, else one hour).
    :param broker_unavailable_timeout_seconds: while the pod runs, keep retrying status
        polls and log reconnects that find the broker unavailable (503, connection
        errors, a 401 during token rotation) with capped exponential backoff for this long
        before failing the try (0: fail at once). A try that fails after its launch was
        created deletes the launch first, so a retry never runs beside an orphaned pod.
    :param podbroker_conn_id: the ``podbroker`` connection.
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
    template_fields_renderers = {"env_vars": "json", "labels": "json", "annotations": "json"}
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
        container_resources: Mapping[str, Any] | ResourceRequirements | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        node_selector: Mapping[str, str] | None = None,
        tolerations: Sequence[Toleration | Mapping[str, Any]] | None = None,
        startup_timeout_seconds: int = 120,
        get_logs: bool = True,
        on_finish_action: OnFinishAction = "delete_pod",
        deferrable: bool | None = None,
        poll_interval: float = 2.0,
        launch_timeout_seconds: int | None = None,
        broker_unavailable_timeout_seconds: float = DEFAULT_UNAVAILABLE_TIMEOUT_SECONDS,
        podbroker_conn_id: str = DEFAULT_CONN_ID,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if on_finish_action not in _ON_FINISH_ACTIONS:
            raise ValueError(
                f"on_finish_action must be one of {', '.join(_ON_FINISH_ACTIONS)}, "
                f"not {on_finish_action!r}"
            )
        if poll_interval <= 0 or startup_timeout_seconds <= 0:
            raise ValueError("poll_interval and startup_timeout_seconds must be positive")
        if broker_unavailable_timeout_seconds < 0:
            raise ValueError("broker_unavailable_timeout_seconds must not be negative")
        self.image = image
        self.cmds = list(cmds or [])
        self.arguments = list(arguments or [])
        self.env_vars = env_vars if env_vars is not None else {}
        # Parsed now: a malformed secret list breaks DAG parsing, not the pod start.
        self.secret_requests: tuple[SecretRequest, ...] = parse_secrets(secrets)
        self.pod_template = pod_template
        self.namespace = namespace
        self.service_account_name = service_account_name
        self.container_resources = container_resources
        self.labels = dict(labels or {})
        self.annotations = dict(annotations or {})
        self.node_selector = dict(node_selector or {})
        self.tolerations = _tolerations(tolerations)
        self.startup_timeout_seconds = startup_timeout_seconds
        self.get_logs = get_logs
        self.on_finish_action: OnFinishAction = on_finish_action
        self.deferrable = (
            deferrable
            if deferrable is not None
            else conf.getboolean("operators", "default_deferrable", fallback=False)
        )
        self.poll_interval = poll_interval
        self.launch_timeout_seconds = launch_timeout_seconds
        self.broker_unavailable_timeout_seconds = broker_unavailable_timeout_seconds
        self.podbroker_conn_id = podbroker_conn_id
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

    # -- request -----------------------------------------------------------------

    def build_request(self, context: Context) -> LaunchRequest:
        """The LaunchRequest for this task instance (names of secrets, never values)."""
        ti = context["ti"]
        map_index = getattr(ti, "map_index", -1)
        timeout = self.launch_timeout_seconds
        if timeout is None and self.execution_timeout is not None:
            timeout = max(1, math.ceil(self.execution_timeout.total_seconds()))
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
                    env=_env_dict(self.env_vars),
                    resources=_resources(self.container_resources),
                ),
                secrets=list(self.secret_requests),
                scheduling=Scheduling(
                    labels=dict(self.labels),
                    annotations=dict(self.annotations),
                    node_selector=dict(self.node_selector),
                    tolerations=list(self.tolerations),
                ),
                namespace=self.namespace or self.hook.settings.namespace,
                service_account=self.service_account_name,
                pod_template=self.pod_template,
                timeout_seconds=timeout or 3600,
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
            )
            raise AirflowFailException(f"invalid BrokerPodOperator arguments: {problems}") from None

    # -- execution ---------------------------------------------------------------

    def execute(self, context: Context) -> None:
        with broker_errors("the connection"):
            request = self.build_request(context)
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
                    "reattached to existing launch %s (pod %s/%s, phase %s)",
                    view.launch_id,
                    view.namespace,
                    view.pod_name,
                    view.phase,
                )
            if self.deferrable and view.phase not in TERMINAL_PHASES:
                self.defer(
                    trigger=BrokerLaunchTrigger(
                        launch_id=view.launch_id,
                        podbroker_conn_id=self.podbroker_conn_id,
                        poll_interval=self.poll_interval,
                        startup_timeout_seconds=self.startup_timeout_seconds,
                        started_at=time.time(),
                        broker_unavailable_timeout_seconds=self.broker_unavailable_timeout_seconds,
                    ),
                    method_name="execute_complete",
                )
            watcher = self._watcher(client)
            try:
                with broker_errors("reading the launch status"):
                    view = watcher.wait_for_start(view, self.startup_timeout_seconds)
                    if view.phase == "Pending":
                        self._kill_quietly(client, view.launch_id, "startup_timeout")
                        raise AirflowException(
                            f"pod {view.pod_name} still Pending after "
                            f"{self.startup_timeout_seconds}s "
                            f"({view.reason or 'no reason given'}); killed"
                        )
                    if self.get_logs:
                        watcher.follow_logs(view)
                    view = watcher.wait_for_end(view)
            except Exception:
                # The pod may still run: delete it before this try fails, or the retry
                # (a new try_number, a new launch) runs beside it with its secrets.
                self._abandon(client, view.launch_id, "task_failed")
                raise
            self._finish(client, view)

    def execute_complete(self, context: Context, event: dict[str, Any]) -> None:
        """Resume after the trigger: fetch the log, apply on_finish_action, raise on failure."""
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
            if status == "startup_timeout":
                self._kill_quietly(client, launch_id, "startup_timeout")
                raise AirflowException(
                    f"pod of launch {launch_id} still Pending after "
                    f"{self.startup_timeout_seconds}s; killed"
                )
            # The trigger saw the pod end: nothing left to delete if this read fails.
            watcher = self._watcher(client)
            with broker_errors("reading the launch status"):
                view = watcher.status(launch_id)
            if self.get_logs:
                watcher.copy_logs(view)
            self._finish(client, view)

    def on_kill(self) -> None:
        """Airflow killed the task: kill the launch (the broker deletes pod and Secret)."""
        if not self._launch_id:
            return
        self.log.info("task killed: deleting launch %s", self._launch_id)
        with self.hook.get_conn() as client:
            self._kill_quietly(client, self._launch_id, "on_kill")

    # -- steps -------------------------------------------------------------------

    def _launch(self, client: BrokerClient, request: LaunchRequest) -> LaunchView:
        """POST the launch; on unavailability retry in-process (the POST is idempotent per
        task identity, so a lost response cannot start a second pod)."""
        action = f"launching {request.task.dag_id}.{request.task.task_id}"
        for attempt in range(1, _LAUNCH_ATTEMPTS + 1):
            try:
                return client.launch(request)
            except TemporaryError as exc:
                if attempt == _LAUNCH_ATTEMPTS:
                    with broker_errors(action):
                        raise
                delay = min(exc.retry_after, 10)
                self.log.warning("broker unavailable (%s); retrying in %ss", exc.reason, delay)
                time.sleep(delay)
            except BrokerError:
                with broker_errors(action):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

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

    def _finish(self, client: BrokerClient, view: LaunchView) -> None:
        succeeded = view.phase == "Succeeded"
        if view.phase != "Deleted" and (
            self.on_finish_action == "delete_pod"
            or (self.on_finish_action == "delete_succeeded_pod" and succeeded)
        ):
            self._kill_quietly(client, view.launch_id, "on_finish_action")
        if succeeded:
            self.log.info("pod %s succeeded", view.pod_name)
            return
        if view.phase == "Deleted":
            raise AirflowException(f"launch {view.launch_id} was deleted before the pod finished")
        raise AirflowException(
            f"pod {view.pod_name} ended {view.phase} with exit code {view.exit_code}: "
            f"{view.reason or 'no reason given'}"
        )
