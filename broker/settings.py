"""Typed broker settings, read once at start-up from a YAML file and environment
variables (``PODBROKER_`` prefix, ``__`` between levels, e.g.
``PODBROKER_VAULT__ADDRESS``). Nothing reads the environment at import time."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from broker.core.plan import NamespaceRules, PodTemplate
from broker.errors import InvalidRequestError
from broker.vault import names


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VaultAuthSettings(_Section):
    """How the broker logs in to Vault."""

    method: Literal["token", "approle", "kubernetes"] = "token"
    token_file: Path | None = None
    """method=token: file holding the token (dev); or set PODBROKER_VAULT__AUTH__TOKEN."""
    token: str | None = Field(default=None, repr=False)
    role_id: str | None = None
    secret_id_file: Path | None = None
    role: str = names.KUBERNETES_AUTH_ROLE
    """method=kubernetes: the Vault role bound to the broker's ServiceAccount."""
    jwt_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    mount: str | None = None
    """Auth mount path; default "approle" or "kubernetes" by method."""


class VaultSettings(_Section):
    address: str = "http://127.0.0.1:8200"
    ca_file: Path | None = None
    timeout_seconds: float = 5.0
    config_mount: str = names.CONFIG_MOUNT
    token_role: str = names.TOKEN_ROLE
    grant_policy_prefix: str = names.GRANT_POLICY_PREFIX
    policy_cache_seconds: float = 10.0
    """Grants are re-read from Vault when older than this (or when their KV version moves)."""
    auth: VaultAuthSettings = Field(default_factory=VaultAuthSettings)


class KubernetesSettings(_Section):
    kubeconfig: str | None = None
    """None: in-cluster ServiceAccount credentials (production)."""
    task_namespaces: list[str] = Field(default_factory=lambda: ["default"], min_length=1)
    allowed_service_accounts: list[str] = Field(default_factory=lambda: ["default"])
    pod_retention_seconds: int = 3600
    """Finished pods are deleted this long after they end (or on the caller's DELETE)."""
    orphan_grace_seconds: int = 60
    """A broker Secret or pod without its counterpart is removed after this long."""
    reconcile_interval_seconds: int = 30
    request_timeout_seconds: float = 10.0
    run_as_non_root: bool = False
    require_template: bool = False
    """Every launch must name a ``pod_template`` (per namespace: ``namespace_rules``)."""
    allowed_labels: list[str] = Field(default_factory=list)
    """Globs over the pod label keys a request may set (none by default; keys the broker
    reserves never pass). Templates' own labels are not bound by this."""
    allowed_annotations: list[str] = Field(default_factory=list)
    """Globs over the pod annotation keys a request may set (none by default; AppArmor
    and seccomp keys and the broker's own never pass)."""
    namespace_rules: dict[str, NamespaceRules] = Field(default_factory=dict)
    """Per task namespace: require_template, and the claims, ConfigMaps, image pull
    Secrets, runtime and priority classes requests may name (globs)."""

    @model_validator(mode="after")
    def _rules_for_task_namespaces(self) -> KubernetesSettings:
        stray = sorted(set(self.namespace_rules) - set(self.task_namespaces))
        if stray:
            raise ValueError(f"namespace_rules for non-task namespaces: {', '.join(stray)}")
        return self


class CallerRule(_Section):
    """Which DAG ids a caller identity may launch for. ``identity`` is an exact
    username (``system:serviceaccount:airflow:airflow-worker``) or a glob."""

    identity: str
    dag_ids: list[str] = Field(default_factory=lambda: ["*"])


class StaticToken(_Section):
    """A development token, stored as its SHA-256 hex digest only."""

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    dag_ids: list[str] = Field(default_factory=lambda: ["*"])

    @staticmethod
    def digest(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()


class AuthSettings(_Section):
    token_audience: str = "podbroker"
    callers: list[CallerRule] = Field(default_factory=list)
    static_tokens: list[StaticToken] = Field(default_factory=list)
    rejected_cache_seconds: float = Field(default=5.0, ge=0)
    """A token TokenReview rejected is rejected without asking again for this long."""
    token_reviews_per_second: float = Field(default=50.0, gt=0)
    """Cap on TokenReview calls (bursts up to the same number); over it, a retryable 503."""
    review_cache_seconds: float = 30.0
    report_readers: list[str] = Field(default_factory=list)
    """Identity globs (like ``callers[].identity``; ``static:NAME`` for a static token)
    that may read the usage report for every DAG, refusals included. Any other caller
    reads only the DAGs its ``callers`` rules (or static token) cover."""


class LimitSettings(_Section):
    """Bounds on what one request may cost (README "Limits"). Counts and lengths inside a
    launch request are fixed in its schema (``/openapi.json``)."""

    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=16 * 1024 * 1024)
    """A larger request body is refused with 413 before it is read further or parsed."""
    refusal_interval_seconds: float = Field(default=60.0, gt=0, le=3600)
    """Refused requests (401/403/413/415/422) are audited per caller, endpoint, status and
    reason: the first at once, then one record with a count per key per interval."""
    refusal_keys: int = Field(default=1000, ge=1, le=100_000)
    """At most this many distinct keys are counted apart per interval; the rest share one."""


class AuditSettings(_Section):
    url: str = "sqlite:///podbroker-audit.db"
    signing_key_file: Path | None = None
    """Ed25519 private key (PEM). Required in production; dev generates one beside the store."""
    policy_url_template: str | None = Field(default=None, pattern=r"^(https?://|/)\S*$")
    """Where the HTML report links each unused grant's policy file: a URL with ``{team}``
    (and ``{grant}``), e.g. ``https://git.example.com/platform/policies/-/blob/main/teams/
    {team}.yaml``. Unset: the report names ``policies/teams/<team>.yaml`` as text."""


class InFlightCaps(_Section):
    """Most requests in flight at once per route class; past that a launch may wait in
    the waiting room (``launch_queue``), any other request gets 503 with Retry-After at
    once. The server's worker-thread pool is sized from their sum (plus spare threads for
    health probes), so a request admitted here never waits unseen for a thread."""

    launch: int = Field(default=32, ge=1)
    """POST /v1/launches."""
    launch_queue: int = Field(default=128, ge=0)
    """Launches that may wait for a slot (holding no thread) before one gets 503."""
    launch_queue_seconds: float = Field(default=10.0, gt=0, le=60)
    """How long a launch waits there at most; keep it well under the operator's HTTP
    timeout (30 s by default)."""
    logs: int = Field(default=12, ge=1)
    """GET .../logs (a followed stream counts while it streams)."""
    other: int = Field(default=12, ge=1)
    """Every other API call (status, kill, report)."""


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = 8080
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    """A second listener on ``host`` serving only ``GET /metrics``, in plain HTTP (the
    metrics name no secret, DAG or caller), so scrapers need not reach the launch API;
    the chart can put an authorizing TLS proxy in front. None: /metrics on ``port`` only."""
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    max_in_flight: InFlightCaps = Field(default_factory=InFlightCaps)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError("metrics_port must differ from port")
        return self


class AirflowAuthSettings(_Section):
    """The broker's own Airflow API credential (read-only access to task instances is
    enough: Airflow's Viewer role)."""

    method: Literal["password", "token"] = "password"
    username: str | None = None
    password_file: Path | None = None
    """method=password: file holding the password; exchanged at ``POST /auth/token``."""
    token_file: Path | None = None
    """method=token: file holding a JWT for Airflow's API (re-read on every login)."""


class AirflowSettings(_Section):
    """Where the broker checks that a launch is for a running task instance."""

    api_url: str | None = None
    """Airflow's API server, e.g. ``https://airflow.example.com`` (no ``/api/v2``)."""
    ca_file: Path | None = None
    timeout_seconds: float = Field(default=3.0, gt=0, le=30)
    verification: Literal["off", "warn", "enforce"] = "off"
    """off: no Airflow calls (grants with require_verified_task still enforce, which
    needs api_url); warn: check and log; enforce: refuse launches that fail the check."""
    cache_seconds: float = Field(default=5.0, ge=0, le=300)
    ended_grace_seconds: int = Field(default=60, ge=0)
    """A running pod whose task instance Airflow has ended is killed after this long."""
    list_page_size: int = Field(default=1000, ge=1, le=10_000)
    """Task instances per page when the reconciler lists those of its running launches
    (Airflow may send fewer; the broker reads every page)."""
    list_budget_seconds: float = Field(default=20.0, gt=0, le=600)
    """The reconciler stops reading pages after this long; launches on pages left unread
    are not judged that pass (never taken for ended)."""
    auth: AirflowAuthSettings = Field(default_factory=AirflowAuthSettings)

    @model_validator(mode="after")
    def _url_when_checking(self) -> AirflowSettings:
        if self.verification != "off" and not self.api_url:
            raise ValueError(f"verification={self.verification} needs airflow.api_url")
        return self


class LeakGuardSettings(_Section):
    """How long the broker keeps, in memory only, the values it issued to a launch so
    that log reads after the pod ended (its Secret deleted) are still masked. A read with
    neither held values nor the Secret is refused (409), never served unmasked."""

    retain_seconds: int = Field(default=3600, ge=0, le=7 * 86400)
    """Values of an ended launch are dropped this long after its end (0: at the end)."""
    max_launches: int = Field(default=10_000, ge=0, le=1_000_000)
    """At most this many launches' values are held (the oldest ended ones go first)."""


class LoggingSettings(_Section):
    format: Literal["text", "json"] = "text"
    """text: one line per record, control characters written out visibly; json: one
    JSON object per line (time, level, logger, message). ``serve --log-format`` wins."""


class BrokerSettings(BaseSettings):
    """Everything the broker needs to run. See README "Configuration"."""

    model_config = SettingsConfigDict(
        env_prefix="PODBROKER_", env_nested_delimiter="__", extra="forbid"
    )

    vault: VaultSettings = Field(default_factory=VaultSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    leak_guard: LeakGuardSettings = Field(default_factory=LeakGuardSettings)
    pod_templates: dict[str, PodTemplate] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (passed as init values); no .env magic.
        return env_settings, init_settings


def load_settings(path: Path | None) -> BrokerSettings:
    """Read settings from ``path`` (YAML) overlaid with PODBROKER_* env vars. Errors
    name the file and the field."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise InvalidRequestError(f"{path}: cannot read: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            # PyYAML's message quotes the offending line, which may hold a token: name
            # the position and the problem only.
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "syntax error"
            raise InvalidRequestError(f"{path}{where}: not valid YAML: {problem}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise InvalidRequestError(f"{path}: the top level must be a mapping")
        data = loaded or {}
    try:
        return BrokerSettings(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        # pydantic's own text quotes input values: keep only locations and messages.
        raise InvalidRequestError(
            f"{path or 'environment'}: invalid settings: {problems}"
        ) from None
