"""Builds the broker from its settings: Vault session, policy source and resolver,
Kubernetes client, audit store, authenticator, and the services (launch, lookup,
cleanup, reconciler). One place owns their lifetimes."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

from broker.airflowapi.client import AirflowCredential, AirflowTaskInstances
from broker.audit.keys import generate_signing_key, load_signing_key
from broker.audit.render import render
from broker.audit.reporting import build_report, grant_refs_from_policy
from broker.audit.store import AuditStore, open_audit_store
from broker.core.plan import PlanPolicy, SecretLimits
from broker.core.report import ReportFilters
from broker.errors import BrokerError, ConfigurationError
from broker.kube.cluster import KubeCluster, load_api_client
from broker.metrics import DEPENDENCY_UP
from broker.service.auth import Authenticator
from broker.service.cleanup import Cleanup
from broker.service.issued import IssuedValues
from broker.service.launching import LaunchExecutor
from broker.service.lookup import LaunchLookup
from broker.service.reconciler import Reconciler
from broker.service.renewal import LeaseRenewer
from broker.service.verification import TaskVerifier
from broker.settings import BrokerSettings, VaultAuthSettings
from broker.vault.client import VaultAuth, VaultSession
from broker.vault.layout import VaultLayout
from broker.vault.resolver import SecretResolver, VaultPolicySource

log = logging.getLogger("podbroker")


def vault_auth(settings: VaultAuthSettings) -> VaultAuth:
    if settings.method == "token":
        token = settings.token
        if token is None and settings.token_file is not None:
            token = settings.token_file.read_text().strip()
        if not token:
            raise ConfigurationError("vault.auth.method=token needs vault.auth.token or token_file")
        return VaultAuth.token(token)
    if settings.method == "approle":
        if not settings.role_id or settings.secret_id_file is None:
            raise ConfigurationError("vault.auth.method=approle needs role_id and secret_id_file")
        return VaultAuth.approle(
            settings.role_id,
            settings.secret_id_file.read_text().strip(),
            mount=settings.mount or "approle",
        )
    return VaultAuth.kubernetes(
        settings.role, settings.jwt_file, mount=settings.mount or "kubernetes"
    )


@dataclass
class Runtime:
    settings: BrokerSettings
    vault: VaultSession
    policies: VaultPolicySource
    resolver: SecretResolver
    kube: KubeCluster
    audit: AuditStore
    authenticator: Authenticator
    launches: LaunchExecutor
    lookup: LaunchLookup
    reconciler: Reconciler
    renewals: LeaseRenewer
    _closed: bool = field(default=False, init=False)

    def check_ready(self) -> None:
        """Ping every dependency (each one's result goes to podbroker_dependency_up);
        raise the first failure."""
        failure: BrokerError | None = None
        for name, ping in (
            ("vault", self.vault.ping),
            ("kubernetes", self.kube.ping),
            ("audit", self.audit.ping),
        ):
            try:
                ping()
            except BrokerError as exc:
                DEPENDENCY_UP.labels(name).set(0)
                failure = failure or exc
            else:
                DEPENDENCY_UP.labels(name).set(1)
        if failure is not None:
            raise failure

    def render_report(
        self,
        fmt: str,
        *,
        since: dt.datetime | None,
        until: dt.datetime | None,
        filters: ReportFilters,
    ) -> str:
        grants = grant_refs_from_policy(self.policies.current())
        report = build_report(self.audit, grants, since=since, until=until, filters=filters)
        return render(report, fmt, policy_url_template=self.settings.audit.policy_url_template)

    def start_background(self) -> None:
        self.reconciler.start(self.settings.kubernetes.reconcile_interval_seconds)
        self.renewals.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.reconciler.stop()
        self.renewals.stop()
        self.launches.close()
        self.audit.close()
        self.kube.api.close()


CLEANUP_WORKERS = 8
"""Pods that end together are cleaned up this many at a time (docs/benchmarks.md)."""


def _airflow_source(settings: BrokerSettings) -> AirflowTaskInstances | None:
    """Airflow's REST API client, when ``airflow.api_url`` is set."""
    airflow = settings.airflow
    if not airflow.api_url:
        return None
    auth = airflow.auth
    return AirflowTaskInstances(
        airflow.api_url,
        AirflowCredential(
            method=auth.method,
            username=auth.username,
            password_file=auth.password_file,
            token_file=auth.token_file,
        ),
        ca_file=str(airflow.ca_file) if airflow.ca_file else None,
        timeout=airflow.timeout_seconds,
        page_size=airflow.list_page_size,
        list_budget_seconds=airflow.list_budget_seconds,
    )


def _signing_key_path(settings: BrokerSettings) -> Path:
    if settings.audit.signing_key_file is not None:
        return settings.audit.signing_key_file
    raise ConfigurationError("audit.signing_key_file is required (podbroker audit keygen FILE)")


def build_runtime(settings: BrokerSettings, *, dev_generate_key: bool = False) -> Runtime:
    """Connect to everything. Raises BrokerError (with the component) if any part is
    unreachable: the broker does not start half-connected."""
    key_path = _signing_key_path(settings)
    if dev_generate_key and not key_path.exists():
        generate_signing_key(key_path)
    signing_key = load_signing_key(key_path)
    audit = open_audit_store(settings.audit.url, signing_key)
    vault = VaultSession.connect(
        settings.vault.address,
        vault_auth(settings.vault.auth),
        ca_file=str(settings.vault.ca_file) if settings.vault.ca_file else None,
        timeout=settings.vault.timeout_seconds,
    )
    layout = VaultLayout(
        config_mount=settings.vault.config_mount,
        policy_prefix=settings.vault.grant_policy_prefix,
        token_role=settings.vault.token_role,
    )
    policies = VaultPolicySource(vault, settings.vault.policy_cache_seconds, layout=layout)
    resolver = SecretResolver(vault, layout=layout)
    kube = KubeCluster(
        load_api_client(settings.kubernetes.kubeconfig),
        timeout=settings.kubernetes.request_timeout_seconds,
    )
    plan_policy = PlanPolicy(
        namespaces=tuple(settings.kubernetes.task_namespaces),
        allowed_service_accounts=tuple(settings.kubernetes.allowed_service_accounts),
        templates=dict(settings.pod_templates),
        run_as_non_root=settings.kubernetes.run_as_non_root,
        require_template=settings.kubernetes.require_template,
        namespace_rules=dict(settings.kubernetes.namespace_rules),
        allowed_labels=tuple(settings.kubernetes.allowed_labels),
        allowed_annotations=tuple(settings.kubernetes.allowed_annotations),
    )
    verifier = TaskVerifier(
        _airflow_source(settings),
        settings.airflow.verification,
        cache_seconds=settings.airflow.cache_seconds,
    )
    namespaces = plan_policy.namespaces
    ledger = audit.holdings()
    issued = IssuedValues(
        retain_seconds=settings.leak_guard.retain_seconds,
        max_launches=settings.leak_guard.max_launches,
    )
    cleanup = Cleanup(cluster=kube, secrets=resolver, audit=audit, ledger=ledger, issued=issued)
    renewals = LeaseRenewer(ledger=ledger, secrets=resolver, audit=audit)
    launches = LaunchExecutor(
        cluster=kube,
        policies=policies,
        secrets=resolver,
        audit=audit,
        cleanup=cleanup,
        plan_policy=plan_policy,
        verifier=verifier,
        limits=SecretLimits(),
        renewals=renewals,
        # A launch runs its pod lookup and its Vault reads beside it.
        workers=2 * settings.server.max_in_flight.launch,
    )
    lookup = LaunchLookup(
        cluster=kube,
        audit=audit,
        cleanup=cleanup,
        namespaces=namespaces,
        policies=policies,
        leases=ledger,
    )
    reconciler = Reconciler(
        cluster=kube,
        cleanup=cleanup,
        namespaces=namespaces,
        retention_seconds=settings.kubernetes.pod_retention_seconds,
        grace_seconds=settings.kubernetes.orphan_grace_seconds,
        verifier=verifier,
        ended_grace_seconds=settings.airflow.ended_grace_seconds,
        cleanup_workers=CLEANUP_WORKERS,
    )
    return Runtime(
        settings,
        vault,
        policies,
        resolver,
        kube,
        audit,
        Authenticator(settings.auth, kube),
        launches,
        lookup,
        reconciler,
        renewals,
    )
