"""Glue between the store, the policies and the pure report computation."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

from broker.audit.store import AuditStore
from broker.core.report import GrantRef, ReportFilters, UsageReport, compute_report
from broker.errors import InvalidRequestError


class _GrantLike(Protocol):
    dags: str
    tasks: str | None
    secrets: tuple[str, ...]


class _PolicyLike(Protocol):
    def grants(self) -> list[tuple[str, Any]]: ...


def grant_refs_from_policy(policy: _PolicyLike) -> list[GrantRef]:
    """Adapt ``broker.core.policy.PolicySet`` (``grants()`` -> ``(team/grant, Grant)``)."""
    refs = []
    for full_id, grant in policy.grants():
        team = full_id.partition("/")[0]
        refs.append(GrantRef(full_id, team, grant.dags, grant.tasks, tuple(grant.secrets)))
    return refs


def _grants_of(doc: Any, source: str) -> list[GrantRef]:
    """Grants from one policy document: ``{teams: {TEAM: {grants: [...]}}}`` or
    ``{team: TEAM, grants: [...]}``; each grant ``{id, dags, tasks?, secrets}``."""
    if not isinstance(doc, dict):
        return []
    teams: dict[str, Any] = {}
    if isinstance(doc.get("teams"), dict):
        teams = doc["teams"]
    elif isinstance(doc.get("team"), str):
        teams = {doc["team"]: doc}
    refs = []
    for team, body in teams.items():
        grants = (body or {}).get("grants", []) if isinstance(body, dict) else []
        for i, grant in enumerate(grants):
            try:
                refs.append(
                    GrantRef(
                        f"{team}/{grant['id']}",
                        str(team),
                        str(grant["dags"]),
                        None if grant.get("tasks") is None else str(grant["tasks"]),
                        tuple(str(s) for s in grant["secrets"]),
                    )
                )
            except (KeyError, TypeError):
                raise InvalidRequestError(
                    f"{source}: team {team} grant #{i + 1} needs id, dags and secrets"
                ) from None
    return refs


def load_grant_refs(folder: str | Path) -> list[GrantRef]:
    """Every grant in the policy files (``*.yaml``, ``*.yml``, ``*.json``) under ``folder``."""
    root = Path(folder)
    if not root.is_dir():
        raise InvalidRequestError(f"{root}: not a policy folder")
    refs: list[GrantRef] = []
    for path in sorted(p for p in root.rglob("*") if p.suffix in {".yaml", ".yml", ".json"}):
        try:
            text = path.read_text()
            docs = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise InvalidRequestError(f"{path}{line}: cannot read policy file") from None
        for doc in docs:
            refs.extend(_grants_of(doc, str(path)))
    return refs


def build_report(
    store: AuditStore,
    grants: Iterable[GrantRef] = (),
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    filters: ReportFilters | None = None,
) -> UsageReport:
    """Read every record (first-time uses need history before ``since``) and compute."""
    return compute_report(
        store.events(), grants, window_start=since, window_end=until, filters=filters
    )
