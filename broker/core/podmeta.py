"""Every ``podbroker.dev/*`` label and annotation the broker writes on its pods and
Secrets, with the one encoder and decoder of each. Nothing else spells these keys.

Labels select (managed-by, launch id); annotations carry what cleanup and status need
to know later: which secrets a pod asked for, who launched it, the full task identity
(labels are truncated), and on the Secret where each value came from in Vault and what
must be revoked when the pod ends. None of them ever holds a value."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from broker.core.models import TaskIdentity

MANAGED_BY_LABEL = "podbroker.dev/managed-by"
MANAGED_BY_VALUE = "podbroker"
LAUNCH_ID_LABEL = "podbroker.dev/launch-id"
MANAGED_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"
RESERVED_PREFIX = "podbroker.dev/"

SECRET_NAMES_ANNOTATION = "podbroker.dev/secret-names"
CALLER_ANNOTATION = "podbroker.dev/caller"
TASK_ANNOTATION = "podbroker.dev/task"
REQUEST_DIGEST_ANNOTATION = "podbroker.dev/request-digest"
CLEANED_ANNOTATION = "podbroker.dev/cleaned-at"
RESULT_CHECK_ANNOTATION = "podbroker.dev/termination-message"
"""On a finished pod of a launch with secrets, written with the claim: ``clean`` when no
container's termination message holds a value issued to the launch, ``withheld`` when
one does (or the values were gone before they could be compared)."""
SECRET_SOURCES_ANNOTATION = "podbroker.dev/secret-sources"
LEASES_ANNOTATION = "podbroker.dev/lease-ids"
ACCESSOR_ANNOTATION = "podbroker.dev/token-accessor"
GRACE_ANNOTATION = "podbroker.dev/termination-grace-seconds"
"""On a pod whose request asked for a termination grace period: the broker deletes it
with that grace period (otherwise at once)."""


def is_reserved(key: str) -> bool:
    """True for keys only the broker may set (requests and templates may not)."""
    return key.startswith(RESERVED_PREFIX)


def selector_for(launch_id: str | None = None, labels: Mapping[str, str] | None = None) -> str:
    """Label selector of the broker's objects, optionally of one launch or with more
    labels (the task's, to find its other tries)."""
    parts = [MANAGED_SELECTOR]
    if launch_id is not None:
        parts.append(f"{LAUNCH_ID_LABEL}={launch_id}")
    parts.extend(f"{key}={value}" for key, value in sorted((labels or {}).items()))
    return ",".join(parts)


# -- pod ---------------------------------------------------------------------------------


def pod_annotations(
    secret_names: Sequence[str],
    caller_identity: str,
    task: TaskIdentity,
    request_digest: str | None,
    grace_seconds: int | None = None,
) -> dict[str, str]:
    annotations = {
        SECRET_NAMES_ANNOTATION: ",".join(secret_names),
        CALLER_ANNOTATION: caller_identity,
        TASK_ANNOTATION: task.model_dump_json(),
    }
    if request_digest is not None:
        annotations[REQUEST_DIGEST_ANNOTATION] = request_digest
    if grace_seconds is not None:
        annotations[GRACE_ANNOTATION] = str(grace_seconds)
    return annotations


def grace_seconds_of(annotations: Mapping[str, str]) -> int:
    """The grace period the broker deletes a pod with: the one its request asked for,
    else 0 (at once)."""
    try:
        return max(0, int(annotations.get(GRACE_ANNOTATION, "0")))
    except ValueError:
        return 0


def request_digest_of(annotations: Mapping[str, str]) -> str | None:
    """The digest of the request that made a pod (None on pods made before it existed)."""
    return annotations.get(REQUEST_DIGEST_ANNOTATION) or None


def secret_names_of(annotations: Mapping[str, str]) -> list[str]:
    return [n for n in annotations.get(SECRET_NAMES_ANNOTATION, "").split(",") if n]


def task_of(labels: Mapping[str, str], annotations: Mapping[str, str]) -> TaskIdentity:
    """The task identity from the annotation, or (for pods made before it existed, or
    with a damaged annotation) the best that the truncated labels can tell."""
    raw = annotations.get(TASK_ANNOTATION)
    if raw:
        try:
            return TaskIdentity.model_validate_json(raw)
        except ValidationError:
            pass
    return TaskIdentity(
        dag_id=labels.get("dag_id") or "unknown",
        task_id=labels.get("task_id") or "unknown",
        run_id=labels.get("run_id") or "unknown",
        try_number=_int(labels.get("try_number"), 0),
        map_index=_int(labels.get("map_index"), -1),
    )


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _utc_stamp(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_stamp(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def claim_annotations(now: dt.datetime, result_check: str | None = None) -> dict[str, str]:
    """What a replica writes on a finished pod to own its cleanup; with the verdict of
    the termination-message leak guard (``clean`` / ``withheld``) when there is one."""
    annotations = {CLEANED_ANNOTATION: _utc_stamp(now)}
    if result_check is not None:
        annotations[RESULT_CHECK_ANNOTATION] = result_check
    return annotations


def result_check_of(annotations: Mapping[str, str]) -> str | None:
    """The leak guard's verdict on a claimed pod's termination messages, if written."""
    return annotations.get(RESULT_CHECK_ANNOTATION)


def cleaned_at(annotations: Mapping[str, str]) -> dt.datetime | None:
    raw = annotations.get(CLEANED_ANNOTATION)
    return parse_stamp(raw) if raw else None


def is_claimed(annotations: Mapping[str, str]) -> bool:
    return bool(annotations.get(CLEANED_ANNOTATION))


# -- Secret ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretSource:
    """Where one delivered secret came from (no value)."""

    name: str
    path: str
    version: int | None


@dataclass(frozen=True)
class VaultHoldings:
    """What a launch holds in Vault and must give back: lease ids and the child token's
    accessor. An accessor can revoke its token but not use it (safe to keep)."""

    lease_ids: tuple[str, ...] = ()
    token_accessor: str | None = None

    def __bool__(self) -> bool:
        return bool(self.lease_ids or self.token_accessor)


def secret_annotations(sources: Sequence[SecretSource], holdings: VaultHoldings) -> dict[str, str]:
    return {
        SECRET_NAMES_ANNOTATION: ",".join(sorted(s.name for s in sources)),
        SECRET_SOURCES_ANNOTATION: json.dumps(
            [{"name": s.name, "path": s.path, "version": s.version} for s in sources],
            separators=(",", ":"),
        ),
        LEASES_ANNOTATION: ",".join(holdings.lease_ids),
        ACCESSOR_ANNOTATION: holdings.token_accessor or "",
    }


def holdings_of(annotations: Mapping[str, str]) -> VaultHoldings:
    leases = tuple(x for x in annotations.get(LEASES_ANNOTATION, "").split(",") if x)
    return VaultHoldings(leases, annotations.get(ACCESSOR_ANNOTATION) or None)
