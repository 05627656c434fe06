"""The stored policy in parts on the real OpenBao (issue 15, policy scale): a policy far
larger than one KV entry may hold is applied and read back by the broker; changes write
only the parts that changed and delete the superseded ones; a reader never sees half an
apply; stores written by the single-entry layout are read and upgraded."""

from __future__ import annotations

from datetime import timedelta

import hvac
import pytest
from prometheus_client import REGISTRY

from broker.core.models import EnvDelivery, SecretRequest, TaskIdentity
from broker.core.policy import Grant, KvSecret, PolicySet, Team, decide
from broker.errors import ConflictError, InvalidRequestError, VaultUnavailableError
from broker.vault import policy_store
from broker.vault.policy_store import Part, apply_plan, plan, read_stored
from broker.vault.resolver import VaultPolicySource
from podbroker_devstack.openbao import OpenBao
from tests.integration.vault_policy_env import PolicyEnv, make_env

pytestmark = pytest.mark.stack

# The single-entry layout stopped at about 50 grants (OpenBao refuses a request body of
# more than ~1,000 JSON strings): this count failed before parts, and stays quick.
MANY_GRANTS = 400
TEAMS = 4
CATALOG = 40
METRIC = "podbroker_vault_requests_total"  # broker.metrics.VAULT_REQUESTS


@pytest.fixture
def penv(vault: OpenBao, vault_root: hvac.Client, unique: str) -> PolicyEnv:
    return make_env(vault, vault_root, unique)


def big_policy(e: PolicyEnv, grants: int, *, tag: str = "") -> PolicySet:
    catalog = {f"s{i}": KvSecret(mount=e.kv_mount, path=f"bench/s{i}") for i in range(CATALOG)}
    per_team: list[list[Grant]] = [[] for _ in range(TEAMS)]
    for i in range(grants):
        per_team[i % TEAMS].append(
            Grant(
                id=f"g{i}",
                dags=f"dag_{i}_*",
                secrets=(f"s{i % CATALOG}", f"s{(i + 1) % CATALOG}"),
                description=tag,
            )
        )
    return PolicySet(
        catalog=catalog,
        teams={f"team{t}": Team(grants=tuple(g)) for t, g in enumerate(per_team)},
    )


def asks(i: int) -> tuple[TaskIdentity, list[SecretRequest]]:
    identity = TaskIdentity(dag_id=f"dag_{i}_x", task_id="t", run_id="r", try_number=1)
    names = (f"s{i % CATALOG}", f"s{(i + 1) % CATALOG}")
    return identity, [SecretRequest(name=n, delivery=EnvDelivery()) for n in names]


def kv_reads() -> float:
    """KV reads the broker's Vault sessions in this process have sent so far."""
    return REGISTRY.get_sample_value(METRIC, {"operation": "kv_read"}) or 0.0


def part_names(e: PolicyEnv) -> set[str]:
    listed = e.root.secrets.kv.v2.list_secrets(
        e.layout.parts_path, mount_point=e.layout.config_mount
    )
    return set(listed["data"]["keys"])


def test_many_grants_apply_and_the_broker_reads_them(penv: PolicyEnv) -> None:
    """Regression: the single-entry layout's apply of this many grants failed with
    "Vault refused to write .../policies/grants as invalid (HTTP 400)"."""
    policy = big_policy(penv, MANY_GRANTS)
    apply_plan(penv.root, plan(penv.root, penv.layout, policy))
    again = plan(penv.root, penv.layout, policy)
    assert again.empty, [str(c) for c in again.changes]

    source = VaultPolicySource(penv.session(), cache_ttl=0.0, layout=penv.layout)
    stored = source.current()
    assert len(dict(stored.grants())) == MANY_GRANTS
    assert stored == policy.with_prefix(penv.layout.policy_prefix)
    identity, requests = asks(MANY_GRANTS - 1)
    assert decide(stored, identity, requests).allowed

    # A refresh with nothing changed reads the index only.
    before = kv_reads()
    source.current()
    assert kv_reads() - before == 1


def test_changes_write_only_their_parts_and_delete_the_old_ones(penv: PolicyEnv) -> None:
    small = 4096  # bytes per part: several parts per team
    policy = big_policy(penv, 120)
    apply_plan(penv.root, plan(penv.root, penv.layout, policy, part_bytes=small))
    first = part_names(penv)
    assert sum(n.startswith("team-team1-") for n in first) > 1
    assert plan(penv.root, penv.layout, policy, part_bytes=small).empty

    source = VaultPolicySource(penv.session(), cache_ttl=0.0, layout=penv.layout)
    assert source.current() == policy.with_prefix(penv.layout.policy_prefix)

    # One grant of team1 changes: only team1's parts are written; the rest are kept.
    teams = dict(policy.teams)
    team1 = teams["team1"]
    changed = team1.grants[0].model_copy(update={"dags": "renamed_*"})
    teams["team1"] = team1.model_copy(update={"grants": (changed, *team1.grants[1:])})
    second = policy.model_copy(update={"teams": teams})
    step = plan(penv.root, penv.layout, second, part_bytes=small)
    assert step.write_parts and all(p.name.startswith("team-team1-") for p in step.write_parts)
    assert step.drop_parts and all(n.startswith("team-team1-") for n in step.drop_parts)
    apply_plan(penv.root, step)
    now = part_names(penv)
    assert now == (first - set(step.drop_parts)) | {p.name for p in step.write_parts}

    # The broker reads the index and only the parts it has not read before.
    before = kv_reads()
    assert source.current() == second.with_prefix(penv.layout.policy_prefix)
    assert kv_reads() - before == 1 + len(step.write_parts)
    identity, requests = asks(1)
    assert not decide(source.current(), identity, requests).allowed


def test_a_reader_during_an_apply_sees_the_old_or_the_new_policy_whole(
    penv: PolicyEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader reads the old index, then an apply replaces every part (and deletes the
    old ones) before the reader reads them: it reads the index again and gets the new
    policy, never a mix and never an error."""
    old = big_policy(penv, 60, tag="old")
    new = big_policy(penv, 60, tag="new")
    apply_plan(penv.root, plan(penv.root, penv.layout, old, part_bytes=2048))
    real_read_part = policy_store.read_part
    applied: list[bool] = []

    def read_part_racing(client: hvac.Client, layout: object, name: str) -> Part:
        if not applied:
            applied.append(True)
            apply_plan(penv.root, plan(penv.root, penv.layout, new, part_bytes=2048))
        return real_read_part(client, penv.layout, name)

    monkeypatch.setattr(policy_store, "read_part", read_part_racing)
    source = VaultPolicySource(penv.session(), layout=penv.layout)
    assert applied == []
    seen = source.current()
    assert applied == [True]
    assert seen == new.with_prefix(penv.layout.policy_prefix)
    assert {g.description for _, g in seen.grants()} == {"new"}


@pytest.fixture
def legacy_env(penv: PolicyEnv) -> PolicyEnv:
    """A store as the single-entry layout wrote it (before parts)."""
    dumped = big_policy(penv, 8).model_dump(mode="json")
    kv = penv.root.secrets.kv.v2
    mount = penv.layout.config_mount
    kv.create_or_update_secret(
        penv.layout.catalog_path, {"secrets": dumped["catalog"]}, mount_point=mount
    )
    kv.create_or_update_secret(
        penv.layout.grants_path, {"teams": dumped["teams"]}, mount_point=mount
    )
    return penv


def test_a_single_entry_store_is_read_then_upgraded(legacy_env: PolicyEnv) -> None:
    e = legacy_env
    legacy = big_policy(e, 8)
    source = VaultPolicySource(e.session(), cache_ttl=0.0, layout=e.layout)
    assert source.current() == legacy.with_prefix(e.layout.policy_prefix)

    # The same policy from the files: the plan only moves it into parts.
    upgrade = plan(e.root, e.layout, legacy)
    assert [str(c) for c in upgrade.changes if c.kind != "vault-policy"] == [
        "~ policy-store (single-entry documents -> parts)"
    ]
    assert sorted(upgrade.drop_legacy) == sorted([e.layout.catalog_path, e.layout.grants_path])
    apply_plan(e.root, upgrade)
    for path in (e.layout.catalog_path, e.layout.grants_path):
        with pytest.raises(hvac.exceptions.InvalidPath):
            e.root.secrets.kv.v2.read_secret_metadata(path, mount_point=e.layout.config_mount)
    stored, _ = read_stored(e.root, e.layout)
    assert stored.index_version == 1 and stored.legacy == (0, 0)
    assert source.current() == legacy.with_prefix(e.layout.policy_prefix)
    assert plan(e.root, e.layout, legacy).empty


def test_a_part_that_does_not_match_its_name_fails_closed_until_replaced(penv: PolicyEnv) -> None:
    policy = big_policy(penv, 8)
    apply_plan(penv.root, plan(penv.root, penv.layout, policy))
    name = sorted(part_names(penv))[-1]
    tampered = policy_store.split_parts(big_policy(penv, 12))[-1].body
    penv.root.secrets.kv.v2.create_or_update_secret(
        penv.layout.part_path(name), {"body": tampered}, mount_point=penv.layout.config_mount
    )
    source = VaultPolicySource(penv.session(), cache_ttl=0.0, layout=penv.layout)
    with pytest.raises(VaultUnavailableError, match="does not match its name"):
        source.current()

    # The way out the message names: apply --prune replaces the unreadable store.
    with pytest.raises(InvalidRequestError, match="--prune"):
        plan(penv.root, penv.layout, policy)
    apply_plan(penv.root, plan(penv.root, penv.layout, policy, prune=True))
    assert source.current() == policy.with_prefix(penv.layout.policy_prefix)
    assert plan(penv.root, penv.layout, policy, prune=True).empty


def test_prune_removes_parts_no_index_names_once_old_enough(penv: PolicyEnv) -> None:
    """A part written by an apply that stopped before its index (or lost the race for
    it) is named by nothing: ``apply --prune`` deletes it, unless it is young enough to
    belong to an apply still under way."""
    policy = big_policy(penv, 8)
    apply_plan(penv.root, plan(penv.root, penv.layout, policy))
    stray = policy_store.split_parts(big_policy(penv, 12))[-1]
    penv.root.secrets.kv.v2.create_or_update_secret(
        penv.layout.part_path(stray.name),
        {"body": stray.body},
        mount_point=penv.layout.config_mount,
    )
    assert plan(penv.root, penv.layout, policy).empty  # without --prune: left alone
    assert plan(penv.root, penv.layout, policy, prune=True).empty  # too young
    sweep = plan(penv.root, penv.layout, policy, prune=True, orphan_grace=timedelta(0))
    assert sweep.drop_parts == [stray.name]
    assert [str(c) for c in sweep.changes] == [f"- policy-store part {stray.name}"]
    apply_plan(penv.root, sweep)
    assert stray.name not in part_names(penv)
    source = VaultPolicySource(penv.session(), layout=penv.layout)
    assert source.current() == policy.with_prefix(penv.layout.policy_prefix)


def test_a_deleted_index_denies_everything_until_applied_again(penv: PolicyEnv) -> None:
    """Someone deletes the index's latest version: the broker finds no policy (every
    request denied, not an old one), and the next apply writes over it."""
    policy = big_policy(penv, 8)
    apply_plan(penv.root, plan(penv.root, penv.layout, policy))
    source = VaultPolicySource(penv.session(), cache_ttl=0.0, layout=penv.layout)
    assert source.current() == policy.with_prefix(penv.layout.policy_prefix)
    penv.root.secrets.kv.v2.delete_latest_version_of_secret(
        penv.layout.index_path, mount_point=penv.layout.config_mount
    )
    assert source.current() == PolicySet().with_prefix(penv.layout.policy_prefix)
    apply_plan(penv.root, plan(penv.root, penv.layout, policy))
    assert source.current() == policy.with_prefix(penv.layout.policy_prefix)


def test_two_applies_from_the_same_state_the_second_is_a_conflict(penv: PolicyEnv) -> None:
    """Both planned against the same index: the first applies, the second is told to
    plan again (409-like ConflictError), and what it wrote is never read."""
    apply_plan(penv.root, plan(penv.root, penv.layout, big_policy(penv, 8)))
    first = plan(penv.root, penv.layout, big_policy(penv, 8, tag="first"))
    second = plan(penv.root, penv.layout, big_policy(penv, 8, tag="second"))
    apply_plan(penv.root, first)
    with pytest.raises(ConflictError, match="plan again"):
        apply_plan(penv.root, second)
    source = VaultPolicySource(penv.session(), layout=penv.layout)
    assert {g.description for _, g in source.current().grants()} == {"first"}
