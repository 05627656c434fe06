"""In-memory fakes of the service layer's ports (``broker.service.ports``), for fast
tests of launch, lookup, cleanup and the reconciler without a cluster or Vault.

They behave like the adapters where the service relies on it: a duplicate pod is a
ConflictError, a claim honours the pod's resourceVersion (bumped on every write),
deletes say whether the object was there, Secrets are kept as metadata only (values are
not stored, only the data key names). Each verb can be made to fail on its next calls
(:meth:`FakeCluster.fail`), and :meth:`FakeCluster.before` runs a hook before a verb so a
test can stage a race (another writer getting there first)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.core import podmeta
from broker.core.api_models import ContainerSpec, LaunchRequest, LaunchView, PodEvent
from broker.core.audit_events import AuditEvent, EventKind
from broker.core.models import Caller, SecretRequest, TaskIdentity
from broker.core.objects import (
    ContainerStatus,
    HeldByLaunch,
    LaunchInProgressError,
    PodInfo,
    PodRef,
    SecretMeta,
)
from broker.core.plan import (
    DATABASE_KEYS,
    PlanPolicy,
    SecretsPlan,
    label_value,
    launch_id_for,
    pod_name_for,
    secret_name_for,
)
from broker.core.podmeta import VaultHoldings
from broker.core.policy import DatabaseSecret, Grant, KvSecret, PolicySet, Team
from broker.core.secret_value import SecretValue
from broker.core.verification import TaskInstanceBatch, TaskInstanceRecord
from broker.errors import (
    AirflowUnavailableError,
    AuditUnavailableError,
    BrokerError,
    ConflictError,
    NotFoundError,
)
from broker.service.cleanup import Cleanup
from broker.service.launching import LaunchExecutor
from broker.service.lookup import LaunchLookup
from broker.service.reconciler import Reconciler
from broker.service.verification import TaskVerifier

Key = tuple[str, str]


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ago(seconds: float) -> dt.datetime:
    """A creation time ``seconds`` in the past (the service reads the wall clock)."""
    return utc_now() - dt.timedelta(seconds=seconds)


def wait_until(predicate: Callable[[], bool], timeout: float = 1.0) -> bool:
    """Poll for work the executor's pool does after the call returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class _Failures:
    """Per-verb failure injection: raise the given error on the next ``times`` calls."""

    def __init__(self) -> None:
        self._queued: dict[str, list[BrokerError]] = defaultdict(list)
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def fail(self, verb: str, error: BrokerError, times: int = 1) -> None:
        with self._lock:
            self._queued[verb].extend([error] * times)

    def enter(self, verb: str) -> None:
        with self._lock:
            self.calls.append(verb)
            queued = self._queued.get(verb)
            error = queued.pop(0) if queued else None
        if error is not None:
            raise error

    def count(self, verb: str) -> int:
        with self._lock:
            return self.calls.count(verb)


# -- Kubernetes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredSecret:
    """A Secret as the fake keeps it: metadata, owner and data key names, no values."""

    meta: SecretMeta
    owner_uid: str | None
    data_keys: tuple[str, ...]
    values: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Kept only for the leak guard's one read of a launch's own Secret."""


class FakeCluster:
    """The ``Cluster`` port over two dicts keyed by (namespace, name). No garbage
    collector: deleting a pod leaves its Secret (tests say which one they want)."""

    def __init__(self) -> None:
        self.pods: dict[Key, PodInfo] = {}
        self.pod_manifests: dict[Key, dict[str, Any]] = {}
        self.secrets: dict[Key, StoredSecret] = {}
        self.events: dict[Key, list[PodEvent]] = {}
        self.deleted_pods: list[Key] = []
        self.delete_graces: dict[Key, int] = {}
        """The grace period each deleted pod was deleted with."""
        self.deleted_secrets: list[Key] = []
        self.logs: dict[Key, list[bytes]] = {}
        """Chunks pod_logs serves for a pod (namespace, name)."""
        self._failures = _Failures()
        self._hooks: dict[str, list[Callable[[], object]]] = defaultdict(list)
        self._versions = itertools.count(1)
        self._uids = itertools.count(1)
        self._lock = threading.RLock()  # the executor reads pods from its pool

    # -- test controls ----------------------------------------------------------------

    def fail(self, verb: str, error: BrokerError, times: int = 1) -> None:
        self._failures.fail(verb, error, times)

    def before(self, verb: str, hook: Callable[[], object]) -> None:
        """Run ``hook`` once, just before the next call of ``verb`` does its work."""
        with self._lock:
            self._hooks[verb].append(hook)

    def count(self, verb: str) -> int:
        return self._failures.count(verb)

    def _enter(self, verb: str) -> None:
        with self._lock:
            hooks, self._hooks[verb] = self._hooks[verb], []
        for hook in hooks:
            hook()
        self._failures.enter(verb)

    def _next_version(self) -> str:
        return str(next(self._versions))

    def add_pod(
        self,
        task: TaskIdentity,
        *,
        namespace: str = "tasks",
        phase: str = "Pending",
        secret_names: Sequence[str] = (),
        created_at: dt.datetime | None = None,
        claimed_at: dt.datetime | None = None,
        exit_code: int | None = None,
        active_deadline_seconds: int | None = 3600,
        deleting: bool = False,
        request_digest: str | None = None,
    ) -> PodInfo:
        """Plant a broker pod as a launch of ``task`` would have made it (without a
        request digest unless given, like pods made before digests existed)."""
        launch_id = launch_id_for(task, namespace)
        annotations = podmeta.pod_annotations(secret_names, "static:test", task, request_digest)
        if claimed_at is not None:
            annotations.update(podmeta.claim_annotations(claimed_at))
        containers: tuple[ContainerStatus, ...] = ()
        if exit_code is not None:
            containers = (ContainerStatus("base", "terminated", exit_code),)
        pod = PodInfo(
            namespace=namespace,
            name=pod_name_for(task, launch_id),
            uid=f"uid-{next(self._uids)}",
            resource_version=self._next_version(),
            labels={
                podmeta.MANAGED_BY_LABEL: podmeta.MANAGED_BY_VALUE,
                podmeta.LAUNCH_ID_LABEL: launch_id,
                "dag_id": label_value(task.dag_id),
            },
            annotations=annotations,
            phase=phase,
            containers=containers,
            created_at=created_at or utc_now(),
            deleting=deleting,
            active_deadline_seconds=active_deadline_seconds,
        )
        with self._lock:
            self.pods[(namespace, pod.name)] = pod
        return pod

    def add_secret_for(
        self,
        pod: PodInfo,
        *,
        lease_ids: Sequence[str] = (),
        accessor: str | None = "acc-planted",
        created_at: dt.datetime | None = None,
    ) -> SecretMeta:
        """Plant the per-pod Secret of ``pod``'s launch with these Vault holdings."""
        assert pod.launch_id is not None
        return self.add_secret(
            pod.launch_id,
            namespace=pod.namespace,
            lease_ids=lease_ids,
            accessor=accessor,
            created_at=created_at,
            owner_uid=pod.uid,
        )

    def add_secret(
        self,
        launch_id: str,
        *,
        namespace: str = "tasks",
        lease_ids: Sequence[str] = (),
        accessor: str | None = "acc-planted",
        created_at: dt.datetime | None = None,
        owner_uid: str | None = None,
    ) -> SecretMeta:
        holdings = podmeta.VaultHoldings(tuple(lease_ids), accessor)
        meta = SecretMeta(
            namespace=namespace,
            name=secret_name_for(launch_id),
            labels={
                podmeta.MANAGED_BY_LABEL: podmeta.MANAGED_BY_VALUE,
                podmeta.LAUNCH_ID_LABEL: launch_id,
            },
            annotations=podmeta.secret_annotations([], holdings),
            created_at=created_at or utc_now(),
        )
        with self._lock:
            self.secrets[(namespace, meta.name)] = StoredSecret(meta, owner_uid, ())
        return meta

    def set_phase(
        self, namespace: str, name: str, phase: str, *, exit_code: int | None = None
    ) -> PodInfo:
        """The kubelet moving a pod on: a write, so the resourceVersion changes."""
        with self._lock:
            pod = self.pods[(namespace, name)]
            containers = pod.containers
            if exit_code is not None:
                containers = (ContainerStatus("base", "terminated", exit_code),)
            pod = dataclasses.replace(
                pod, phase=phase, containers=containers, resource_version=self._next_version()
            )
            self.pods[(namespace, name)] = pod
            return pod

    # -- the port ---------------------------------------------------------------------

    def ping(self) -> None:
        self._enter("ping")

    def create_pod(self, manifest: dict[str, Any]) -> PodRef:
        self._enter("create_pod")
        metadata = manifest["metadata"]
        key = (metadata["namespace"], metadata["name"])
        with self._lock:
            if key in self.pods:
                raise ConflictError(f"pod {key[0]}/{key[1]} already exists")
            pod = PodInfo(
                namespace=key[0],
                name=key[1],
                uid=f"uid-{next(self._uids)}",
                resource_version=self._next_version(),
                labels=dict(metadata.get("labels") or {}),
                annotations=dict(metadata.get("annotations") or {}),
                phase="Pending",
                created_at=utc_now(),
                active_deadline_seconds=manifest["spec"].get("activeDeadlineSeconds"),
            )
            self.pods[key] = pod
            self.pod_manifests[key] = manifest
        return pod.ref

    def read_pod(self, namespace: str, name: str) -> PodInfo | None:
        self._enter("read_pod")
        with self._lock:
            return self.pods.get((namespace, name))

    def pod_events(self, namespace: str, name: str, uid: str = "") -> list[PodEvent]:
        self._enter("pod_events")
        with self._lock:
            return list(self.events.get((namespace, name), []))

    def delete_pod(self, namespace: str, name: str, *, grace_seconds: int = 0) -> bool:
        self._enter("delete_pod")
        with self._lock:
            if self.pods.pop((namespace, name), None) is None:
                return False
            self.deleted_pods.append((namespace, name))
            self.delete_graces[(namespace, name)] = grace_seconds
            return True

    def claim_pod(
        self, namespace: str, name: str, resource_version: str, annotations: dict[str, str]
    ) -> bool:
        self._enter("claim_pod")
        with self._lock:
            pod = self.pods.get((namespace, name))
            if pod is None:
                raise NotFoundError(f"claim pod {namespace}/{name}: not found")
            if resource_version and resource_version != pod.resource_version:
                return False  # the adapter turns the API's 409 into False
            self.pods[(namespace, name)] = dataclasses.replace(
                pod,
                annotations={**pod.annotations, **annotations},
                resource_version=self._next_version(),
            )
            return True

    def create_secret(self, manifest: dict[str, Any]) -> None:
        self._enter("create_secret")
        metadata = manifest["metadata"]
        key = (metadata["namespace"], metadata["name"])
        owners = metadata.get("ownerReferences") or [{}]
        with self._lock:
            if key in self.secrets:
                raise ConflictError(f"secret {key[0]}/{key[1]} already exists")
            meta = SecretMeta(
                namespace=key[0],
                name=key[1],
                labels=dict(metadata.get("labels") or {}),
                annotations=dict(metadata.get("annotations") or {}),
                created_at=utc_now(),
            )
            data = {**manifest.get("data", {}), **manifest.get("stringData", {})}
            data_keys = tuple(sorted(data))
            self.secrets[key] = StoredSecret(meta, owners[0].get("uid"), data_keys, dict(data))

    def delete_secret(self, namespace: str, name: str) -> bool:
        self._enter("delete_secret")
        with self._lock:
            if self.secrets.pop((namespace, name), None) is None:
                return False
            self.deleted_secrets.append((namespace, name))
            return True

    def secret_exists(self, namespace: str, name: str) -> bool:
        self._enter("secret_exists")
        with self._lock:
            return (namespace, name) in self.secrets

    def read_secret_metadata(self, namespace: str, name: str) -> SecretMeta | None:
        self._enter("read_secret_metadata")
        with self._lock:
            stored = self.secrets.get((namespace, name))
            return stored.meta if stored else None

    def read_launch_secret_values(
        self, namespace: str, launch_id: str
    ) -> dict[str, SecretValue] | None:
        self._enter("read_launch_secret_values")
        with self._lock:
            stored = self.secrets.get((namespace, secret_name_for(launch_id)))
            if stored is None:
                return None
            return {key: SecretValue(value) for key, value in stored.values.items()}

    def list_managed_pods(
        self,
        namespace: str,
        *,
        launch_id: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> list[PodInfo]:
        self._enter("list_managed_pods")
        wanted = dict(labels or {})
        with self._lock:
            return [
                pod
                for (ns, _), pod in self.pods.items()
                if ns == namespace
                and (launch_id is None or pod.launch_id == launch_id)
                and all(pod.labels.get(k) == v for k, v in wanted.items())
            ]

    def list_managed_secrets(self, namespace: str) -> list[SecretMeta]:
        self._enter("list_managed_secrets")
        with self._lock:
            return [s.meta for (ns, _), s in self.secrets.items() if ns == namespace]

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
        self._enter("pod_logs")
        return iter(list(self.logs.get((namespace, name), [])))

    def watch_managed_pods(
        self,
        namespace: str,
        on_event: Callable[[str, PodInfo], None],
        stop: Callable[[], bool],
        timeout_seconds: int = 30,
    ) -> None:
        self._enter("watch_managed_pods")


# -- policy -------------------------------------------------------------------------------


class FakePolicySource:
    def __init__(self, policy: PolicySet) -> None:
        self.policy = policy
        self._failures = _Failures()

    def fail(self, error: BrokerError, times: int = 1) -> None:
        self._failures.fail("current", error, times)

    @property
    def calls(self) -> int:
        return self._failures.count("current")

    def current(self) -> PolicySet:
        self._failures.enter("current")
        return self.policy


# -- Vault --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeResolved:
    name: str
    keys: Mapping[str, SecretValue]
    vault_path: str
    version: int | None = None
    lease_id: str | None = None
    lease_ttl: int | None = None
    lease_cap: int | None = None
    grant: str = ""


@dataclass(frozen=True)
class FakeBundle:
    secrets: list[FakeResolved]
    token_accessor: str

    @property
    def lease_ids(self) -> list[str]:
        return [s.lease_id for s in self.secrets if s.lease_id]


@dataclass
class FakeSecretStore:
    """The ``SecretStore`` port: KV values come from ``kv_values`` (secret name -> key ->
    value), a database read yields username/password and a lease. Every bundle handed
    out and every revoke is recorded, so a test can check that all was given back."""

    kv_values: dict[str, dict[str, str]] = field(default_factory=dict)
    issued: list[FakeBundle] = field(default_factory=list)
    revoked_leases: list[str] = field(default_factory=list)
    revoked_accessors: list[str] = field(default_factory=list)
    gate: threading.Event | None = None
    """When set, resolve waits for it: the test decides when Vault answers."""
    lease_ttl: int = 600
    renewals: list[tuple[str, int]] = field(default_factory=list)
    max_ttl: int | None = None
    """Vault's own cap on a renewal's TTL (the database role's max_ttl), if any."""
    batch_tokens: bool = False
    """As Vault does: a plan asking for a batch token gets one with no accessor."""

    def __post_init__(self) -> None:
        self._failures = _Failures()
        self._serial = itertools.count(1)
        self._lock = threading.Lock()

    def fail(self, verb: str, error: BrokerError, times: int = 1) -> None:
        self._failures.fail(verb, error, times)

    def count(self, verb: str) -> int:
        return self._failures.count(verb)

    @property
    def issued_accessors(self) -> list[str]:
        with self._lock:
            return [b.token_accessor for b in self.issued]

    @property
    def issued_leases(self) -> list[str]:
        with self._lock:
            return [lease for b in self.issued for lease in b.lease_ids]

    def resolve(
        self,
        plan: SecretsPlan,
        *,
        launch_id: str,
        on_issue: Callable[[str | None, Sequence[str]], None] | None = None,
    ) -> FakeBundle:
        serial = next(self._serial)
        batch = self.batch_tokens and plan.token.token_type == "batch"
        accessor = "" if batch else f"acc-{launch_id[:8]}-{serial}"
        if on_issue is not None:
            on_issue(accessor or None, ())
        self._failures.enter("resolve")
        if self.gate is not None and not self.gate.wait(timeout=5):
            raise AssertionError("the test never let Vault answer")
        secrets: list[FakeResolved] = []
        for read in plan.reads:
            if read.kind == "database":
                values = {key: f"{read.name}-{key}-{serial}" for key in DATABASE_KEYS}
                lease = f"{read.mount}/creds/{read.path}/lease-{serial}"
                resolved = FakeResolved(
                    read.name,
                    _masked(values),
                    read.vault_path,
                    None,
                    lease,
                    lease_ttl=self.lease_ttl,
                    lease_cap=read.lease_cap,
                    grant=read.grant,
                )
                secrets.append(resolved)
            else:
                values = self.kv_values.get(read.name) or {
                    key: f"{read.name}-{key}" for key in read.keys or ("value",)
                }
                if read.keys is not None:
                    values = {k: v for k, v in values.items() if k in read.keys}
                secrets.append(FakeResolved(read.name, _masked(values), read.vault_path, 1))
        bundle = FakeBundle(secrets, accessor)
        with self._lock:
            self.issued.append(bundle)
        leases = [s.lease_id for s in secrets if s.lease_id]
        if on_issue is not None and leases:
            on_issue(None, leases)
        return bundle

    def revoke(self, lease_ids: Sequence[str]) -> None:
        self._failures.enter("revoke")
        with self._lock:
            self.revoked_leases.extend(lease_ids)

    def renew(self, lease_id: str, increment: int) -> int:
        self._failures.enter("renew")
        with self._lock:
            if lease_id in self.revoked_leases:
                raise NotFoundError("lease not found")
            self.renewals.append((lease_id, increment))
        return increment if self.max_ttl is None else min(increment, self.max_ttl)

    def revoke_token(self, accessor: str) -> None:
        self._failures.enter("revoke_token")
        with self._lock:
            self.revoked_accessors.append(accessor)


def _masked(values: Mapping[str, str]) -> dict[str, SecretValue]:
    return {key: SecretValue(value) for key, value in values.items()}


# -- holdings ledger ----------------------------------------------------------------------


class FakeLedger:
    """The ``HoldingsLedger`` port, in memory; ``down`` makes every call fail."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, VaultHoldings, dt.datetime, bool]] = {}
        self.down = False
        self.holds = 0
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.down:
            raise AuditUnavailableError("holdings ledger unavailable (OperationalError)")

    def hold(
        self,
        launch_id: str,
        namespace: str,
        *,
        token_accessor: str | None = None,
        lease_ids: Sequence[str] = (),
    ) -> None:
        self._check()
        with self._lock:
            self.holds += 1
            _, old, created, _ = self.rows.get(
                launch_id, (namespace, VaultHoldings(), utc_now(), False)
            )
            merged = VaultHoldings(
                tuple(dict.fromkeys([*old.lease_ids, *lease_ids])),
                token_accessor or old.token_accessor,
            )
            self.rows[launch_id] = (namespace, merged, created, False)

    def open(self, launch_id: str, namespace: str) -> None:
        """As the store's ``open_launch``: afresh, or refused while a row is open."""
        with self._lock:
            row = self.rows.get(launch_id)
            if row is not None and not row[3]:
                raise LaunchInProgressError(f"launch {launch_id} is still launching (fake)")
            self.holds += 1
            self.rows[launch_id] = (namespace, VaultHoldings(), utc_now(), False)

    def held(self, launch_id: str) -> VaultHoldings | None:
        self._check()
        with self._lock:
            row = self.rows.get(launch_id)
        return None if row is None or row[3] else row[1]

    def released(self, launch_id: str) -> None:
        self._check()
        with self._lock:
            if launch_id in self.rows:
                namespace, holdings, created, _ = self.rows[launch_id]
                self.rows[launch_id] = (namespace, holdings, created, True)

    def unreleased(self, limit: int = 1000) -> list[HeldByLaunch]:
        self._check()
        with self._lock:
            return [
                HeldByLaunch(launch_id, ns, holdings, created)
                for launch_id, (ns, holdings, created, done) in self.rows.items()
                if not done
            ][:limit]

    def age(self, launch_id: str, seconds: float) -> None:
        """Pretend the record was made ``seconds`` ago."""
        with self._lock:
            ns, holdings, _, done = self.rows[launch_id]
            self.rows[launch_id] = (ns, holdings, utc_now() - dt.timedelta(seconds=seconds), done)


# -- audit --------------------------------------------------------------------------------


class FakeAudit:
    """The ``AuditSink`` port. ``down`` makes every write raise AuditUnavailableError;
    ``append_many`` is all or nothing, like the store's one transaction."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.down = False
        self.ledger: FakeLedger | None = None  # opened launches land here, as in the store
        self._lock = threading.Lock()

    def _check(self) -> None:
        if self.down:
            raise AuditUnavailableError("audit store down (fake)")

    def append(self, event: AuditEvent) -> object:
        self._check()
        with self._lock:
            self.events.append(event)
        return event

    def append_many(
        self,
        events: Sequence[AuditEvent],
        *,
        opens: tuple[str, str] | None = None,
        releases: Sequence[str] = (),
    ) -> object:
        self._check()
        if opens is not None and self.ledger is not None:  # first: all or nothing
            self.ledger.open(*opens)
        if self.ledger is not None:
            for launch_id in releases:
                self.ledger.released(launch_id)
        with self._lock:
            self.events.extend(events)
        return list(events)

    def ping(self) -> None:
        self._check()

    def kinds(self) -> list[EventKind]:
        with self._lock:
            return [event.kind for event in self.events]

    def of_kind(self, kind: EventKind) -> list[AuditEvent]:
        with self._lock:
            return [event for event in self.events if event.kind == kind]


# -- the service layer wired to the fakes ---------------------------------------------------

NAMESPACE = "tasks"
CALLER = Caller(identity="static:etl", allowed_dag_globs=("etl_*",))
OTHER_CALLER = Caller(identity="static:ml", allowed_dag_globs=("ml_*",))


TI_ID = "0199a3c2-7f1e-7b3a-9c55-3d2e1f0a4b6c"


def make_task(
    task_id: str = "load",
    *,
    dag_id: str = "etl_daily",
    try_number: int = 1,
    ti_id: str | None = TI_ID,
) -> TaskIdentity:
    return TaskIdentity(
        dag_id=dag_id, task_id=task_id, run_id="manual__1", try_number=try_number, ti_id=ti_id
    )


class FakeTaskInstances:
    """Airflow's task instances as the broker's adapter reports them."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str, str, int], TaskInstanceRecord] = {}
        self.calls = 0
        self.down = False
        self.cut_short_after: int | None = None
        """Answer batches with only this many records, marked incomplete."""

    def add(
        self,
        task: TaskIdentity,
        *,
        state: str = "running",
        hostname: str | None = "worker-pod-1",
        ti_id: str = TI_ID,
        try_number: int | None = None,
    ) -> None:
        self.records[(task.dag_id, task.run_id, task.task_id, task.map_index)] = TaskInstanceRecord(
            id=ti_id,
            dag_id=task.dag_id,
            run_id=task.run_id,
            task_id=task.task_id,
            map_index=task.map_index,
            try_number=task.try_number if try_number is None else try_number,
            state=state,
            hostname=hostname,
        )

    def get(self, task: TaskIdentity) -> TaskInstanceRecord | None:
        self.calls += 1
        if self.down:
            raise AirflowUnavailableError("Airflow API unreachable (ConnectError)")
        return self.records.get((task.dag_id, task.run_id, task.task_id, task.map_index))

    def get_many(self, tasks: Sequence[TaskIdentity]) -> TaskInstanceBatch:
        self.calls += 1
        if self.down:
            raise AirflowUnavailableError("Airflow API unreachable (ConnectError)")
        keys = {(t.dag_id, t.run_id, t.task_id, t.map_index) for t in tasks}
        found = tuple(r for k, r in self.records.items() if k in keys)
        if self.cut_short_after is not None:
            return TaskInstanceBatch(found[: self.cut_short_after], complete=False)
        return TaskInstanceBatch(found)


def sample_policy() -> PolicySet:
    """A catalog with every shape the executor plans for, all granted to etl_* DAGs."""
    catalog: dict[str, KvSecret | DatabaseSecret] = {
        "wh": KvSecret(mount="secret", path="wh", keys=("user", "password")),
        "wh-copy": KvSecret(mount="secret", path="wh-copy", keys=("password",)),
        "api": KvSecret(mount="secret", path="api"),  # keys only known by reading
        "api-copy": KvSecret(mount="secret", path="api-copy"),
        "db": DatabaseSecret(mount="database", role="ro"),
    }
    grant = Grant(id="loaders", dags="etl_*", secrets=tuple(catalog))
    return PolicySet(catalog=catalog, teams={"etl": Team(grants=(grant,))})


@dataclass
class Services:
    cluster: FakeCluster
    policies: FakePolicySource
    store: FakeSecretStore
    audit: FakeAudit
    cleanup: Cleanup
    launches: LaunchExecutor
    lookup: LaunchLookup
    reconciler: Reconciler
    ledger: FakeLedger

    def replica(self) -> Cleanup:
        """Another broker replica's cleanup over the same cluster, Vault, audit, ledger."""
        return Cleanup(
            cluster=self.cluster, secrets=self.store, audit=self.audit, ledger=self.ledger
        )

    def launch(
        self,
        *secrets: SecretRequest | str,
        task_identity: TaskIdentity | None = None,
        caller: Caller = CALLER,
        env: Mapping[str, str] | None = None,
        image: str = "python:3.12",
    ) -> LaunchView:
        request = LaunchRequest(
            task=task_identity or make_task(),
            container=ContainerSpec(image=image, env=dict(env or {})),
            secrets=[SecretRequest(name=s) if isinstance(s, str) else s for s in secrets],
        )
        return self.launches.launch(caller, request)

    def close(self) -> None:
        self.launches.close()


def make_services(
    *,
    retention_seconds: int = 600,
    grace_seconds: int = 60,
    verifier: TaskVerifier | None = None,
    ended_grace_seconds: int = 0,
) -> Services:
    cluster = FakeCluster()
    policies = FakePolicySource(sample_policy())
    store = FakeSecretStore()
    audit = FakeAudit()
    ledger = FakeLedger()
    audit.ledger = ledger
    cleanup = Cleanup(cluster=cluster, secrets=store, audit=audit, ledger=ledger)
    launches = LaunchExecutor(
        cluster=cluster,
        policies=policies,
        secrets=store,
        audit=audit,
        cleanup=cleanup,
        plan_policy=PlanPolicy(namespaces=(NAMESPACE,)),
        verifier=verifier,
        workers=4,
        other_attempt_wait=0.3,
    )
    lookup = LaunchLookup(cluster=cluster, audit=audit, cleanup=cleanup, namespaces=(NAMESPACE,))
    reconciler = Reconciler(
        cluster=cluster,
        cleanup=cleanup,
        namespaces=(NAMESPACE,),
        retention_seconds=retention_seconds,
        grace_seconds=grace_seconds,
        verifier=verifier,
        ended_grace_seconds=ended_grace_seconds,
    )
    return Services(cluster, policies, store, audit, cleanup, launches, lookup, reconciler, ledger)
