"""A folder of policy files <-> :class:`~broker.core.policy.PolicySet`: reads every
``*.yaml``/``*.yml`` file under the folder (recursively, sorted by path) and hands the
texts to :func:`broker.core.policy.parse_policy_texts`; writes what
:func:`broker.core.policy.render_policy_texts` renders. The format and every check live
in core; this module only touches the file system."""

from __future__ import annotations

from pathlib import Path

from broker.core.policy import (
    ParsedPolicy,
    PolicyIssue,
    PolicySet,
    parse_policy_texts,
    render_policy_texts,
)
from broker.errors import InvalidRequestError


def read_policy_dir(folder: Path | str) -> ParsedPolicy:
    """Parse and validate every policy file under ``folder``; files that cannot be read
    and a folder without policy files are errors with the rest."""
    root = Path(folder)
    if not root.is_dir():
        raise InvalidRequestError(f"{root}: not a folder of policy files")
    files = policy_files(root)
    unreadable: list[PolicyIssue] = []
    if not files:
        unreadable.append(PolicyIssue("error", str(root), 1, "", "no *.yaml policy files found"))
    documents: list[tuple[str, str]] = []
    for file in files:
        try:
            documents.append((str(file), file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            unreadable.append(PolicyIssue("error", str(file), 1, "", f"cannot read: {exc}"))
    return parse_policy_texts(documents, errors=unreadable)


def policy_files(folder: Path | str) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` file under ``folder``, sorted by path."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_policy_dir(folder: Path | str) -> PolicySet:
    """The validated policy in ``folder``; raises
    :class:`~broker.core.policy.PolicyFileError` (an InvalidRequestError) listing every
    schema error and every lint error."""
    return read_policy_dir(folder).validated()


def lint_policy_dir(folder: Path | str) -> list[PolicyIssue]:
    """Schema errors, then (when the schema is fine) lint errors and warnings."""
    return read_policy_dir(folder).lint()


def write_policy_dir(policy: PolicySet, folder: Path | str) -> list[Path]:
    """Write ``policy`` as files under ``folder`` (created); returns the files written.
    Existing YAML files there that this policy does not produce are left alone."""
    root = Path(folder)
    written: list[Path] = []
    for relative, text in render_policy_texts(policy).items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        written.append(target)
    return written
