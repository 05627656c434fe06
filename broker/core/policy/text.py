"""Policy text <-> :class:`~broker.core.policy.PolicySet`, with issues that name
``file:line: field`` (pure: the caller reads and writes the files).

Each text is one YAML document, named by the file it came from, of one of two kinds::

    kind: catalog                 # logical secret name -> where it lives in Vault
    secrets:
      warehouse-readonly: {type: kv, mount: secret, path: analytics/warehouse,
                           keys: [username, password], version: 3, sensitive: true}
      orders-db: {type: database, mount: database, role: orders-readonly}

    kind: team                    # one team's grants (default deny)
    team: analytics
    grants:
      - id: warehouse-etl
        dags: "analytics_*"       # fnmatch glob on dag_id
        tasks: "load_*"           # optional glob on task_id
        secrets: [warehouse-readonly]
        constraints: {delivery: env, max_lease_ttl: 900}

Secret names must be unique across catalog files, team names across team files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from broker.core.policy.lint import Where, lint_policy
from broker.core.policy.model import PolicySet
from broker.errors import InvalidRequestError

EXPORT_HEADER = "# exported by `podbroker policies export`\n"

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class PolicyIssue:
    """One problem in the policy files, printable as ``file:line: field: message``."""

    severity: Literal["error", "warning"]
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        field = f" {self.field}:" if self.field else ""
        return f"{self.file}:{self.line}:{field} {self.message}"


class PolicyFileError(InvalidRequestError):
    """The policy files are malformed; ``issues`` lists every error with file:line."""

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        lines = "\n".join(str(issue) for issue in issues)
        super().__init__(f"invalid policy files:\n{lines}")
        self.issues = list(issues)


@dataclass(frozen=True)
class _Origin:
    file: str
    line: int
    field: str


def _field_text(path: KeyPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# libyaml's parser when PyYAML was built with it (the wheels are): same nodes and marks,
# several times faster on a big policy folder.
_SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Builder:
    """Turns YAML nodes into plain data while remembering where every value came from."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.origins: dict[KeyPath, _Origin] = {}
        self.errors: list[PolicyIssue] = []
        # Builds a scalar from its already-resolved node; re-serialising and re-parsing
        # each scalar made 10,000 grants take 36 s to read (docs/benchmarks.md).
        self._scalars = yaml.constructor.SafeConstructor()

    def _scalar(self, node: yaml.Node) -> Any:
        return self._scalars.construct_document(node)

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        self.origins[path] = _Origin(self.file, node.start_mark.line + 1, _field_text(path))
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalar(key_node) if key_node.tag else None
                if not isinstance(key, str | int) or isinstance(key, bool):
                    self._error(key_node, path, "mapping keys must be strings")
                    continue
                if key in result:
                    self._error(key_node, (*path, key), f"duplicate key {key!r}")
                    continue
                result[key] = self.build(value_node, (*path, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._scalar(node)

    def _error(self, node: yaml.Node, path: KeyPath, message: str) -> None:
        self.errors.append(
            PolicyIssue("error", self.file, node.start_mark.line + 1, _field_text(path), message)
        )


@dataclass
class ParsedPolicy:
    """The merged policy (``None`` when any error was found) plus where each part came
    from, for file:line messages."""

    policy: PolicySet | None
    errors: list[PolicyIssue]
    origins: dict[KeyPath, _Origin]
    files: list[str]

    def locate(self, where: Where, severity: Literal["error", "warning"], msg: str) -> PolicyIssue:
        """The issue for a key path in PolicySet space; parts unknown to the files
        (pydantic union tags, missing fields) are skipped so the nearest line is used."""
        found: KeyPath = ()
        missing: list[str] = []
        for part in where:
            candidate = (*found, part)
            if candidate in self.origins:
                found = candidate
            elif isinstance(part, str) and part not in ("kv", "database"):
                missing.append(part)
        origin = self.origins.get(found)
        if origin is None:
            return PolicyIssue(severity, self.files[0] if self.files else "?", 1, "", msg)
        field = origin.field + ("." if origin.field and missing else "") + ".".join(missing)
        return PolicyIssue(severity, origin.file, origin.line, field, msg)

    def lint(self) -> list[PolicyIssue]:
        """Schema errors; when the schema is fine, lint errors and warnings instead."""
        if self.policy is None:
            return self.errors
        return [self.locate(f.where, f.severity, f.message) for f in lint_policy(self.policy)]

    def validated(self) -> PolicySet:
        """The policy, or :class:`PolicyFileError` listing every schema error, or (when
        the schema is fine) every lint error."""
        if self.policy is None:
            raise PolicyFileError(self.errors)
        lint_errors = [issue for issue in self.lint() if issue.severity == "error"]
        if lint_errors:
            raise PolicyFileError(lint_errors)
        return self.policy


def parse_policy_texts(
    documents: Iterable[tuple[str, str]], *, errors: Sequence[PolicyIssue] = ()
) -> ParsedPolicy:
    """Parse and validate policy documents given as ``(file name, text)`` pairs, in the
    given order; collects all errors (YAML syntax, duplicates, schema) instead of stopping
    at the first. ``errors`` are problems the caller found before parsing (a file it
    could not read); they are kept in front and make the result invalid too."""
    found = list(errors)
    origins: dict[KeyPath, _Origin] = {}
    merged: dict[str, Any] = {"catalog": {}, "teams": {}}
    files: list[str] = []
    for file, text in documents:
        files.append(file)
        try:
            node = yaml.compose(text, Loader=_SAFE_LOADER)
        except yaml.MarkedYAMLError as exc:
            line = exc.problem_mark.line + 1 if exc.problem_mark else 1
            found.append(PolicyIssue("error", file, line, "", f"YAML: {exc.problem}"))
            continue
        if node is None:
            continue  # an empty document
        builder = _Builder(file)
        data = builder.build(node, ())
        found.extend(builder.errors)
        if not isinstance(data, dict):
            found.append(PolicyIssue("error", file, 1, "", "a policy file must be a mapping"))
            continue
        _merge_document(data, builder, merged, origins, found)
    parsed = ParsedPolicy(None, found, origins, files)
    try:
        policy = PolicySet.model_validate(merged)
    except ValidationError as exc:
        for item in exc.errors(include_input=False, include_url=False):
            found.append(parsed.locate(tuple(item["loc"]), "error", item["msg"]))
    else:
        parsed.policy = policy if not found else None
    return parsed


def _merge_document(
    data: dict[str, Any],
    builder: _Builder,
    merged: dict[str, Any],
    origins: dict[KeyPath, _Origin],
    errors: list[PolicyIssue],
) -> None:
    file = builder.file
    kind = data.get("kind")

    def at(path: KeyPath) -> int:
        origin = builder.origins.get(path)
        return origin.line if origin else 1

    def allow_only(keys: set[str]) -> None:
        for extra in sorted(set(map(str, data)) - keys):
            errors.append(PolicyIssue("error", file, at((extra,)), extra, "unknown field"))

    if kind == "catalog":
        allow_only({"kind", "secrets"})
        origins.setdefault(("catalog",), _Origin(file, at(("secrets",)), "secrets"))
        secrets = data.get("secrets") or {}
        if not isinstance(secrets, dict):
            errors.append(
                PolicyIssue("error", file, at(("secrets",)), "secrets", "must be a mapping")
            )
            return
        for name, entry in secrets.items():
            if name in merged["catalog"]:
                first = origins[("catalog", name)]
                errors.append(
                    PolicyIssue(
                        "error",
                        file,
                        at(("secrets", name)),
                        f"secrets.{name}",
                        f"duplicate secret name {name!r} "
                        f"(first defined at {first.file}:{first.line})",
                    )
                )
                continue
            merged["catalog"][name] = entry
            _rebase(builder.origins, ("secrets", name), ("catalog", name), origins)
    elif kind == "team":
        allow_only({"kind", "team", "description", "grants"})
        team = data.get("team")
        if not isinstance(team, str) or not team:
            errors.append(
                PolicyIssue("error", file, at(("team",)), "team", "a team name is required")
            )
            return
        if team in merged["teams"]:
            first = origins[("teams", team)]
            errors.append(
                PolicyIssue(
                    "error",
                    file,
                    at(("team",)),
                    "team",
                    f"duplicate team {team!r} (first defined at {first.file}:{first.line})",
                )
            )
            return
        origins.setdefault(("teams",), _Origin(file, at(("team",)), "team"))
        body = {k: data[k] for k in ("description", "grants") if k in data}
        merged["teams"][team] = body
        origins[("teams", team)] = _Origin(file, at(("team",)), "team")
        for key in ("description", "grants"):
            _rebase(builder.origins, (key,), ("teams", team, key), origins)
    else:
        errors.append(
            PolicyIssue("error", file, at(("kind",)), "kind", "kind must be 'catalog' or 'team'")
        )


def _rebase(
    source: dict[KeyPath, _Origin], old: KeyPath, new: KeyPath, target: dict[KeyPath, _Origin]
) -> None:
    for path, origin in source.items():
        if path[: len(old)] == old:
            target[(*new, *path[len(old) :])] = origin


def policy_documents(policy: PolicySet) -> dict[str, dict[str, Any]]:
    """The policy as file documents: ``catalog.yaml`` and ``teams/<team>.yaml``."""
    docs: dict[str, dict[str, Any]] = {}
    secrets: dict[str, Any] = {}
    for name in sorted(policy.catalog):
        entry = policy.catalog[name]
        body = entry.model_dump(mode="json", exclude_defaults=True)
        secrets[name] = {"type": entry.type, **body}
        if entry.sensitive != type(entry).model_fields["sensitive"].default:
            secrets[name]["sensitive"] = entry.sensitive
    docs["catalog.yaml"] = {"kind": "catalog", "secrets": secrets}
    for team_name in sorted(policy.teams):
        team = policy.teams[team_name]
        doc: dict[str, Any] = {"kind": "team", "team": team_name}
        if team.description:
            doc["description"] = team.description
        doc["grants"] = [g.model_dump(mode="json", exclude_defaults=True) for g in team.grants]
        docs[f"teams/{team_name}.yaml"] = doc
    return docs


def render_policy_texts(policy: PolicySet) -> dict[str, str]:
    """The policy as file texts by relative path (``catalog.yaml``,
    ``teams/<team>.yaml``), for ``policies export``; parsing them gives ``policy`` back."""
    return {
        relative: EXPORT_HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
        for relative, doc in policy_documents(policy).items()
    }
