"""The argument types KubernetesPodOperator users pass, turned into the broker's request
models: plain dicts (camelCase or snake_case keys) and ``kubernetes.client`` model objects
(``V1EnvVar``, ``V1ResourceRequirements``, ``V1Toleration``, ``V1Affinity``).

The Airflow side never imports ``kubernetes`` (import-linter contract), so model objects
are recognised by duck typing: ``to_dict()`` (snake_case attributes) and, for affinity,
``attribute_map`` (the attribute -> Kubernetes JSON key table every generated model has).
Anything the broker cannot honour is refused with a ValueError naming it; nothing is
silently dropped or turned into an empty string."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from broker.core.api_models import ResourceRequirements, Toleration

_CAMEL_BOUNDARY = re.compile(r"(?<!^)(?=[A-Z])")


def _camel_to_snake(data: Mapping[str, Any]) -> dict[str, Any]:
    return {_CAMEL_BOUNDARY.sub("_", str(k)).lower(): v for k, v in data.items()}


def _as_dict(item: Any, what: str) -> dict[str, Any]:
    """A mapping as is, a kubernetes model through ``to_dict()`` (snake_case keys)."""
    if isinstance(item, Mapping):
        return dict(item)
    to_dict = getattr(item, "to_dict", None)
    if callable(to_dict):
        value = to_dict()
        if isinstance(value, Mapping):
            return dict(value)
    raise ValueError(
        f"{what}: expected a dict or a kubernetes.client model, got {type(item).__name__}"
    )


def env_dict(env_vars: Mapping[str, Any] | Sequence[Any] | None) -> dict[str, str]:
    """``env_vars`` as name -> value: a dict, or KPO-style ``[{"name", "value"}]`` /
    ``V1EnvVar`` items. A variable with ``valueFrom`` (fieldRef, resourceFieldRef,
    secretKeyRef, configMapKeyRef) is refused: the broker offers no downward API, and
    secrets come through ``secrets=``."""
    if env_vars is None:
        return {}
    if isinstance(env_vars, Mapping):
        return {str(k): "" if v is None else str(v) for k, v in env_vars.items()}
    if isinstance(env_vars, str):
        raise ValueError("env_vars must be a dict or a list of {name, value} items")
    result: dict[str, str] = {}
    for index, item in enumerate(env_vars):
        entry = _camel_to_snake(_as_dict(item, f"env_vars[{index}]"))
        name = entry.get("name")
        if not name:
            raise ValueError(f"env_vars[{index}] has no name")
        source = entry.get("value_from")
        if source:
            kinds = ", ".join(
                sorted(
                    _CAMEL_BOUNDARY.sub("_", str(k)).lower()
                    for k, v in _as_dict(source, f"env_vars[{index}].value_from").items()
                    if v
                )
            )
            raise ValueError(
                f"env var {name} uses valueFrom ({kinds or 'empty'}): the broker does not "
                "support the downward API or references; pass a literal value, or name a "
                "secret in secrets="
            )
        value = entry.get("value")
        result[str(name)] = "" if value is None else str(value)
    return result


def resources(value: ResourceRequirements | Mapping[str, Any] | Any | None) -> ResourceRequirements:
    """``container_resources``: a dict, ``V1ResourceRequirements`` or the model itself.
    Dynamic resource ``claims`` are refused (no such field in the broker's pods)."""
    if value is None:
        return ResourceRequirements()
    if isinstance(value, ResourceRequirements):
        return value
    data = _as_dict(value, "container_resources")
    if data.get("claims"):
        raise ValueError("container_resources.claims (dynamic resource claims) is not supported")
    return ResourceRequirements(
        requests={str(k): str(v) for k, v in (data.get("requests") or {}).items()},
        limits={str(k): str(v) for k, v in (data.get("limits") or {}).items()},
    )


def tolerations(values: Sequence[Toleration | Mapping[str, Any] | Any] | None) -> list[Toleration]:
    """``tolerations``: dicts (camelCase or snake_case keys), ``V1Toleration`` objects
    or the model itself. Unset fields (None) are left out."""
    result = []
    for index, item in enumerate(values or ()):
        if isinstance(item, Toleration):
            result.append(item)
            continue
        data = _camel_to_snake(_as_dict(item, f"tolerations[{index}]"))
        result.append(Toleration.model_validate({k: v for k, v in data.items() if v is not None}))
    return result


def api_json(value: Any) -> Any:
    """A kubernetes.client model (or a dict/list holding them) as Kubernetes API JSON,
    camelCase keys, unset fields left out: what ``ApiClient.sanitize_for_serialization``
    gives, without importing kubernetes."""
    attribute_map = getattr(type(value), "attribute_map", None)
    if isinstance(attribute_map, Mapping) and hasattr(value, "to_dict"):
        return {
            str(key): api_json(getattr(value, attr))
            for attr, key in attribute_map.items()
            if getattr(value, attr, None) is not None
        }
    if isinstance(value, Mapping):
        return {str(k): api_json(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [api_json(v) for v in value]
    return value


def affinity_dict(value: Mapping[str, Any] | Any | None) -> dict[str, Any] | None:
    """``affinity``: a dict in Kubernetes API form or a ``V1Affinity``, as API JSON."""
    if value is None:
        return None
    if not isinstance(value, Mapping) and not hasattr(value, "to_dict"):
        raise ValueError(f"affinity: expected a dict or V1Affinity, got {type(value).__name__}")
    data = api_json(value)
    return data or None
