"""The audit event model: what the broker records before each decision and action.

Pure data (pydantic only). The store (``broker.audit``) chains and signs these; the
report (``broker.core.report``) reads them. An event names secrets, Vault paths,
versions, lease ids and token accessors, never secret values: :class:`AuditEvent`
refuses :class:`~broker.core.secret_value.SecretValue` objects and value-like keys
anywhere in ``details``.

Builders (``launch_requested(...)``, ``decision(...)`` ...) fix the ``details`` layout
of each kind; the report relies on it, so the service should use them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from broker.core.models import Caller, TaskIdentity
from broker.core.secret_value import SecretValue


class EventKind(StrEnum):
    LAUNCH_REQUESTED = "launch_requested"
    DECISION = "decision"
    SECRETS_RESOLVED = "secrets_resolved"
    SECRET_CREATED = "secret_created"
    POD_CREATED = "pod_created"
    POD_FINISHED = "pod_finished"
    SECRET_DELETED = "secret_deleted"
    LEASES_REVOKED = "leases_revoked"
    LAUNCH_KILLED = "launch_killed"
    POD_DELETED = "pod_deleted"  # a finished launch's pod removed by its caller
    LAUNCH_REATTACHED = "launch_reattached"  # the same try asked again: its existing pod
    LAUNCH_FAILED = "launch_failed"
    LAUNCH_DRY_RUN = "launch_dry_run"  # POST /v1/launches?dry_run=true: planned, nothing done
    RECONCILER_CLEANUP = "reconciler_cleanup"
    POLICY_APPLIED = "policy_applied"
    REQUEST_REFUSED = "request_refused"  # 401/403/413/415/422, unmaskable log 409; counted
    LEASE_RENEWED = "lease_renewed"  # a running launch's lease renewed (first renewal only)
    LEASE_CAPPED = "lease_capped"  # renewed up to its grant's max_lease_ttl: expires there
    SECRET_EXPOSED = "secret_exposed"  # a value issued to a launch appeared in its log


# Keys whose presence in ``details`` suggests someone is about to record a value.
# Names of secrets, paths, versions, lease ids and accessors are fine; these are not.
FORBIDDEN_DETAIL_KEYS: Final = frozenset(
    {
        "value",
        "values",
        "secret_value",
        "secret_values",
        "password",
        "passwd",
        "token",
        "client_token",
        "private_key",
        "data",
        "plaintext",
    }
)

_MAX_DEPTH: Final = 8
# What one record may hold, so a flood of large requests cannot fill the store. Far above
# what a valid launch produces (at most 64 secrets, see broker.core.api_models).
MAX_NAMES: Final = 100
"""Names kept in ``secret_names`` (the rest are counted in
``details["secret_names_omitted"]``) and items in any list of ``details`` (a longer one
keeps MAX_NAMES - 1 and ends with a ``…[N more]`` item)."""
MAX_TEXT: Final = 1024
"""Characters kept of any string in ``details``; a cut one ends with ``…[cut]``."""
CUT_MARK: Final = "…[cut]"


class AuditEventError(ValueError):
    """An event would carry something it must not (a value, non-JSON data)."""


def _check_json(value: object, where: str, depth: int = 0) -> object:
    """Return ``value`` as plain JSON data, refusing secret values and value-like keys."""
    if depth > _MAX_DEPTH:
        raise AuditEventError(f"details nested deeper than {_MAX_DEPTH} at {where}")
    if isinstance(value, SecretValue):
        # Never echo the value (or even its mask) beyond naming where it was.
        raise AuditEventError(f"details carry a SecretValue at {where}; record names, not values")
    if isinstance(value, str):
        return _cut(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditEventError(f"details carry a non-finite number at {where}")
        return value
    if isinstance(value, Mapping):
        out: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditEventError(f"details keys must be strings at {where}")
            if key.lower() in FORBIDDEN_DETAIL_KEYS:
                raise AuditEventError(
                    f"details key {key!r} at {where} looks like a secret value; not recorded"
                )
            out[key] = _check_json(item, f"{where}.{key}", depth + 1)
        return out
    if isinstance(value, list | tuple):
        # A capped list has exactly MAX_NAMES items, so reading a record back (which
        # validates it again) leaves it, and its hash, unchanged.
        kept = value if len(value) <= MAX_NAMES else value[: MAX_NAMES - 1]
        items = [_check_json(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(kept)]
        if len(kept) < len(value):
            items.append(f"…[{len(value) - len(kept)} more]")
        return items
    raise AuditEventError(f"details carry a {type(value).__name__} at {where}; JSON data only")


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - len(CUT_MARK)] + CUT_MARK


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("event time must be timezone-aware")
    # Microsecond precision survives every store round trip; keep exactly that.
    return value.astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


_STORED: Final = {"stored": True}


def _stored(info: ValidationInfo) -> bool:
    return isinstance(info.context, Mapping) and info.context.get("stored") is True


class AuditEvent(BaseModel):
    """One thing the broker decided or did. ``details`` is JSON (kind-specific layout,
    see the builders below); ``secret_names`` lists logical secret names involved."""

    # A rejected event must not quote what it rejected (it may be a value).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    time: datetime = Field(default_factory=utc_now)
    kind: EventKind
    launch_id: str | None = None
    caller: str | None = None
    dag_id: str | None = None
    task_id: str | None = None
    run_id: str | None = None
    try_number: int | None = None
    map_index: int | None = None
    secret_names: tuple[str, ...] = ()
    teams: tuple[str, ...] = ()
    details: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _cap_names(cls, data: Any) -> Any:
        """Keep at most MAX_NAMES secret names; count the rest in the details."""
        if not isinstance(data, Mapping):
            return data
        names = data.get("secret_names")
        if isinstance(names, list | tuple) and len(names) > MAX_NAMES:
            details = data.get("details")
            if isinstance(details, Mapping) and "secret_names_omitted" not in details:
                data = {
                    **data,
                    "secret_names": tuple(names[:MAX_NAMES]),
                    "details": {**details, "secret_names_omitted": len(names) - MAX_NAMES},
                }
            elif details is None:
                data = {
                    **data,
                    "secret_names": tuple(names[:MAX_NAMES]),
                    "details": {"secret_names_omitted": len(names) - MAX_NAMES},
                }
        return data

    @field_validator("time")
    @classmethod
    def _time_utc(cls, value: datetime) -> datetime:
        return _utc(value)

    @field_validator("details", mode="before")
    @classmethod
    def _details_json(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, Mapping):
            raise AuditEventError("details must be a mapping")
        if _stored(info):
            return value
        return _check_json(value, "details")

    @field_validator("secret_names", "teams", mode="before")
    @classmethod
    def _names(cls, value: object, info: ValidationInfo) -> object:
        if _stored(info) and isinstance(value, list):
            return tuple(value)  # the field's own validation still checks each is a str
        if isinstance(value, str | bytes):
            raise AuditEventError("give a list of names, not one string")
        if isinstance(value, Iterable):
            items = list(value)
            if any(isinstance(item, SecretValue) for item in items):
                raise AuditEventError("names list carries a SecretValue; record names only")
            return tuple(items)
        return value

    @field_serializer("time")
    def _ser_time(self, value: datetime) -> str:
        return format_time(value)

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON data; the exact form that is hashed and stored."""
        return self.model_dump(mode="json")

    def canonical_json(self) -> str:
        return canonical_json(self.to_json_dict())

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> AuditEvent:
        """An event as stored (JSON data read back). The write-time guards (no values,
        no value-like keys, lengths cut) ran when it was made and its hash covers it
        since; only the types are validated again (half the cost of reading a report)."""
        return cls.model_validate(dict(data), context=_STORED)

    def task_key(self) -> tuple[str, str] | None:
        if self.dag_id is None:
            return None
        return (self.dag_id, self.task_id or "")


def format_time(value: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a ``Z``: one spelling per instant."""
    return _utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(data: object) -> str:
    """Sorted keys, no spaces, ASCII only: the same bytes for the same data, always."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


# -- builders: one per kind, fixing the details layout ---------------------------------


def _task_fields(task: TaskIdentity | None) -> dict[str, Any]:
    if task is None:
        return {}
    return {
        "dag_id": task.dag_id,
        "task_id": task.task_id,
        "run_id": task.run_id,
        "try_number": task.try_number,
        "map_index": task.map_index,
    }


def _caller(caller: Caller | str | None) -> str | None:
    return caller.identity if isinstance(caller, Caller) else caller


def launch_requested(
    *,
    launch_id: str,
    caller: Caller | str,
    task: TaskIdentity,
    secret_names: Sequence[str],
    namespace: str | None = None,
    image: str | None = None,
    time: datetime | None = None,
) -> AuditEvent:
    """Written before anything else happens for a launch request."""
    details: dict[str, Any] = {}
    if namespace is not None:
        details["namespace"] = namespace
    if image is not None:
        details["image"] = image
    return AuditEvent(
        time=time or utc_now(),
        kind=EventKind.LAUNCH_REQUESTED,
        launch_id=launch_id,
        caller=_caller(caller),
        **_task_fields(task),
        secret_names=tuple(secret_names),
        details=details,
    )


def decision(
    *,
    launch_id: str | None,
    caller: Caller | str | None,
    task: TaskIdentity,
    secret_names: Sequence[str],
    allowed: bool,
    matched_grants: Mapping[str, Sequence[str]] | Sequence[str] = (),
    reasons: Sequence[str] = (),
    denied: Sequence[str] = (),
    teams: Sequence[str] = (),
    verification: Mapping[str, Any] | None = None,
    time: datetime | None = None,
) -> AuditEvent:
    """The policy decision. ``matched_grants``: grant ids, or secret name -> grant ids;
    ``verification``: how the task instance was checked with Airflow (verdict, ok,
    reason), when it was."""
    grants: object = (
        {k: list(v) for k, v in matched_grants.items()}
        if isinstance(matched_grants, Mapping)
        else list(matched_grants)
    )
    return AuditEvent(
        time=time or utc_now(),
        kind=EventKind.DECISION,
        launch_id=launch_id,
        caller=_caller(caller),
        **_task_fields(task),
        secret_names=tuple(secret_names),
        teams=tuple(teams),
        details={
            "allowed": allowed,
            "matched_grants": grants,
            "reasons": list(reasons),
            "denied": list(denied),
            **({"verification": dict(verification)} if verification is not None else {}),
        },
    )


def secrets_resolved(
    *,
    launch_id: str,
    caller: Caller | str | None,
    task: TaskIdentity,
    secrets: Sequence[Mapping[str, Any]],
    token_accessor: str | None = None,
    teams: Sequence[str] = (),
    time: datetime | None = None,
) -> AuditEvent:
    """Secrets read from Vault for a launch. Each entry of ``secrets``: ``name``, and
    any of ``path``, ``version``, ``lease_id``, ``keys`` (key names, not values)."""
    entries = [dict(entry) for entry in secrets]
    for entry in entries:
        if "name" not in entry:
            raise AuditEventError("each resolved secret entry needs a 'name'")
    details: dict[str, Any] = {"secrets": entries}
    if token_accessor is not None:
        details["token_accessor"] = token_accessor
    return AuditEvent(
        time=time or utc_now(),
        kind=EventKind.SECRETS_RESOLVED,
        launch_id=launch_id,
        caller=_caller(caller),
        **_task_fields(task),
        secret_names=tuple(str(e["name"]) for e in entries),
        teams=tuple(teams),
        details=details,
    )


def launch_event(
    kind: EventKind,
    *,
    launch_id: str | None,
    task: TaskIdentity | None = None,
    caller: Caller | str | None = None,
    secret_names: Sequence[str] = (),
    teams: Sequence[str] = (),
    time: datetime | None = None,
    **details: Any,
) -> AuditEvent:
    """Any other kind. Usual details: secret_created/secret_deleted ``namespace``,
    ``secret``; pod_created ``namespace``, ``pod``; pod_finished ``phase``,
    ``exit_code``; leases_revoked ``lease_ids``; launch_killed ``reason``, ``by``;
    launch_failed ``error``, ``stage``; reconciler_cleanup ``action``, ``object``;
    policy_applied ``source``, ``teams``, ``grants``, ``digest``; lease_renewed and
    lease_capped ``lease_id``, ``grant``, ``ttl``, ``expires_at``; secret_exposed
    ``grant``, ``on_exposure``, ``revoked``, ``where`` (``termination_message`` when
    not the log) (never the value)."""
    return AuditEvent(
        time=time or utc_now(),
        kind=kind,
        launch_id=launch_id,
        caller=_caller(caller),
        **_task_fields(task),
        secret_names=tuple(secret_names),
        teams=tuple(teams),
        details=details,
    )


def request_refused(
    *,
    caller: str | None,
    endpoint: str,
    status: int,
    reason_class: str,
    reason: str,
    count: int,
    first_time: datetime,
    last_time: datetime,
    client: str | None = None,
    time: datetime | None = None,
) -> AuditEvent:
    """Requests refused before any launch work (401, 403 out of scope, 413, 415, 422; a
    log read the leak guard refused, 409 ``log_unmaskable``):
    ``count`` of them by ``caller`` (None when unauthenticated; then ``client`` is the
    peer address) on ``endpoint`` with ``status`` and ``reason_class`` between
    ``first_time`` and ``last_time``; ``reason`` is the first one's message. Never the
    request body."""
    details: dict[str, Any] = {
        "endpoint": endpoint,
        "status": status,
        "reason_class": reason_class,
        "reason": reason,
        "count": count,
        "first_time": format_time(first_time),
        "last_time": format_time(last_time),
    }
    if client is not None:
        details["client"] = client
    return AuditEvent(
        time=time or utc_now(),
        kind=EventKind.REQUEST_REFUSED,
        caller=caller,
        details=details,
    )
