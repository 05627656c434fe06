"""The broker's one seam to Kubernetes. Every call goes through here and every
kubernetes-client exception is translated into broker.errors on the way out."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from broker.core import podmeta
from broker.core.api_models import PodEvent
from broker.core.objects import ContainerStatus, PodInfo, PodRef, ReviewedToken, SecretMeta
from broker.core.pending import pod_event, recent_events
from broker.core.plan import secret_name_for
from broker.core.secret_value import SecretValue
from broker.errors import (
    BrokerError,
    ConflictError,
    KubernetesUnavailableError,
    NotFoundError,
    error_for_api_server_status,
)
from broker.metrics import KUBERNETES_LATENCY

T = TypeVar("T")
# Ask the API server for metadata only (no Secret data on the wire).
_PARTIAL_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
_PARTIAL_METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


def _container_status(item: Mapping[str, Any]) -> ContainerStatus:
    name = str(item.get("name", ""))
    state = item.get("state") or {}
    if done := state.get("terminated"):
        return ContainerStatus(
            name, "terminated", done.get("exitCode"), done.get("reason"), done.get("message")
        )
    if state.get("running") is not None:
        return ContainerStatus(name, "running")
    if (waiting := state.get("waiting")) is not None:
        return ContainerStatus(
            name, "waiting", reason=waiting.get("reason"), message=waiting.get("message")
        )
    return ContainerStatus(name, "unknown")


def pod_info(pod: Mapping[str, Any]) -> PodInfo:
    """The broker's view of a pod from its JSON as the API server sent it. Parsed from
    the JSON directly: the client's model classes cost ~1.5 ms of CPU per pod, paid on
    every create, claim, delete and watch event of every launch."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    spec = pod.get("spec") or {}
    scheduled = next(
        (c for c in status.get("conditions") or () if c.get("type") == "PodScheduled"), None
    )
    created = meta.get("creationTimestamp")
    unschedulable = None
    if scheduled and (scheduled.get("status"), scheduled.get("reason")) == (
        "False",
        "Unschedulable",
    ):
        unschedulable = scheduled.get("message") or "unschedulable"
    return PodInfo(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=meta.get("uid") or "",
        resource_version=meta.get("resourceVersion") or "",
        labels=dict(meta.get("labels") or {}),
        annotations=dict(meta.get("annotations") or {}),
        phase=status.get("phase"),
        reason=status.get("reason"),
        containers=tuple(_container_status(item) for item in status.get("containerStatuses") or ()),
        created_at=_stamp(created),
        deleting=meta.get("deletionTimestamp") is not None,
        active_deadline_seconds=spec.get("activeDeadlineSeconds"),
        scheduled=scheduled is not None and scheduled.get("status") == "True",
        unschedulable=unschedulable,
    )


def _json(response: Any) -> Any:
    """The body of a ``_preload_content=False`` response; its connection goes back to
    the pool (an unread response would keep it, and the next call would open another)."""
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def _drain(response: Any) -> bool:
    """Read and release a response whose body is not needed; True: it was answered."""
    try:
        _ = response.data
    finally:
        response.release_conn()
    return True


def _stamp(text: object) -> dt.datetime | None:
    return podmeta.parse_stamp(text) if isinstance(text, str) and text else None


def _event(item: Mapping[str, Any]) -> PodEvent:
    series = item.get("series") or {}
    return pod_event(
        type=item.get("type"),
        reason=item.get("reason"),
        message=item.get("message"),
        count=item.get("count") or series.get("count"),
        last_seen=_stamp(item.get("lastTimestamp"))
        or _stamp(series.get("lastObservedTime"))
        or _stamp(item.get("eventTime"))
        or _stamp(item.get("firstTimestamp")),
    )


def _secret_meta(namespace: str, metadata: dict[str, Any]) -> SecretMeta:
    created = metadata.get("creationTimestamp")
    return SecretMeta(
        namespace=metadata.get("namespace") or namespace,
        name=str(metadata.get("name")),
        labels=dict(metadata.get("labels") or {}),
        annotations=dict(metadata.get("annotations") or {}),
        created_at=_stamp(created),
    )


# urllib3's default retries a timed-out GET three more times, which turns a 10 s read
# timeout into 40 s against a hung API server. Retry only a failed connect (nothing was
# sent), once; every other failure reaches the caller as retryable at once.
API_CONNECTIONS = 64

_RETRIES = urllib3.Retry(total=1, connect=1, read=0, status=0, other=0, redirect=0)


def load_api_client(kubeconfig: str | None) -> client.ApiClient:
    """The admin-free client the broker runs with: its in-cluster ServiceAccount, or a
    kubeconfig (tests and development point this at the broker's own SA token)."""
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        config.load_incluster_config(client_configuration=configuration)
    configuration.retries = _RETRIES
    # One connection per concurrent launch call (the default, 5 x cores, made launches
    # of a burst open and close TLS connections).
    configuration.connection_pool_maxsize = API_CONNECTIONS
    return client.ApiClient(configuration)


_POD = "/api/v1/namespaces/{namespace}/pods/{name}"
_PODS = "/api/v1/namespaces/{namespace}/pods"
_POD_LOG = "/api/v1/namespaces/{namespace}/pods/{name}/log"
_SECRET = "/api/v1/namespaces/{namespace}/secrets/{name}"
_SECRETS = "/api/v1/namespaces/{namespace}/secrets"
_EVENTS = "/api/v1/namespaces/{namespace}/events"
_TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
_JSON = "application/json"
_MERGE_PATCH = "application/merge-patch+json"


class KubeCluster:
    """Every call is bounded: ``connect_timeout`` to reach the API server (TCP and TLS),
    ``timeout`` to wait for each read of its answer. A followed log stream waits up to
    ``follow_idle_timeout`` for its next line and then ends (the caller follows again
    from its last timestamp); the watch is bounded a little past its server-side
    timeout. A hung API server therefore costs a caller seconds, not a worker thread.

    Requests go through the client's ``ApiClient`` (its configuration, credentials, TLS
    and connection pool) but not its generated API classes: importing ``CoreV1Api``
    alone costs about 80 MB of memory, two thirds of an idle broker's."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        follow_idle_timeout: float = 60.0,
    ) -> None:
        self.api = api
        self.timeout: tuple[float, float] = (min(connect_timeout, timeout), timeout)
        self.follow_timeout: tuple[float, float] = (self.timeout[0], follow_idle_timeout)

    def _open(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        query: Mapping[str, object] | None = None,
        body: object = None,
        accept: str = _JSON,
        content_type: str | None = None,
        timeout: tuple[float, float] | None = None,
    ) -> Any:
        """One request; the raw urllib3 response, to be read with :func:`_json` or
        :func:`_drain` (or streamed). A non-2xx answer raises ApiException."""
        headers = {"Accept": accept}
        if content_type is not None:
            headers["Content-Type"] = content_type
        request = self.api.param_serialize(
            method,
            path,
            path_params=dict(params or {}),
            query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*request, _request_timeout=timeout or self.timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response

    def _call(self, verb: str, fn: Callable[[], T], *, what: str) -> T:
        started = time.perf_counter()
        try:
            return fn()
        except ApiException as exc:
            raise _translate(exc, what) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubernetesUnavailableError(
                f"Kubernetes API unreachable during {what}: {type(exc).__name__}"
            ) from exc
        finally:
            KUBERNETES_LATENCY.labels(verb).observe(time.perf_counter() - started)

    def _send(
        self,
        verb: str,
        what: str,
        method: str,
        path: str,
        *,
        read: Callable[[Any], T],
        **request: Any,
    ) -> T:
        """One request (:meth:`_open`) under :meth:`_call`, its answer read by ``read``:
        :func:`_json`, :func:`_drain`, or kept raw to be streamed."""
        return self._call(verb, lambda: read(self._open(method, path, **request)), what=what)

    def _send_if_found(
        self,
        verb: str,
        what: str,
        method: str,
        path: str,
        *,
        read: Callable[[Any], T],
        **request: Any,
    ) -> T | None:
        """:meth:`_send`, with None for an object that does not exist (404)."""
        try:
            return self._send(verb, what, method, path, read=read, **request)
        except NotFoundError:
            return None

    def ping(self) -> None:
        """GET /version: is the API server reachable."""
        self._send("version", "version check", "GET", "/version/", read=_drain)

    def create_pod(self, manifest: dict[str, Any]) -> PodRef:
        """POST pods. ConflictError if a pod of that name exists."""
        namespace = manifest["metadata"]["namespace"]
        body = self._send(
            "create_pod",
            f"create pod {namespace}/{manifest['metadata']['name']}",
            "POST",
            _PODS,
            params={"namespace": namespace},
            body=manifest,
            content_type=_JSON,
            read=_json,
        )
        return PodRef(namespace, body["metadata"]["name"], body["metadata"]["uid"])

    def read_pod(self, namespace: str, name: str) -> PodInfo | None:
        """GET pods/NAME, or None when it does not exist."""
        body = self._send_if_found(
            "read_pod",
            f"read pod {namespace}/{name}",
            "GET",
            _POD,
            params={"namespace": namespace, "name": name},
            read=_json,
        )
        return None if body is None else pod_info(body)

    def delete_pod(self, namespace: str, name: str, *, grace_seconds: int = 0) -> bool:
        """DELETE pods/NAME. True if it was there."""
        found = self._send_if_found(
            "delete_pod",
            f"delete pod {namespace}/{name}",
            "DELETE",
            _POD,
            params={"namespace": namespace, "name": name},
            query={"gracePeriodSeconds": grace_seconds},
            read=_drain,
        )
        return found is not None

    def claim_pod(
        self, namespace: str, name: str, resource_version: str, annotations: dict[str, str]
    ) -> bool:
        """PATCH pods/NAME annotations only if the pod is still at ``resource_version``
        (optimistic concurrency): False when another writer got there first, so exactly
        one broker replica acts on a pod's end."""
        body = {"metadata": {"resourceVersion": resource_version, "annotations": annotations}}
        try:
            self._send(
                "patch_pod",
                f"claim pod {namespace}/{name}",
                "PATCH",
                _POD,
                params={"namespace": namespace, "name": name},
                body=body,
                content_type=_MERGE_PATCH,
                read=_drain,
            )
        except ConflictError:
            return False
        return True

    def create_secret(self, manifest: dict[str, Any]) -> None:
        """POST secrets. The manifest holds values: it is never logged or echoed."""
        namespace = manifest["metadata"]["namespace"]
        self._send(
            "create_secret",
            f"create secret {namespace}/{manifest['metadata']['name']}",
            "POST",
            _SECRETS,
            params={"namespace": namespace},
            body=manifest,
            content_type=_JSON,
            # The answer would echo the values: ask for metadata only.
            accept=_PARTIAL_METADATA,
            read=_drain,
        )

    def delete_secret(self, namespace: str, name: str) -> bool:
        """DELETE secrets/NAME. True if it was there."""
        found = self._send_if_found(
            "delete_secret",
            f"delete secret {namespace}/{name}",
            "DELETE",
            _SECRET,
            params={"namespace": namespace, "name": name},
            accept=_PARTIAL_METADATA,
            read=_drain,
        )
        return found is not None

    def read_launch_secret_values(
        self, namespace: str, launch_id: str
    ) -> dict[str, SecretValue] | None:
        """GET secrets/podbroker-LAUNCH_ID with its data: the one read of values the
        broker makes, for the leak guard of that launch's log stream (it must know what to
        mask, and the values live nowhere else). Only a broker-managed Secret of that
        launch is read; values stay wrapped and in memory for the stream's lifetime.
        None when the Secret is gone (the launch ended)."""
        name = secret_name_for(launch_id)
        body = self._send_if_found(
            "read_secret_values",
            f"read secret {namespace}/{name}",
            "GET",
            _SECRET,
            params={"namespace": namespace, "name": name},
            read=_json,
        )
        if body is None:
            return None
        labels = (body.get("metadata") or {}).get("labels") or {}
        if labels.get(podmeta.LAUNCH_ID_LABEL) != launch_id:
            return None
        return {
            key: SecretValue(base64.b64decode(value).decode("utf-8", "replace"))
            for key, value in (body.get("data") or {}).items()
        }

    def secret_exists(self, namespace: str, name: str) -> bool:
        """GET secrets/NAME as metadata only: does it exist."""
        return self.read_secret_metadata(namespace, name) is not None

    def list_managed_pods(
        self,
        namespace: str,
        *,
        launch_id: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[PodInfo]:
        """LIST pods with the broker's managed-by label (and one launch id, or more
        labels, if given)."""
        selector = podmeta.selector_for(launch_id, labels)
        body = self._send(
            "list_pods",
            f"list pods in {namespace}",
            "GET",
            _PODS,
            params={"namespace": namespace},
            query={"labelSelector": selector},
            read=_json,
        )
        return [pod_info(pod) for pod in body.get("items") or ()]

    def pod_events(self, namespace: str, name: str, uid: str = "") -> list[PodEvent]:
        """LIST events whose involvedObject is this pod (by name, and uid when known):
        the scheduler's, the kubelet's (image pulls, config errors) and quota's, most
        recent first, at most MAX_EVENTS, each cut to a bounded length."""
        selector = f"involvedObject.kind=Pod,involvedObject.name={name}"
        if uid:
            selector += f",involvedObject.uid={uid}"
        body = self._send(
            "list_events",
            f"list events of {namespace}/{name}",
            "GET",
            _EVENTS,
            params={"namespace": namespace},
            query={"fieldSelector": selector, "limit": 100},
            read=_json,
        )
        return recent_events([_event(item) for item in body.get("items") or ()])

    def read_secret_metadata(self, namespace: str, name: str) -> SecretMeta | None:
        """GET secrets/NAME as a PartialObjectMetadata: the API server sends metadata
        only, so values never travel to the broker. None when it does not exist."""
        body = self._send_if_found(
            "read_secret",
            f"read secret metadata {namespace}/{name}",
            "GET",
            _SECRET,
            params={"namespace": namespace, "name": name},
            accept=_PARTIAL_METADATA,
            read=_json,
        )
        return None if body is None else _secret_meta(namespace, body.get("metadata") or {})

    def list_managed_secrets(self, namespace: str) -> list[SecretMeta]:
        """LIST secrets with the managed-by label as PartialObjectMetadataList: metadata
        only, values never leave the API server."""
        body = self._send(
            "list_secrets",
            f"list secrets in {namespace}",
            "GET",
            _SECRETS,
            params={"namespace": namespace},
            query={"labelSelector": podmeta.MANAGED_SELECTOR},
            accept=_PARTIAL_METADATA_LIST,
            read=_json,
        )
        items = body.get("items") or []  # null when empty
        return [_secret_meta(namespace, item.get("metadata") or {}) for item in items]

    def pod_logs(
        self,
        namespace: str,
        name: str,
        *,
        container: str,
        follow: bool,
        since_seconds: int | None = None,
        timestamps: bool = False,
    ) -> Iterator[bytes]:
        """GET pods/NAME/log, streamed in chunks."""
        response = self._call(
            "pod_logs",
            lambda: self._open(
                "GET",
                _POD_LOG,
                params={"namespace": namespace, "name": name},
                query={
                    "container": container,
                    "follow": follow,
                    "timestamps": timestamps,
                    "sinceSeconds": since_seconds or None,
                },
                accept="*/*",
                timeout=self.follow_timeout if follow else self.timeout,
            ),
            what=f"read logs of {namespace}/{name}",
        )
        try:
            yield from response.stream(4096)
        except urllib3.exceptions.ReadTimeoutError as exc:
            if not follow:
                raise KubernetesUnavailableError(
                    f"log stream of {namespace}/{name} timed out"
                ) from exc
            # Quiet for follow_idle_timeout: end the stream; the caller follows again.
            return
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubernetesUnavailableError(f"log stream of {namespace}/{name} broke") from exc
        finally:
            response.release_conn()

    def token_review(self, token: str, audience: str) -> ReviewedToken | None:
        """POST tokenreviews: who ``token`` (with ``audience``) authenticates as, and the
        pod it is bound to if any; None when the API server does not authenticate it."""
        review = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]},
        }
        body = self._send(
            "token_review",
            "token review",
            "POST",
            _TOKEN_REVIEWS,
            body=review,
            content_type=_JSON,
            read=_json,
        )
        status = body.get("status") or {}
        user = status.get("user") or {}
        if not status.get("authenticated") or not user.get("username"):
            return None
        if audience not in (status.get("audiences") or []):  # empty: the API server's own
            return None
        extra = user.get("extra") or {}

        def first(key: str) -> str | None:
            values = extra.get(key) or []
            return str(values[0]) if values else None

        return ReviewedToken(
            username=str(user["username"]),
            pod_name=first("authentication.kubernetes.io/pod-name"),
            pod_uid=first("authentication.kubernetes.io/pod-uid"),
        )

    def watch_managed_pods(
        self,
        namespace: str,
        on_event: Callable[[str, PodInfo], None],
        stop: Callable[[], bool],
        timeout_seconds: int = 30,
    ) -> None:
        """WATCH pods with the managed-by label until ``stop()``; reconnects on expiry.
        Events are read as JSON lines."""
        resource_version: str | None = None
        while not stop():
            response = None
            try:
                response = self._open(
                    "GET",
                    _PODS,
                    params={"namespace": namespace},
                    query={
                        "labelSelector": podmeta.MANAGED_SELECTOR,
                        "watch": True,
                        "timeoutSeconds": timeout_seconds,
                        "resourceVersion": resource_version,
                    },
                    # The server ends the watch after timeout_seconds; a hung one is
                    # given up on a little later and the watch starts again.
                    timeout=(self.timeout[0], timeout_seconds + self.timeout[1]),
                )
                for line in iter_resp_lines(response):
                    event = json.loads(line)
                    body = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        if body.get("code") == 410:  # history compacted: list afresh
                            resource_version = None
                        else:
                            time.sleep(1)
                        break
                    resource_version = (body.get("metadata") or {}).get("resourceVersion")
                    if event.get("type") != "BOOKMARK":
                        on_event(str(event.get("type")), pod_info(body))
                    if stop():
                        break
            except ApiException as exc:
                if exc.status == 410:
                    resource_version = None
                    continue
                time.sleep(1)
            except (urllib3.exceptions.HTTPError, OSError, ValueError):
                time.sleep(1)
            finally:
                if response is not None:
                    with contextlib.suppress(Exception):
                        response.close()
                        response.release_conn()


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message", ""))
    except (ValueError, AttributeError):
        return ""


# How the API server words an object too large for etcd (its gRPC or etcd's own limit).
_TOO_LARGE = ("request is too large", "larger than max", "too large")


def _translate(exc: ApiException, what: str) -> BrokerError:
    status = exc.status or 0
    reason = f"{what}: {exc.reason or 'error'} (HTTP {status})"
    # The API server's message names the invalid field; a Secret's may quote its data,
    # so it is passed on for everything but Secrets.
    message = _api_message(exc)
    if message and "secret" not in what:
        reason = f"{reason}: {message}"
    hint = "exceeded quota" if "exceeded quota" in message else "check the broker's RBAC"
    if status != 413 and any(sign in message.lower() for sign in _TOO_LARGE):
        # etcd refusing an object's size comes back as a 500: the same request will
        # never fit, so it is the request's fault (4xx), not an outage.
        status, reason = 413, f"{reason} (too large for the API server)"
    return error_for_api_server_status(status, reason, forbidden_hint=hint)
