"""Need-to-know policy, all of it pure (no I/O):

- :mod:`.model`: the :class:`PolicySet` (catalog + teams + grants) and each grant's ACL text;
- :mod:`.decision`: :func:`decide`, default deny;
- :mod:`.text`: YAML policy text -> :class:`PolicySet` with ``file:line: field`` issues, and back;
- :mod:`.lint`: semantic checks beyond the schema;
- :mod:`.naming`: every name podbroker uses inside Vault, defined once.

Reading and writing policy folders is the caller's job (``broker.cli.policy_folder``).
"""

from broker.core.policy.decision import Decision, SecretDecision, decide
from broker.core.policy.lint import Finding, is_match_all, lint_policy
from broker.core.policy.model import (
    GLOB_PATTERN,
    GRANT_ID_PATTERN,
    MOUNT_PATTERN,
    TEAM_PATTERN,
    VAULT_PATH_PATTERN,
    CatalogEntry,
    Constraints,
    DatabaseSecret,
    Grant,
    KvSecret,
    PolicySet,
    Team,
    grant_acl_hcl,
)
from broker.core.policy.naming import GRANT_POLICY_PREFIX, grant_full_id, grant_policy_name
from broker.core.policy.text import (
    ParsedPolicy,
    PolicyFileError,
    PolicyIssue,
    parse_policy_texts,
    render_policy_texts,
)

__all__ = [
    "GLOB_PATTERN",
    "GRANT_ID_PATTERN",
    "GRANT_POLICY_PREFIX",
    "MOUNT_PATTERN",
    "TEAM_PATTERN",
    "VAULT_PATH_PATTERN",
    "CatalogEntry",
    "Constraints",
    "DatabaseSecret",
    "Decision",
    "Finding",
    "Grant",
    "KvSecret",
    "ParsedPolicy",
    "PolicyFileError",
    "PolicyIssue",
    "PolicySet",
    "SecretDecision",
    "Team",
    "decide",
    "grant_acl_hcl",
    "grant_full_id",
    "grant_policy_name",
    "is_match_all",
    "lint_policy",
    "parse_policy_texts",
    "render_policy_texts",
]
