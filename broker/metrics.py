"""Every Prometheus metric the broker exports (``GET /metrics``), in one place, so the
dashboards and alerts have one catalog to check against."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_FAST_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

LAUNCHES = Counter("podbroker_launches_total", "Launch requests by outcome", ["outcome"])
DENIALS = Counter("podbroker_denials_total", "Launches denied by policy")
LAUNCH_LATENCY = Histogram(
    "podbroker_launch_seconds",
    "Time to accept a launch (pod and Secret created)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
VAULT_LATENCY = Histogram(
    "podbroker_vault_call_seconds",
    "Latency of Vault operations by the broker",
    ["operation"],
    buckets=_FAST_BUCKETS,
)
KUBERNETES_LATENCY = Histogram(
    "podbroker_kubernetes_call_seconds",
    "Latency of Kubernetes API calls by the broker",
    ["verb"],
    buckets=_FAST_BUCKETS,
)
LIVE_SECRETS = Gauge("podbroker_live_secrets", "Broker-made Secrets currently in the cluster")
AIRFLOW_LATENCY = Histogram(
    "podbroker_airflow_call_seconds",
    "Latency of Airflow REST API calls by the broker (task instance verification)",
    ["operation"],
    buckets=_FAST_BUCKETS,
)
VERIFICATIONS = Counter(
    "podbroker_task_verifications_total",
    "Task instance checks with Airflow by verdict (warn/enforce) and outcome",
    ["verdict", "outcome"],
)
REJECTED_OVER_CAP = Counter(
    "podbroker_requests_rejected_busy_total",
    "Requests refused with 503 because their route class had too many in flight",
    ["route_class"],
)
QUEUED_OVER_CAP = Counter(
    "podbroker_requests_queued_total",
    "Requests that waited in the waiting room because their route class was at its cap",
    ["route_class"],
)
LOG_READS_REFUSED = Counter(
    "podbroker_log_reads_refused_total",
    "Log reads refused (409) because the values issued to the launch were neither held "
    "nor readable from its Secret, so the leak guard could not mask them",
)
VAULT_REQUESTS = Counter(
    "podbroker_vault_requests_total",
    "HTTP requests the broker sent to Vault, by operation (token_create, kv_read, "
    "creds_read, lease_renew, lease_revoke, token_revoke, login, ...)",
    ["operation"],
)
LEASE_RENEWALS = Counter(
    "podbroker_lease_renewals_total",
    "Lease renewals of running launches by outcome (renewed, capped, gone, error)",
    ["outcome"],
)
SECRET_EXPOSURES = Counter(
    "podbroker_secret_exposures_total",
    "Issued values found (and masked) in a launch's log stream, by action taken",
    ["action"],
)
DEPENDENCY_UP = Gauge(
    "podbroker_dependency_up",
    "1 when the last readiness check reached the dependency (vault, kubernetes, audit), else 0",
    ["dependency"],
)
SWEEP_FINDINGS = Counter(
    "podbroker_sweep_findings_total",
    "What the periodic sweep found and cleaned up (kind: the SweepResult field)",
    ["kind"],
)
SWEEP_ERRORS = Counter(
    "podbroker_sweep_errors_total", "Sweep steps that failed (retried on the next sweep)"
)
CLEANUP_BACKLOG = Gauge(
    "podbroker_cleanup_backlog",
    "Launches whose pod is gone but whose Vault holdings are not yet revoked (last sweep)",
)
