"""Launches as callers see them afterwards: status, logs (followed) and kill, each
authorized by the DAG the launch belongs to."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from queue import Empty, Full, Queue

from broker.core import audit_events as ev
from broker.core.api_models import LaunchView, PodEvent
from broker.core.leakguard import LogMasker
from broker.core.models import Caller
from broker.core.objects import CONTAINER_NAME, PodInfo, launch_view
from broker.core.pending import diagnose_pending
from broker.errors import BrokerError, ConflictError, NotFoundError
from broker.metrics import LOG_READS_REFUSED, SECRET_EXPOSURES
from broker.service.auth import authorize_dag
from broker.service.cleanup import Cleanup
from broker.service.ports import AuditSink, Cluster, LeaseLedger, PolicySource

log = logging.getLogger("podbroker.leakguard")

_EXPOSURES_REMEMBERED = 4096


class UnmaskableLogError(ConflictError):
    """A log read refused because the leak guard has no values to mask it with (409).
    The API audits it as a refused request, like a 403 or 422."""


class LaunchLookup:
    def __init__(
        self,
        *,
        cluster: Cluster,
        audit: AuditSink,
        cleanup: Cleanup,
        namespaces: Sequence[str],
        policies: PolicySource | None = None,
        leases: LeaseLedger | None = None,
    ) -> None:
        self.cluster = cluster
        self.audit = audit
        self.cleanup = cleanup
        self.namespaces = tuple(namespaces)
        self.policies = policies
        self.leases = leases
        # (launch, secret) exposures already recorded: a re-followed stream is not a
        # new exposure. Bounded; forgetting one only records it again.
        self._exposed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._exposed_lock = threading.Lock()

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
        its log has gone quiet, even where the node keeps the stream open (kwok does).

        Leak guard: every value issued to the launch is masked, in its common encodings
        too (values held in memory from the launch's start until
        ``leak_guard.retain_seconds`` after its end, else read back from its own Secret);
        each exposed secret is audited (``secret_exposed``) and, where its grant says
        ``on_exposure: revoke``, its dynamic credential is revoked at once. A launch
        whose values are neither held nor readable is refused (UnmaskableLogError, 409):
        never served unmasked."""
        pod = self.find(caller, launch_id)
        masker = self._masker(pod)
        chunks = self.cluster.pod_logs(
            pod.namespace,
            pod.name,
            container=CONTAINER_NAME,
            follow=follow,
            since_seconds=since_seconds,
            timestamps=timestamps,
        )
        stream = self._follow(chunks, pod.namespace, pod.name) if follow else chunks
        if masker is None:
            return stream
        return self._masked(stream, masker, pod)

    def _masker(self, pod: PodInfo) -> LogMasker | None:
        """The guard of one log read: from the values this replica holds for the launch
        (kept from its Secret's creation, or from when this replica first saw it run,
        until a while after it ends), else read back from the launch's Secret. A launch
        that had secrets and has neither is refused (409): never served unmasked."""
        if not pod.secret_names or pod.launch_id is None:
            return None
        values = self.cleanup.issued_values(pod)
        if values is None:
            log.warning(
                "log of launch %s refused: its Secret is gone and no values are held",
                pod.launch_id,
            )
            LOG_READS_REFUSED.inc()
            raise UnmaskableLogError(self._unmaskable(pod))
        masker = LogMasker(values)
        return masker if masker.active else None

    def _unmaskable(self, pod: PodInfo) -> str:
        retain = self.cleanup.issued.retain_seconds
        state = "has ended" if pod.finished else f"is {pod.phase}"
        return (
            f"the log of launch {pod.launch_id} is not served: its pod {state} and its "
            "Secret is gone, and this broker replica does not hold the values issued to it "
            f"(it keeps them {retain:g} s after the end of a launch it saw running, "
            "leak_guard.retain_seconds, but not across a restart), so the leak guard could "
            "not mask them. Read the log sooner after the pod ends, raise "
            "leak_guard.retain_seconds, or have a cluster administrator read the pod's log"
        )

    def _masked(self, stream: Iterator[bytes], masker: LogMasker, pod: PodInfo) -> Iterator[bytes]:
        reported: set[str] = set()
        try:
            for chunk in stream:
                out = masker.feed(chunk)
                self._report(masker, reported, pod)
                if out:
                    yield out
            out = masker.flush()
            self._report(masker, reported, pod)
            if out:
                yield out
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    def _report(self, masker: LogMasker, reported: set[str], pod: PodInfo) -> None:
        for name in sorted(masker.exposed - reported):
            reported.add(name)
            launch_id = str(pod.launch_id)
            with self._exposed_lock:
                if (launch_id, name) in self._exposed:
                    continue
                self._exposed[(launch_id, name)] = None
                while len(self._exposed) > _EXPOSURES_REMEMBERED:
                    self._exposed.popitem(last=False)
            try:
                self._exposure(pod, launch_id, name)
            except Exception:  # the stream goes on masked whatever happens here
                log.exception("handling an exposure of %r in launch %s failed", name, launch_id)

    def _exposure(self, pod: PodInfo, launch_id: str, name: str) -> None:
        """Record that a value of secret ``name`` showed in the log (masked), and revoke
        its dynamic credential when its grant says ``on_exposure: revoke``."""
        leases = []
        if self.leases is not None:
            with contextlib.suppress(BrokerError):
                leases = [r for r in self.leases.leases_of(launch_id) if r.secret_name == name]
        grant = leases[0].grant if leases else None
        action = "mask"
        if grant is not None and self.policies is not None:
            with contextlib.suppress(BrokerError):
                found = dict(self.policies.current().grants()).get(grant)
                if found is not None:
                    action = found.on_exposure
        revoked: bool | None = None
        if action == "revoke" and leases:
            ids = [r.lease_id for r in leases]
            try:
                self.cleanup.secrets.revoke(ids)
                revoked = True
            except BrokerError as exc:
                revoked = False
                log.warning("revoking exposed %r of %s failed: %s", name, launch_id, exc.reason)
            if self.leases is not None:
                for lease_id in ids:
                    with contextlib.suppress(BrokerError):
                        self.leases.lease_retry(lease_id, next_renewal_at=None)
        SECRET_EXPOSURES.labels("revoked" if revoked else "masked").inc()
        log.warning("a value of secret %r showed in the log of launch %s: masked", name, launch_id)
        self.cleanup.record_quietly(
            ev.launch_event(
                ev.EventKind.SECRET_EXPOSED,
                launch_id=launch_id,
                task=pod.task,
                secret_names=[name],
                namespace=pod.namespace,
                pod=pod.name,
                grant=grant,
                on_exposure=action,
                revoked=revoked,
            )
        )

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
