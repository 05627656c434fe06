"""How DAG authors name the secrets a task needs. Names only: values never pass through
Airflow. Parsed when the DAG file is parsed, so a typo fails at parse time (and in
``podbroker policies check-dags``), not when the pod starts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from broker.core.models import EnvDelivery, FileDelivery, SecretRequest

SecretSpec = str | SecretRequest | Mapping[str, Any]


def env_secret(
    name: str, *, prefix: str | None = None, mapping: Mapping[str, str] | None = None
) -> SecretRequest:
    """Deliver secret ``name`` as environment variables: each key upper-cased behind
    ``prefix``, or exactly as ``mapping`` (key -> variable) says."""
    return SecretRequest(
        name=name,
        delivery=EnvDelivery(prefix=prefix, mapping=dict(mapping) if mapping else None),
    )


def file_secret(name: str, *, mount_path: str) -> SecretRequest:
    """Deliver secret ``name`` as read-only files (one per key) under ``mount_path``."""
    return SecretRequest(name=name, delivery=FileDelivery(mount_path=mount_path))


def parse_secrets(specs: Iterable[SecretSpec] | None) -> tuple[SecretRequest, ...]:
    """Normalise ``secrets=`` (names, SecretRequest objects or their dict form).

    Raises ValueError naming the offending entry; a secret named twice is an error."""
    if specs is None:
        return ()
    if isinstance(specs, str | Mapping):
        raise ValueError("secrets must be a list, e.g. secrets=['warehouse-db']")
    parsed: list[SecretRequest] = []
    for index, spec in enumerate(specs):
        try:
            if isinstance(spec, SecretRequest):
                request = spec
            elif isinstance(spec, str):
                request = SecretRequest(name=spec)
            elif isinstance(spec, Mapping):
                request = SecretRequest.model_validate(dict(spec))
            else:
                raise ValueError(
                    f"expected a name, a dict or SecretRequest, got {type(spec).__name__}"
                )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ValueError(f"secrets[{index}] is invalid: {problems}") from None
        except ValueError as exc:
            raise ValueError(f"secrets[{index}] is invalid: {exc}") from None
        parsed.append(request)
    names = [r.name for r in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"secrets named more than once: {', '.join(duplicates)}")
    return tuple(parsed)
