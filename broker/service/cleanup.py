"""The end of a launch, wherever it comes from (a pod ending, a kill, the sweep, a
rolled-back launch): claim the pod so one replica acts, delete its Secret, revoke what
it held in Vault, and record each step. Undoing comes first; recording it never blocks
it (a down audit store is logged, not fatal)."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from queue import Empty, Full, Queue

from broker.core import audit_events as ev
from broker.core import podmeta
from broker.core.models import Caller, TaskIdentity
from broker.core.objects import PodInfo, SecretMeta, launch_view
from broker.core.plan import secret_name_for, values_by_secret
from broker.core.secret_value import SecretValue
from broker.core.termination import CLEAN, WITHHELD, exposed_in
from broker.errors import BrokerError, NotFoundError
from broker.metrics import LIVE_SECRETS, VAULT_LATENCY
from broker.service.issued import IssuedValues
from broker.service.ports import AuditSink, Cluster, HoldingsLedger, SecretStore

log = logging.getLogger("podbroker.cleanup")
_STORE_DOWN_SECONDS = 10.0
_OUTBOX_SIZE = 10_000
_FLUSH_IDLE_SECONDS = 5.0


@dataclass
class _Batch:
    """What one clean-up block writes in one commit at its end."""

    events: list[ev.AuditEvent] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)
    """Launches whose ledger rows close with those records."""


class Cleanup:
    def __init__(
        self,
        *,
        cluster: Cluster,
        secrets: SecretStore,
        audit: AuditSink,
        ledger: HoldingsLedger | None = None,
        issued: IssuedValues | None = None,
    ) -> None:
        self.cluster = cluster
        self.secrets = secrets
        self.audit = audit
        self.ledger = ledger
        # The leak guard's values of each launch: every end seen here starts their
        # retention clock (on every replica, the claimant or not).
        self.issued = issued if issued is not None else IssuedValues()
        # After the store failed once, clean-ups stop waiting for it for a while: their
        # records wait in memory and are written by a background thread once it answers.
        self._store_down_until = 0.0
        self._outbox: Queue[ev.AuditEvent] = Queue(maxsize=_OUTBOX_SIZE)
        self._flusher: threading.Thread | None = None
        self._lock = threading.Lock()
        self._together = threading.local()

    def _store_down(self) -> bool:
        return time.monotonic() < self._store_down_until

    def _mark_store_down(self) -> None:
        self._store_down_until = time.monotonic() + _STORE_DOWN_SECONDS

    @contextlib.contextmanager
    def recorded_together(self) -> Iterator[None]:
        """The steps of one clean-up are recorded in one commit once they are done (in
        the order they happened), so undoing never waits for a commit per step. The
        ledger row's release joins that commit: a broker killed before it leaves the
        row open, and the sweep cleans up (and records) again instead of the records
        being lost. Re-entrant: the outermost block writes."""
        batch: _Batch | None = getattr(self._together, "batch", None)
        if batch is not None:
            yield
            return
        self._together.batch = batch = _Batch()
        try:
            yield
        finally:
            self._together.batch = None
            if batch.events:
                self._record_now(batch.events, batch.releases)
            elif batch.releases:
                self._release_rows(batch.releases)

    def record_quietly(self, event: ev.AuditEvent) -> None:
        """Audit a clean-up step without letting a down audit store stop the clean-up:
        when the store fails (or failed a moment ago) the record is kept and written
        afterwards, in order, by a background thread. Inside :meth:`recorded_together`
        it waits for the block's end."""
        batch: _Batch | None = getattr(self._together, "batch", None)
        if batch is not None:
            batch.events.append(event)
            return
        self._record_now([event])

    def _mark_released(self, launch_id: str) -> None:
        """Close ``launch_id``'s ledger row: with the records of the clean-up block it
        belongs to, else now."""
        batch: _Batch | None = getattr(self._together, "batch", None)
        if batch is not None:
            batch.releases.append(launch_id)
        else:
            self._release_rows([launch_id])

    def _release_rows(self, launch_ids: Sequence[str]) -> None:
        if self.ledger is None or self._store_down():
            return  # (while the store is down the rows stay open: the sweep closes them)
        for launch_id in launch_ids:
            try:
                self.ledger.released(launch_id)
            except BrokerError as exc:
                log.warning("could not mark %s released (%s)", launch_id, exc.reason)

    def _record_now(self, events: list[ev.AuditEvent], releases: Sequence[str] = ()) -> None:
        if not self._store_down() and self._outbox.empty():
            try:
                self.audit.append_many(events, releases=releases if self.ledger else ())
                return
            except BrokerError as exc:
                self._mark_store_down()
                log.warning(
                    "audit store unavailable (%s); %s recorded later",
                    exc.reason,
                    ", ".join(e.kind for e in events),
                )
        self._release_rows(releases)  # the records wait in order; the rows need not
        for event in events:
            try:
                self._outbox.put_nowait(event)
            except Full:
                log.warning("audit backlog full; %s not recorded", event.kind)
        self._start_flusher()

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flusher is not None and self._flusher.is_alive():
                return
            self._flusher = threading.Thread(target=self._flush, name="audit-outbox", daemon=True)
            self._flusher.start()

    def _flush(self) -> None:
        while True:
            try:
                event = self._outbox.get(timeout=_FLUSH_IDLE_SECONDS)
            except Empty:
                return
            while True:
                try:
                    self.audit.append(event)
                    break
                except BrokerError:
                    self._mark_store_down()
                    time.sleep(1.0)

    # -- the leak guard's values -----------------------------------------------------------

    def issued_values(self, pod: PodInfo) -> dict[str, list[SecretValue]] | None:
        """The values issued to ``pod``'s launch (secret name -> values), for the leak
        guard: those held in memory, else read back from the launch's Secret (GET
        secrets/podbroker-LAUNCH_ID, its data) and held from then on. None when the
        launch had no secrets, or has neither (its Secret is gone)."""
        launch_id = pod.launch_id
        if not pod.secret_names or launch_id is None:
            return None
        values = self.issued.values(launch_id)
        if values is not None:
            return values
        data = self.cluster.read_launch_secret_values(pod.namespace, launch_id)
        if not data:
            return None
        values = values_by_secret(data, pod.secret_names)
        self.issued.hold(launch_id, values)
        if pod.finished:
            self.issued.ended(launch_id)
        return values

    def keep_issued_values(self, pod: PodInfo) -> None:
        """Hold the values of a launch this replica did not make (best effort): a later
        log read here, after the pod ended and its Secret went, is still masked."""
        if not pod.secret_names or pod.launch_id is None or self.issued.holds(pod.launch_id):
            return
        try:
            self.issued_values(pod)
        except BrokerError as exc:
            log.info("could not read back the values of %s (%s)", pod.launch_id, exc.reason)

    # -- a pod's end ----------------------------------------------------------------------

    def terminate(
        self,
        pod: PodInfo,
        *,
        kind: ev.EventKind,
        reason: str,
        by: str,
        cleanup_reason: str,
    ) -> None:
        """End a launch now (kill, superseded try, task instance ended in Airflow): say
        why, release its Secret and what it holds in Vault, delete its pod. Recording
        never blocks the undoing: a down audit store is logged, the kill goes on."""
        with self.recorded_together():
            self.record_quietly(
                ev.launch_event(
                    kind, launch_id=pod.launch_id, task=pod.task, caller=by, by=by, reason=reason
                )
            )
            self.finish(pod, reason=cleanup_reason)
        # The task's grace period, if its request asked for one (SIGTERM first).
        self.cluster.delete_pod(pod.namespace, pod.name, grace_seconds=pod.kill_grace_seconds)

    def end_launch(self, pod: PodInfo, reason: str, *, cleanup_reason: str) -> None:
        """The broker itself ends a running launch (a newer try, an ended task)."""
        self.terminate(
            pod,
            kind=ev.EventKind.LAUNCH_KILLED,
            reason=reason,
            by="podbroker",
            cleanup_reason=cleanup_reason,
        )

    def finish(self, pod: PodInfo, *, reason: str = "pod ended", force: bool = False) -> None:
        """Delete the pod's Secret and revoke its leases, once: the replica that claims
        the pod (an annotation written with the pod's resourceVersion as precondition)
        does it; the others see the claim and stop. ``force`` skips the claim (the sweep
        finishing what a crashed claimant left).

        The claim of an ended pod carries the termination-message leak guard's verdict
        (:meth:`check_messages`), taken while the Secret still holds the values. Its
        records are written together once the Secret is gone and Vault given back."""
        with self.recorded_together():
            self._finish(pod, reason=reason, force=force)

    def _finish(self, pod: PodInfo, *, reason: str, force: bool) -> None:
        self.issued.ended(pod.launch_id)
        verdict, exposed = self.check_messages(pod) if pod.finished and not force else (None, [])
        if not force and not self.claim(pod, result_check=verdict):
            return
        task = pod.task
        if exposed:  # recorded by the claimant only: every replica may check
            self.record_quietly(
                ev.launch_event(
                    ev.EventKind.SECRET_EXPOSED,
                    launch_id=pod.launch_id,
                    task=task,
                    secret_names=exposed,
                    namespace=pod.namespace,
                    pod=pod.name,
                    where="termination_message",
                    on_exposure="withhold",
                )
            )
        if pod.finished and not force:
            self.record_quietly(
                ev.launch_event(
                    ev.EventKind.POD_FINISHED,
                    launch_id=pod.launch_id,
                    task=task,
                    secret_names=pod.secret_names,
                    phase=pod.phase,
                    exit_code=launch_view(pod).exit_code,
                )
            )
        self.release_secret_of(pod, reason, task=task)

    def check_messages(self, pod: PodInfo) -> tuple[str | None, list[str]]:
        """Compare the ended pod's termination messages with the values issued to its
        launch (the leak guard's: held in memory, else read back from its own Secret;
        never logged). The verdict: ``clean``, or ``withheld`` when a message holds one
        (the names of the secrets exposed come with it) or when the values are gone and
        it cannot be told; None: no secrets."""
        if not pod.secret_names or not pod.launch_id:
            return None, []
        messages = [c.message for c in pod.containers if c.state == "terminated" and c.message]
        if not messages:
            return CLEAN, []
        values = self.issued_values(pod)
        if values is None:
            log.warning(
                "the values of launch %s are gone: its termination message is withheld",
                pod.launch_id,
            )
            return WITHHELD, []
        exposed = sorted(exposed_in(messages, values))
        if not exposed:
            return CLEAN, []
        log.warning(
            "a value of %s showed in the termination message of launch %s: withheld",
            ", ".join(exposed),
            pod.launch_id,
        )
        return WITHHELD, exposed

    def claim(self, pod: PodInfo, *, result_check: str | None = None) -> bool:
        """True if this replica now owns the cleanup of ``pod`` (with ``result_check``,
        the termination-message verdict, written in the same patch)."""
        for _ in range(3):
            if pod.claimed:
                return False
            try:
                if self.cluster.claim_pod(
                    pod.namespace,
                    pod.name,
                    pod.resource_version,
                    podmeta.claim_annotations(dt.datetime.now(dt.UTC), result_check),
                ):
                    return True
            except NotFoundError:
                return True  # deleted meanwhile: its Secret still needs releasing
            fresh = self.cluster.read_pod(pod.namespace, pod.name)
            if fresh is None:
                return True  # gone already: nobody else will look at it again
            pod = fresh
        return False

    def release_secret_of(
        self, pod: PodInfo, reason: str, *, task: TaskIdentity | None = None
    ) -> None:
        """Release the Secret of ``pod``'s launch and what the launch holds in Vault, even
        when the Secret is gone already (the garbage collector deletes it with its pod)."""
        launch_id = pod.launch_id
        if not launch_id:
            return
        self.issued.ended(launch_id)
        meta = self.cluster.read_secret_metadata(pod.namespace, secret_name_for(launch_id))
        if meta is None:
            self.settle(launch_id, podmeta.VaultHoldings(), task=task or pod.task)
            return
        self.release_secret(meta, reason=reason, task=task, secret_names=pod.secret_names)

    def release_secret(
        self,
        meta: SecretMeta,
        *,
        reason: str,
        task: TaskIdentity | None = None,
        secret_names: Sequence[str] = (),
    ) -> None:
        """Delete a broker Secret and revoke the leases and child token its annotations
        name. Deleting comes first: values leave the cluster even if Vault or the
        audit store is down."""
        self.issued.ended(meta.launch_id)
        known = meta.holdings
        if self.cluster.delete_secret(meta.namespace, meta.name):
            LIVE_SECRETS.dec()
            self.record_quietly(
                ev.launch_event(
                    ev.EventKind.SECRET_DELETED,
                    launch_id=meta.launch_id,
                    task=task,
                    secret_names=list(secret_names),
                    namespace=meta.namespace,
                    secret=meta.name,
                    reason=reason,
                )
            )
        elif meta.launch_id is not None and self.ledger is not None:
            # Another replica (or the garbage collector) deleted it meanwhile: it is not
            # recorded twice, and what is still held comes from the ledger alone (the one
            # that deleted it has released or is releasing the rest).
            known = podmeta.VaultHoldings()
        if meta.launch_id is not None:
            self.settle(meta.launch_id, known, task=task)
        elif known:
            self.revoke(known, launch_id=None, task=task)

    def settle(
        self,
        launch_id: str,
        known: podmeta.VaultHoldings,
        *,
        task: TaskIdentity | None = None,
        caller: Caller | None = None,
    ) -> None:
        """Give back everything ``launch_id`` holds (``known`` and what the ledger
        recorded) and close its ledger row, also when it held nothing."""
        holdings = self.holdings_of(launch_id, known)
        if holdings:
            self.revoke(holdings, launch_id=launch_id, task=task, caller=caller)
            return
        self._mark_released(launch_id)

    def holdings_of(
        self, launch_id: str | None, annotated: podmeta.VaultHoldings
    ) -> podmeta.VaultHoldings:
        """What a launch holds: the ledger's record (the source of truth), together with
        what its Secret's annotations name (launches made before the ledger existed)."""
        if self.ledger is None or launch_id is None or self._store_down():
            return annotated
        try:
            recorded = self.ledger.held(launch_id)
        except BrokerError as exc:
            self._mark_store_down()
            log.warning("holdings ledger unavailable (%s); using the Secret's record", exc.reason)
            return annotated
        if recorded is None:
            return annotated
        return podmeta.VaultHoldings(
            tuple(dict.fromkeys([*recorded.lease_ids, *annotated.lease_ids])),
            recorded.token_accessor or annotated.token_accessor,
        )

    # -- Vault ----------------------------------------------------------------------------

    def revoke(
        self,
        holdings: podmeta.VaultHoldings,
        *,
        launch_id: str | None,
        task: TaskIdentity | None = None,
        caller: Caller | None = None,
    ) -> None:
        """Revoke leases and the child token, then record what happened: revocation
        reduces exposure, so it never waits for the audit store."""
        revoked, error = True, None
        try:
            with VAULT_LATENCY.labels("revoke").time():
                if holdings.lease_ids:
                    self.secrets.revoke(holdings.lease_ids)
                if holdings.token_accessor:
                    self.secrets.revoke_token(holdings.token_accessor)
        except BrokerError as exc:
            revoked, error = False, type(exc).__name__
            log.warning(
                "revocation failed for launch %s; the sweep retries from the ledger", launch_id
            )
        self.record_quietly(
            ev.launch_event(
                ev.EventKind.LEASES_REVOKED,
                launch_id=launch_id,
                task=task,
                caller=caller,
                lease_ids=list(holdings.lease_ids),
                token_accessor=holdings.token_accessor,
                revoked=revoked,
                error=error,
            )
        )
        if revoked and launch_id is not None:
            self._mark_released(launch_id)

    def reconciler_step(
        self, namespace: str, launch_id: str | None, action: str, name: str
    ) -> None:
        """Record a step the reconciler took on its own."""
        self.record_quietly(
            ev.launch_event(
                ev.EventKind.RECONCILER_CLEANUP,
                launch_id=launch_id,
                action=action,
                object=f"{namespace}/{name}",
            )
        )
