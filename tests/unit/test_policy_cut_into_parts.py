"""How the stored policy is cut into parts (pure: no Vault): bounded, deterministic,
content-named, and read back to the same policy."""

from __future__ import annotations

import pytest

from broker.core.policy import Grant, KvSecret, PolicySet, Team
from broker.errors import InvalidRequestError
from broker.vault.layout import VaultLayout
from broker.vault.policy_store import Part, _assemble, parse_stored, split_parts


def policy(grants: int, *, teams: int = 3, dags: str = "dag_{i}_*") -> PolicySet:
    catalog = {f"s{i}": KvSecret(mount="kv", path=f"p/s{i}") for i in range(50)}
    per_team: list[list[Grant]] = [[] for _ in range(teams)]
    for i in range(grants):
        per_team[i % teams].append(
            Grant(id=f"g{i}", dags=dags.format(i=i), secrets=(f"s{i % 50}",))
        )
    return PolicySet(
        catalog=catalog,
        teams={
            f"team{t}": Team(description=f"team {t}", grants=tuple(g))
            for t, g in enumerate(per_team)
        },
    )


def read_back(parts: list[Part]) -> PolicySet:
    stored = _assemble(parts, 1, tuple(p.name for p in parts))
    return parse_stored(stored, VaultLayout())


@pytest.mark.parametrize("budget", [300, 600, 4096, 256 * 1024])
def test_parts_are_bounded_and_read_back_to_the_same_policy(budget: int) -> None:
    original = policy(300)
    parts = split_parts(original, budget)
    assert all(len(p.body.encode()) <= budget for p in parts)
    assert read_back(parts) == original
    # Grants keep their order within each team.
    assert [g.id for g in read_back(parts).teams["team1"].grants] == [
        g.id for g in original.teams["team1"].grants
    ]
    assert split_parts(policy(300), budget) == parts  # equal policies, equal parts


def test_a_change_to_one_team_changes_only_its_parts() -> None:
    before = split_parts(policy(300), 4096)
    teams = dict(policy(300).teams)
    first = teams["team2"].grants[0].model_copy(update={"tasks": "load"})
    teams["team2"] = teams["team2"].model_copy(
        update={"grants": (first, *teams["team2"].grants[1:])}
    )
    after = split_parts(policy(300).model_copy(update={"teams": teams}), 4096)
    changed = {p.name for p in after} ^ {p.name for p in before}
    assert changed and all(n.startswith("team-team2-") for n in changed)


def test_an_empty_team_and_an_empty_policy() -> None:
    lonely = PolicySet(teams={"quiet": Team(description="nothing yet")})
    assert read_back(split_parts(lonely)) == lonely
    assert split_parts(PolicySet()) == []


def test_a_part_is_checked_against_its_name() -> None:
    part = split_parts(policy(5))[-1]
    assert Part.parse(part.name, part.body) == part
    other = split_parts(policy(6))[-1]
    with pytest.raises(InvalidRequestError, match="does not match its name"):
        Part.parse(part.name, other.body)
    with pytest.raises(InvalidRequestError, match="no body"):
        Part.parse(part.name, None)
