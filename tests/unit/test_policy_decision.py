"""The need-to-know decision (pure): default deny, globs, task globs, delivery
constraints, lease caps, and which Vault policies a child token gets."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.cli.policy_folder import load_policy_dir
from broker.core.models import EnvDelivery, FileDelivery, SecretRequest, TaskIdentity
from broker.core.policy import (
    Constraints,
    DatabaseSecret,
    Grant,
    KvSecret,
    PolicySet,
    Team,
    decide,
    grant_acl_hcl,
    grant_policy_name,
)
from broker.errors import DeniedError, NotFoundError

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"


def task(dag: str, task_id: str = "run") -> TaskIdentity:
    return TaskIdentity(dag_id=dag, task_id=task_id, run_id="manual__1", try_number=1)


def env(name: str) -> SecretRequest:
    return SecretRequest(name=name, delivery=EnvDelivery())


def file(name: str) -> SecretRequest:
    return SecretRequest(name=name, delivery=FileDelivery(mount_path="/secrets"))


def policy(*grants: Grant, team: str = "data") -> PolicySet:
    return PolicySet(
        catalog={
            "wh": KvSecret(mount="secret", path="data/wh", keys=("user", "password")),
            "api": KvSecret(mount="secret", path="data/api", sensitive=True),
            "db": DatabaseSecret(mount="database", role="ro"),
        },
        teams={team: Team(grants=grants)},
    )


def test_empty_policy_denies_everything() -> None:
    decision = decide(PolicySet(catalog=policy().catalog), task("etl"), [env("wh")])
    assert not decision.allowed
    assert decision.denied == ["wh"]
    assert decision.grant_policies == []
    with pytest.raises(DeniedError) as caught:
        decision.raise_for_denial()
    assert caught.value.denied == ["wh"]


def test_unknown_name_is_not_found_and_named() -> None:
    decision = decide(policy(Grant(id="g", dags="*", secrets=("wh",))), task("x"), [env("nope")])
    assert decision.unknown == ["nope"]
    assert not decision.allowed
    with pytest.raises(NotFoundError, match="nope"):
        decision.raise_for_denial()


def test_dag_glob_allows_matching_dags_only() -> None:
    p = policy(Grant(id="etl", dags="analytics_*", secrets=("wh",)))
    allowed = decide(p, task("analytics_daily"), [env("wh")])
    assert allowed.allowed
    assert allowed.matched_grants == ["data/etl"]
    assert allowed.grant_policies == ["podbroker-grant-data.etl"]
    assert allowed.secrets["wh"].grant == "data/etl"
    assert not decide(p, task("payments_daily"), [env("wh")]).allowed
    # case-sensitive, anchored
    assert not decide(p, task("Analytics_daily"), [env("wh")]).allowed
    assert not decide(p, task("x_analytics_daily"), [env("wh")]).allowed


def test_task_glob_narrows_a_grant() -> None:
    p = policy(Grant(id="g", dags="etl", tasks="load_*", secrets=("wh",)))
    assert decide(p, task("etl", "load_orders"), [env("wh")]).allowed
    denied = decide(p, task("etl", "transform"), [env("wh")])
    assert denied.denied == ["wh"]
    assert "transform" in denied.reasons[0]


def test_delivery_constraint() -> None:
    p = policy(Grant(id="g", dags="etl", secrets=("wh",), constraints=Constraints(delivery="file")))
    assert decide(p, task("etl"), [file("wh")]).allowed
    denied = decide(p, task("etl"), [env("wh")])
    assert not denied.allowed
    assert "file" in denied.reasons[0] and "env" in denied.reasons[0]


def test_another_grant_can_allow_what_one_constrains() -> None:
    p = policy(
        Grant(id="files", dags="etl", secrets=("wh",), constraints=Constraints(delivery="file")),
        Grant(id="envs", dags="etl", tasks="special", secrets=("wh",)),
    )
    decision = decide(p, task("etl", "special"), [env("wh")])
    assert decision.allowed and decision.secrets["wh"].grant == "data/envs"


def test_partial_grant_denies_the_whole_request_and_names_only_the_missing() -> None:
    p = policy(Grant(id="g", dags="etl", secrets=("wh",)))
    decision = decide(p, task("etl"), [env("wh"), env("api")])
    assert not decision.allowed
    assert decision.denied == ["api"]
    assert decision.grant_policies == []  # nothing is minted for a denied request


def test_dynamic_ttl_cap_is_carried_per_secret() -> None:
    p = policy(
        Grant(id="db", dags="etl", secrets=("db",), constraints=Constraints(max_lease_ttl=600)),
        Grant(id="wh", dags="etl", secrets=("wh",)),
    )
    decision = decide(p, task("etl"), [env("db"), env("wh")])
    assert decision.allowed
    assert decision.secrets["db"].max_lease_ttl == 600
    assert decision.secrets["wh"].max_lease_ttl is None
    assert decision.grant_policies == ["podbroker-grant-data.db", "podbroker-grant-data.wh"]


def test_policy_prefix_is_a_runtime_setting() -> None:
    p = policy(Grant(id="g", dags="*", secrets=("wh",))).with_prefix("t1-")
    assert decide(p, task("a"), [env("wh")]).grant_policies == ["t1-data.g"]
    assert "t1-" not in p.model_dump_json()  # not part of the stored policy


def test_acl_covers_exactly_the_grant_paths() -> None:
    p = policy(Grant(id="g", dags="*", secrets=("wh", "db")))
    hcl = grant_acl_hcl(p, "data/g", p.teams["data"].grants[0])
    assert 'path "secret/data/data/wh"' in hcl
    assert 'path "database/creds/ro"' in hcl
    assert "secret/data/data/api" not in hcl
    assert hcl.count("capabilities") == 2
    assert '"read"' in hcl and "update" not in hcl and "*" not in hcl.split("\n", 1)[1]


def test_policy_name_is_unambiguous() -> None:
    assert grant_policy_name("a-b/c") != grant_policy_name("a/b-c")


def test_example_policies_decide_as_documented() -> None:
    p = load_policy_dir(EXAMPLES)
    assert len(p.teams) == 3 and len(p.catalog) >= 10 and len(p.grants()) >= 12
    etl = decide(p, task("analytics_etl_daily", "load"), [env("warehouse-loader")])
    assert etl.allowed and etl.matched_grants == ["analytics/warehouse-etl"]
    assert not decide(p, task("analytics_etl_daily"), [file("warehouse-loader")]).allowed
    assert not decide(p, task("payments_provider_sync"), [env("warehouse-loader")]).allowed
    orders = decide(p, task("analytics_etl_daily", "extract_orders"), [env("orders-db")])
    assert orders.secrets["orders-db"].max_lease_ttl == 900
    assert not decide(p, task("analytics_etl_daily", "load"), [env("orders-db")]).allowed


# --- properties -----------------------------------------------------------------------

ids = st.text(alphabet="abcdefgh_-", min_size=1, max_size=12)
globs = st.text(alphabet="abc_*?", min_size=1, max_size=6)
secret_names = st.sampled_from(["wh", "api", "db"])


@st.composite
def grants(draw: st.DrawFn) -> Grant:
    return Grant(
        id=draw(st.sampled_from(["g1", "g2", "g3", "g4"])),
        dags=draw(globs),
        tasks=draw(st.none() | globs),
        secrets=tuple(draw(st.lists(secret_names, min_size=1, max_size=3))),
        constraints=Constraints(delivery=draw(st.sampled_from([None, "env", "file"]))),
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(grants(), max_size=5),
    ids,
    ids,
    st.lists(st.tuples(secret_names, st.booleans()), min_size=1, max_size=3),
)
def test_decision_matches_a_brute_force_oracle(
    gs: list[Grant], dag: str, task_id: str, wanted: list[tuple[str, bool]]
) -> None:
    p = policy(*gs)
    requests = [file(n) if as_file else env(n) for n, as_file in wanted]
    decision = decide(p, task(dag, task_id), requests)

    def granted(name: str, mode: str) -> bool:
        return any(
            name in g.secrets
            and fnmatch.fnmatchcase(dag, g.dags)
            and (g.tasks is None or fnmatch.fnmatchcase(task_id, g.tasks))
            and g.constraints.delivery in (None, mode)
            for g in gs
        )

    first_mode: dict[str, str] = {}
    for r in requests:
        first_mode.setdefault(r.name, r.delivery.type)
    expected_denied = [n for n, m in first_mode.items() if not granted(n, m)]
    assert decision.denied == expected_denied
    assert decision.allowed == (not expected_denied)
    if decision.allowed:
        # the child token gets exactly the chosen grants' policies, nothing else
        assert set(decision.grant_policies) == {d.policy for d in decision.secrets.values()}
        assert set(decision.secrets) == set(first_mode)
    else:
        assert decision.grant_policies == []


@settings(max_examples=200, deadline=None)
@given(st.lists(grants(), max_size=4), grants(), ids, ids, secret_names)
def test_adding_a_grant_never_revokes_access(
    gs: list[Grant], extra: Grant, dag: str, task_id: str, name: str
) -> None:
    before = decide(policy(*gs), task(dag, task_id), [env(name)]).allowed
    after = decide(
        policy(*gs, extra.model_copy(update={"id": "extra"})), task(dag, task_id), [env(name)]
    )
    assert after.allowed or not before


def test_image_globs_bind_a_secret_to_approved_images() -> None:
    from broker.core.policy import lint_policy

    catalog = {"api": KvSecret(mount="kv", path="api", sensitive=True)}
    by_digest = Grant(id="sync", dags="sync_*", secrets=("api",), images=("reg/sync@sha256:*",))
    policy = PolicySet(catalog=catalog, teams={"t": Team(grants=(by_digest,))})
    task = TaskIdentity(dag_id="sync_daily", task_id="run", run_id="r")
    request = [SecretRequest(name="api")]
    refused = decide(policy, task, request, image="reg/sync:latest")
    assert not refused.allowed and refused.denied == ["api"]
    assert "allow only images reg/sync@sha256:*, not 'reg/sync:latest'" in refused.reasons[0]
    assert not decide(policy, task, request).allowed  # no image named: refused
    assert decide(policy, task, request, image="reg/sync@sha256:" + "0" * 64).allowed
    # lint: tags and digest globs on sensitive secrets warn (neither pins the image),
    # an exact digest does not; match-all or empty lists are errors
    tagged = by_digest.model_copy(update={"images": ("reg/sync:1.*",)})
    everything = by_digest.model_copy(update={"images": ("*",)})
    none = by_digest.model_copy(update={"images": ()})
    pinned = by_digest.model_copy(update={"images": ("reg/sync@sha256:" + "0" * 64,)})
    messages = {
        f.severity + ": " + f.message
        for grant in (by_digest, tagged, everything, none, pinned)
        for f in lint_policy(PolicySet(catalog=catalog, teams={"t": Team(grants=(grant,))}))
    }
    assert any(m.startswith("warning: ") and "pin a digest" in m for m in messages)
    assert any(m.startswith("warning: ") and "digest is not a pin" in m for m in messages)
    assert not any("0" * 64 in m for m in messages)
    assert any(m.startswith("error: ") and "matches every image" in m for m in messages)
    assert any(m.startswith("error: ") and "lists no image" in m for m in messages)
