"""The report's proposed removals (grants, or secrets of grants, unused in its window)
as edits to the policy files, keeping comments, quoting and layout: a YAML round trip
with ruamel.yaml touches only the grants it edits. ``podbroker policies propose`` writes
the result and prints a unified diff for review."""

from __future__ import annotations

import difflib
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from broker.core.report import UnusedGrant


@dataclass(frozen=True)
class Removal:
    """Remove ``secrets`` from grant ``grant`` of ``team``, or the whole grant."""

    team: str
    grant: str
    secrets: tuple[str, ...]
    whole_grant: bool

    @property
    def full_id(self) -> str:
        return f"{self.team}/{self.grant}"

    def __str__(self) -> str:
        if self.whole_grant:
            return f"remove grant {self.full_id}"
        return f"remove {', '.join(self.secrets)} from grant {self.full_id}"


def removals_from_report(unused: Iterable[UnusedGrant]) -> list[Removal]:
    """The report's proposals; grant ids there are ``team/grant``."""
    out: list[Removal] = []
    for grant in unused:
        team, _, grant_id = grant.grant_id.partition("/")
        out.append(
            Removal(
                team=grant.team or team,
                grant=grant_id or grant.grant_id,
                secrets=tuple(grant.unused_secrets),
                whole_grant=grant.remove_grant,
            )
        )
    return out


@dataclass
class FileEdit:
    path: Path
    before: str
    after: str
    applied: list[Removal] = field(default_factory=list)

    def diff(self, root: Path) -> str:
        name = (
            str(self.path.relative_to(root)) if self.path.is_relative_to(root) else str(self.path)
        )
        return "".join(
            difflib.unified_diff(
                self.before.splitlines(keepends=True),
                self.after.splitlines(keepends=True),
                fromfile=f"a/{name}",
                tofile=f"b/{name}",
            )
        )


@dataclass
class Proposal:
    edits: list[FileEdit]
    not_found: list[Removal]


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line
    yaml.indent(mapping=2, sequence=4, offset=2)  # the layout of the example files
    return yaml


def _apply(doc: Any, removals: Sequence[Removal]) -> list[Removal]:
    """Edit one parsed document in place; returns the removals it applied."""
    if not isinstance(doc, CommentedMap) or doc.get("kind") != "team":
        return []
    grants = doc.get("grants")
    if not isinstance(grants, CommentedSeq):
        return []
    applied: list[Removal] = []
    for removal in removals:
        if doc.get("team") != removal.team:
            continue
        for index, grant in enumerate(grants):
            if not isinstance(grant, CommentedMap) or grant.get("id") != removal.grant:
                continue
            secrets = grant.get("secrets")
            remaining = (
                [s for s in secrets if s not in removal.secrets]
                if isinstance(secrets, CommentedSeq)
                else []
            )
            if removal.whole_grant or not remaining:
                del grants[index]
            else:
                assert isinstance(secrets, CommentedSeq)
                for position in reversed(range(len(secrets))):
                    if secrets[position] in removal.secrets:
                        del secrets[position]
            applied.append(removal)
            break
    if applied and not grants:
        # An empty block list cannot keep its comments: write `grants: []`.
        empty = CommentedSeq()
        empty.fa.set_flow_style()
        doc["grants"] = empty
        doc.ca.items.pop("grants", None)
    return applied


def propose(files: Sequence[Path], removals: Sequence[Removal]) -> Proposal:
    """Apply ``removals`` to the texts of ``files`` (not written here)."""
    yaml = _yaml()
    edits: list[FileEdit] = []
    done: set[Removal] = set()
    for path in files:
        before = path.read_text(encoding="utf-8")
        docs = list(yaml.load_all(before))
        applied = [r for doc in docs for r in _apply(doc, [r for r in removals if r not in done])]
        if not applied:
            continue
        done.update(applied)
        out = io.StringIO()
        yaml.explicit_start = before.lstrip().startswith("---")
        if len(docs) == 1:
            yaml.dump(docs[0], out)
        else:
            yaml.dump_all(docs, out)
        edits.append(FileEdit(path, before, out.getvalue(), applied))
    return Proposal(edits=edits, not_found=[r for r in removals if r not in done])
