"""Semantic checks of a :class:`PolicySet` beyond its schema (pure).

Errors block ``policies apply``; warnings are listed. Each finding carries a ``where``
key path (e.g. ``("teams", "analytics", "grants", 0, "secrets", 1)``) that the text
parser (:mod:`broker.core.policy.text`) turns into ``file:line``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from broker.core.policy.model import PolicySet

Where = tuple[str | int, ...]


@dataclass(frozen=True)
class Finding:
    severity: Literal["error", "warning"]
    where: Where
    message: str


def is_match_all(glob: str) -> bool:
    """True for globs that match every DAG id (``*``, ``**``, ``*?*``...)."""
    return "*" in glob and set(glob) <= {"*", "?"}


def has_digest_glob(image_glob: str) -> bool:
    """True when the digest part (after ``@``) holds a glob character: such a pattern
    matches whatever digest the repository gets next, so it pins nothing."""
    _, at, digest = image_glob.partition("@")
    return bool(at) and any(c in digest for c in "*?[")


def lint_policy(policy: PolicySet) -> list[Finding]:
    """Grants naming unknown secrets (error), duplicate grant ids in a team (error),
    duplicate secrets within a grant (warning), match-all DAG globs on sensitive secrets
    (error: over-broad), catalog secrets no grant uses (warning), dynamic-credential
    grants without ``max_lease_ttl`` (warning), ``max_lease_ttl`` on grants without
    dynamic secrets (warning), image globs that match every image or list none (error),
    sensitive secrets given to images by tag or by a digest glob (``@sha256:*``) instead
    of an exact digest (warning: neither pins the image)."""
    findings: list[Finding] = []
    used: set[str] = set()
    for team_name, team in sorted(policy.teams.items()):
        seen_ids: set[str] = set()
        for index, grant in enumerate(team.grants):
            base: Where = ("teams", team_name, "grants", index)
            if grant.id in seen_ids:
                findings.append(
                    Finding("error", (*base, "id"), f"duplicate grant id {team_name}/{grant.id}")
                )
            seen_ids.add(grant.id)
            seen_secrets: set[str] = set()
            has_dynamic = False
            for position, name in enumerate(grant.secrets):
                where = (*base, "secrets", position)
                if name in seen_secrets:
                    findings.append(Finding("warning", where, f"secret {name!r} listed twice"))
                seen_secrets.add(name)
                entry = policy.catalog.get(name)
                if entry is None:
                    findings.append(Finding("error", where, f"grant names unknown secret {name!r}"))
                    continue
                used.add(name)
                has_dynamic = has_dynamic or entry.type == "database"
                if entry.sensitive and is_match_all(grant.dags) and grant.tasks is None:
                    findings.append(
                        Finding(
                            "error",
                            (*base, "dags"),
                            f"over-broad grant {team_name}/{grant.id}: dags {grant.dags!r} "
                            f"gives sensitive secret {name!r} to every DAG",
                        )
                    )
            sensitive = any(
                (entry := policy.catalog.get(n)) is not None and entry.sensitive
                for n in grant.secrets
            )
            for position, glob in enumerate(grant.images or ()):
                where = (*base, "images", position)
                if is_match_all(glob):
                    findings.append(
                        Finding("error", where, f"image glob {glob!r} matches every image")
                    )
                elif sensitive and has_digest_glob(glob):
                    findings.append(
                        Finding(
                            "warning",
                            where,
                            f"grant {team_name}/{grant.id} gives sensitive secrets to any "
                            f"digest matching {glob!r}: a glob in the digest is not a pin "
                            "(every image pushed to the repository matches); list exact "
                            "digests (@sha256:<64 hex>)",
                        )
                    )
                elif sensitive and "@sha256:" not in glob:
                    findings.append(
                        Finding(
                            "warning",
                            where,
                            f"grant {team_name}/{grant.id} gives sensitive secrets to images "
                            f"by tag ({glob!r}); pin a digest (@sha256:...) so a pushed tag "
                            "cannot receive them",
                        )
                    )
            if grant.images is not None and not grant.images:
                findings.append(
                    Finding(
                        "error",
                        (*base, "images"),
                        f"grant {team_name}/{grant.id} lists no image: it can never be used "
                        "(omit images to allow any)",
                    )
                )
            if has_dynamic and grant.constraints.max_lease_ttl is None:
                findings.append(
                    Finding(
                        "warning",
                        (*base, "constraints"),
                        f"grant {team_name}/{grant.id} gives dynamic credentials without "
                        "max_lease_ttl (the broker's default applies)",
                    )
                )
            if not has_dynamic and grant.constraints.max_lease_ttl is not None:
                findings.append(
                    Finding(
                        "warning",
                        (*base, "constraints", "max_lease_ttl"),
                        f"grant {team_name}/{grant.id} sets max_lease_ttl but has no "
                        "dynamic secrets",
                    )
                )
    for name in sorted(policy.catalog):
        if name not in used:
            findings.append(
                Finding("warning", ("catalog", name), f"catalog secret {name!r} is not granted")
            )
    return findings
