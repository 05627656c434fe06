"""Launches as callers see them afterwards: status, logs (followed) and kill, each
authorized by the DAG the launch belongs to."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from queue import Empty, Full, Queue

from broker.core import audit_events as ev
from broker.core.api_models import LaunchView, PodEvent
from broker.core.models import Caller
from broker.core.objects import CONTAINER_NAME, PodInfo, launch_view
from broker.core.pending import diagnose_pending
from broker.errors import BrokerError, NotFoundError
from broker.service.auth import authorize_dag
from broker.service.cleanup import Cleanup
from broker.service.ports import AuditSink, Cluster


class LaunchLookup:
    def __init__(
        self,
        *,
        cluster: Cluster,
        audit: AuditSink,
        cleanup: Cleanup,
        namespaces: Sequence[str],
    ) -> None:
        self.cluster = cluster
        self.audit = audit
        self.cleanup = cleanup
        self.namespaces = tuple(namespaces)

    def find(self, caller: Caller, launch_id: str) -> PodInfo:
        """The launch's pod, if ``caller`` may see launches of its DAG (404 otherwise
        would leak nothing more: ids are unguessable digests; 403 names the reason)."""
        for namespace in self.namespaces:
            for pod in self.cluster.list_managed_pods(namespace, launch_id=launch_id):
                authorize_dag(caller, pod.task.dag_id)
                return pod
        raise NotFoundError(f"no launch {launch_id!r}")

    def status(self, caller: Caller, launch_id: str) -> LaunchView:
        """The launch as it is now; while its pod is Pending, with the pod's recent
        Events and what keeps it from starting (``pending``)."""
        pod = self.find(caller, launch_id)
        view = launch_view(pod)
        if view.phase != "Pending":
            return view
        events: list[PodEvent] = []
        # Events explain, they do not decide: without them the status is still right.
        with contextlib.suppress(BrokerError):
            events = self.cluster.pod_events(pod.namespace, pod.name, pod.uid)
        return view.model_copy(update={"events": events, "pending": diagnose_pending(pod, events)})

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
        pod = self.find(caller, launch_id)
        chunks = self.cluster.pod_logs(
            pod.namespace,
            pod.name,
            container=CONTAINER_NAME,
            follow=follow,
            since_seconds=since_seconds,
            timestamps=timestamps,
        )
        if not follow:
            return chunks
        return self._follow(chunks, pod.namespace, pod.name)

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
                    pod = self.cluster.read_pod(namespace, name)
                    if pod is None or pod.finished:
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
        pod = self.find(caller, launch_id)
        self.cleanup.terminate(
            pod,
            kind=ev.EventKind.POD_DELETED if pod.finished else ev.EventKind.LAUNCH_KILLED,
            reason=reason or "DELETE /v1/launches",
            by=caller.identity,
            cleanup_reason="pod deleted" if pod.finished else "killed",
        )
        return launch_view(pod).model_copy(update={"phase": "Deleted"})
