"""The resolver on the real OpenBao (and PostgreSQL): child tokens scoped to grants,
defence in depth, dynamic database credentials and revocation, cache refresh, errors,
and no secret value in any error, log or repr."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import hvac
import pytest
from hvac.exceptions import Forbidden

from broker.core.api_models import ContainerSpec, LaunchRequest
from broker.core.models import EnvDelivery, FileDelivery, SecretRequest, TaskIdentity
from broker.core.plan import PlanPolicy, SecretLimits, build_plan, complete_plan
from broker.core.policy import (
    Constraints,
    DatabaseSecret,
    Decision,
    Grant,
    KvSecret,
    PolicySet,
    SecretDecision,
    Team,
    decide,
)
from broker.errors import BrokerError, DeniedError, NotFoundError, VaultUnavailableError
from broker.vault.bootstrap import BootstrapOptions, bootstrap
from broker.vault.client import VaultAuth, VaultSession
from broker.vault.layout import VaultLayout
from broker.vault.resolver import MINT_GRACE_SECONDS, ResolvedBundle, VaultPolicySource
from broker.vault.resolver import SecretResolver as VaultReader
from podbroker_devstack.openbao import OpenBao, start_openbao
from podbroker_devstack.postgres import Postgres
from tests.helpers import eventually
from tests.integration.vault_database import can_login, database_mount
from tests.integration.vault_policy_env import PolicyEnv, make_env

pytestmark = pytest.mark.stack

PLANTED = {
    "user": "etl_user_7f3a",
    "password": "pw-PLANTED-9c1e2b7d",
    "api": "api-PLANTED-55aa",
}


class SecretResolver:
    """The broker's Vault path of a launch, as the launch service runs it: the policy
    source, the pure decision and plan, then the Vault adapter executing the plan."""

    def __init__(
        self,
        session: VaultSession,
        cache_ttl: float = 10.0,
        *,
        layout: VaultLayout | None = None,
        clock: Callable[[], float] | None = None,
        mint_grace_seconds: int = MINT_GRACE_SECONDS,
    ) -> None:
        extra = {"clock": clock} if clock else {}
        self.policies = VaultPolicySource(session, cache_ttl, layout=layout, **extra)
        self.reader = VaultReader(session, layout=layout, mint_grace_seconds=mint_grace_seconds)
        self.session = session

    def policy_set(self) -> PolicySet:
        return self.policies.current()

    def decide(self, identity: TaskIdentity, requests: Sequence[SecretRequest]) -> Decision:
        return decide(self.policies.current(), identity, requests)

    def resolve(
        self,
        identity: TaskIdentity,
        requests: Sequence[SecretRequest],
        decision: Decision,
        *,
        launch_id: str,
        on_issue: Callable[[str | None, Sequence[str]], None] | None = None,
    ) -> ResolvedBundle:
        request = LaunchRequest(
            task=identity, container=ContainerSpec(image="x"), secrets=list(requests)
        )
        plan = build_plan(request, PlanPolicy(namespaces=("default",)), "test")
        plan = dataclasses.replace(plan, launch_id=launch_id)
        plan = complete_plan(plan, self.policies.current(), decision, SecretLimits())
        assert plan.secrets is not None
        return self.reader.resolve(plan.secrets, launch_id=launch_id, on_issue=on_issue)

    def revoke(self, lease_ids: Sequence[str]) -> None:
        self.reader.revoke(lease_ids)


def task(dag: str = "etl_daily", task_id: str = "load") -> TaskIdentity:
    return TaskIdentity(dag_id=dag, task_id=task_id, run_id="scheduled__2026", try_number=2)


def env(name: str) -> SecretRequest:
    return SecretRequest(name=name, delivery=EnvDelivery())


@pytest.fixture
def penv(vault: OpenBao, vault_root: hvac.Client, unique: str) -> PolicyEnv:
    e = make_env(vault, vault_root, unique)
    kv = vault_root.secrets.kv.v2
    kv.create_or_update_secret(
        "team/wh",
        {"user": PLANTED["user"], "password": "old-version-value", "extra": "x"},
        mount_point=e.kv_mount,
    )
    kv.create_or_update_secret(
        "team/wh",
        {"user": PLANTED["user"], "password": PLANTED["password"], "extra": "x"},
        mount_point=e.kv_mount,
    )
    kv.create_or_update_secret("other/api", {"key": PLANTED["api"]}, mount_point=e.kv_mount)
    return e


def base_policy(e: PolicyEnv, **extra_catalog: KvSecret | DatabaseSecret) -> PolicySet:
    return PolicySet(
        catalog={
            "wh": KvSecret(mount=e.kv_mount, path="team/wh", keys=("user", "password")),
            "wh-v1": KvSecret(mount=e.kv_mount, path="team/wh", version=1),
            "api": KvSecret(mount=e.kv_mount, path="other/api", sensitive=True),
            "ghost": KvSecret(mount=e.kv_mount, path="team/nothing-here"),
            "wh-nokey": KvSecret(mount=e.kv_mount, path="team/wh", keys=("user", "token")),
            **extra_catalog,
        },
        teams={
            "data": Team(
                grants=(
                    Grant(id="etl", dags="etl_*", secrets=("wh", "wh-v1", "ghost", "wh-nokey")),
                    Grant(id="api", dags="api_sync", secrets=("api",)),
                )
            )
        },
    )


def test_resolves_kv_with_key_subset_and_pinned_version(penv: PolicyEnv) -> None:
    penv.apply(base_policy(penv))
    resolver = SecretResolver(penv.session(), layout=penv.layout)
    requests = [env("wh"), SecretRequest(name="wh-v1", delivery=FileDelivery(mount_path="/s"))]
    decision = resolver.decide(task(), requests)
    assert decision.allowed, decision.reasons
    assert decision.grant_policies == [f"{penv.layout.policy_prefix}data.etl"]
    bundle = resolver.resolve(task(), requests, decision, launch_id="L1")
    wh, wh_v1 = bundle.secrets
    assert {k: v.reveal() for k, v in wh.keys.items()} == {
        "user": PLANTED["user"],
        "password": PLANTED["password"],
    }
    assert wh.version == 2 and wh.vault_path == f"{penv.kv_mount}/data/team/wh"
    assert wh_v1.version == 1 and wh_v1.keys["password"].reveal() == "old-version-value"
    # KV only: a batch token (not persisted in Vault, so no accessor; it ends with its
    # short TTL) and no lease.
    assert bundle.lease_ids == [] and bundle.token_accessor == ""
    assert 0 < bundle.token_ttl <= 30


def test_defence_in_depth_vault_refuses_outside_the_grant(penv: PolicyEnv) -> None:
    penv.apply(base_policy(penv))
    resolver = SecretResolver(penv.session(), layout=penv.layout)
    etl_policy = f"{penv.layout.policy_prefix}data.etl"
    # A forged decision: the broker's own check is bypassed and claims "api" is allowed
    # under the etl grant. The child token only carries etl's policy, so Vault says 403.
    forged = Decision(
        allowed=True,
        matched_grants=["data/etl"],
        grant_policies=[etl_policy],
        secrets={"api": SecretDecision(name="api", grant="data/etl", policy=etl_policy)},
    )
    with pytest.raises(DeniedError) as caught:
        resolver.resolve(task(), [env("api")], forged, launch_id="forged")
    assert caught.value.denied == ["api"]
    assert PLANTED["api"] not in str(caught.value)

    # And the token role refuses policies outside the grant prefix (e.g. the broker's).
    broker = penv.session().hvac_client
    with pytest.raises((Forbidden, hvac.exceptions.InvalidRequest)):
        broker.auth.token.create(role_name=penv.layout.token_role, policies=["root"])
    with pytest.raises((Forbidden, hvac.exceptions.InvalidRequest)):
        broker.auth.token.create(
            role_name=penv.layout.token_role, policies=[penv.layout.broker_policy]
        )


def test_broker_token_cannot_read_team_secrets(penv: PolicyEnv) -> None:
    penv.apply(base_policy(penv))
    broker = penv.session().hvac_client
    with pytest.raises(Forbidden):
        broker.secrets.kv.v2.read_secret_version(
            "team/wh", mount_point=penv.kv_mount, raise_on_deleted_version=True
        )
    with pytest.raises(Forbidden):  # nor mint a token outside its role
        broker.auth.token.create(policies=[f"{penv.layout.policy_prefix}data.etl"])
    # but it reads its own config mount
    assert broker.secrets.kv.v2.read_secret_version(
        penv.layout.index_path,
        mount_point=penv.layout.config_mount,
        raise_on_deleted_version=True,
    )


def test_grant_change_is_enforced_within_the_cache_ttl(penv: PolicyEnv) -> None:
    policy = base_policy(penv)
    penv.apply(policy)
    now = [1000.0]
    resolver = SecretResolver(
        penv.session(), cache_ttl=10.0, layout=penv.layout, clock=lambda: now[0]
    )
    assert resolver.decide(task(), [env("wh")]).allowed
    without_etl = policy.model_copy(
        update={"teams": {"data": Team(grants=policy.teams["data"].grants[1:])}}
    )
    penv.apply(without_etl, prune=True)
    now[0] += 5  # within the TTL: the cached policy still answers
    assert resolver.decide(task(), [env("wh")]).allowed
    now[0] += 6  # TTL passed: the new KV version is read
    denied = resolver.decide(task(), [env("wh")])
    assert not denied.allowed and denied.denied == ["wh"]
    # the removed grant's Vault policy is gone too, so even a forged decision fails
    assert (
        f"{penv.layout.policy_prefix}data.etl"
        not in penv.root.sys.list_acl_policies()["data"]["keys"]
    )


def test_unknown_missing_path_and_missing_key(
    penv: PolicyEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    penv.apply(base_policy(penv))
    resolver = SecretResolver(penv.session(), layout=penv.layout)
    unknown = resolver.decide(task(), [env("nope")])
    assert unknown.unknown == ["nope"]
    with pytest.raises(NotFoundError, match="nope"):
        resolver.resolve(task(), [env("nope")], unknown, launch_id="u")
    denied = resolver.decide(task("other_dag"), [env("wh")])
    with pytest.raises(DeniedError) as caught:
        resolver.resolve(task("other_dag"), [env("wh")], denied, launch_id="d")
    assert caught.value.denied == ["wh"]

    errors: list[str] = []
    for name in ("ghost", "wh-nokey"):
        decision = resolver.decide(task(), [env(name)])
        assert decision.allowed
        with pytest.raises(NotFoundError) as missing:
            resolver.resolve(task(), [env(name)], decision, launch_id=name)
        errors.append(str(missing.value))
    assert "team/nothing-here" in errors[0]
    assert "token" in errors[1]
    for text in [*errors, caplog.text]:
        for value in PLANTED.values():
            assert value not in text


def test_no_secret_value_in_logs_reprs_or_output(
    penv: PolicyEnv, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    penv.apply(base_policy(penv))
    resolver = SecretResolver(penv.session(), layout=penv.layout)
    decision = resolver.decide(task(), [env("wh")])
    bundle = resolver.resolve(task(), [env("wh")], decision, launch_id="scan")
    assert bundle.secrets[0].keys["password"].reveal() == PLANTED["password"]
    print(bundle, repr(bundle.secrets[0]), decision)
    shown = capsys.readouterr()
    for text in (caplog.text, shown.out, shown.err, repr(bundle), repr(resolver.session)):
        for value in PLANTED.values():
            assert value not in text
        assert penv.broker_token not in text


@pytest.fixture
def database(penv: PolicyEnv, postgres: Postgres, unique: str) -> str:
    """A database secrets engine at db-UNIQUE/ against the real PostgreSQL."""
    mount = f"db-{unique}"
    root = penv.root
    database_mount(root, postgres, mount, max_ttl="2h")
    # The broker may renew/revoke leases of the dynamic mounts it is told about only.
    bootstrap(root, BootstrapOptions(layout=penv.layout, dynamic_mounts=(mount,)))
    return mount


def test_dynamic_database_credentials_capped_and_revoked(
    penv: PolicyEnv, database: str, postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    policy = base_policy(penv, orders=DatabaseSecret(mount=database, role="ro"))
    teams = {
        "data": Team(
            grants=(
                *policy.teams["data"].grants,
                Grant(
                    id="orders",
                    dags="etl_*",
                    tasks="extract*",
                    secrets=("orders",),
                    constraints=Constraints(max_lease_ttl=120),
                ),
            )
        )
    }
    penv.apply(policy.model_copy(update={"teams": teams}))
    resolver = SecretResolver(penv.session(), layout=penv.layout)
    identity = task(task_id="extract_orders")
    requests = [env("orders"), env("wh")]
    decision = resolver.decide(identity, requests)
    assert decision.allowed, decision.reasons

    first = resolver.resolve(identity, requests, decision, launch_id="launch-a")
    second = resolver.resolve(identity, requests, decision, launch_id="launch-b")
    creds_a, creds_b = first.secrets[0], second.secrets[0]
    user_a, pw_a = creds_a.keys["username"].reveal(), creds_a.keys["password"].reveal()
    assert user_a != creds_b.keys["username"].reveal()  # each launch its own login
    assert creds_a.lease_id and creds_a.lease_ttl is not None and 0 < creds_a.lease_ttl <= 120
    assert penv.root.sys.read_lease(creds_a.lease_id)["data"]["ttl"] <= 120
    assert first.token_ttl <= 120

    # The child token carries the task's identity for Vault's audit log, and only the
    # matching grants' policies.
    token_info = penv.root.auth.token.lookup_accessor(first.token_accessor)["data"]
    assert token_info["meta"]["dag_id"] == "etl_daily"
    assert token_info["meta"]["task_id"] == "extract_orders"
    assert token_info["meta"]["run_id"] == "scheduled__2026"
    assert token_info["meta"]["try_number"] == "2"
    assert token_info["meta"]["launch_id"] == "launch-a"
    assert sorted(token_info["policies"]) == sorted(decision.grant_policies)

    # ...and Vault's own audit log joins the read to the task instance.
    audit = penv.vault.audit_log.read_text()
    assert '"launch_id":"launch-a"' in audit and '"dag_id":"etl_daily"' in audit
    assert pw_a not in audit  # Vault HMACs response data in its audit log

    assert can_login(postgres, user_a, pw_a)
    resolver.revoke(first.lease_ids)
    assert not can_login(postgres, user_a, pw_a)
    resolver.revoke(first.lease_ids)  # idempotent
    assert can_login(postgres, creds_b.keys["username"].reveal(), creds_b.keys["password"].reveal())
    resolver.revoke(second.lease_ids)
    for value in (pw_a, creds_b.keys["password"].reveal()):
        assert value not in caplog.text


def _dynamic_policy(penv: PolicyEnv, database: str) -> PolicySet:
    policy = base_policy(penv, orders=DatabaseSecret(mount=database, role="ro"))
    grant = Grant(
        id="orders",
        dags="etl_*",
        secrets=("orders",),
        constraints=Constraints(max_lease_ttl=600),
    )
    return policy.model_copy(
        update={"teams": {"data": Team(grants=(*policy.teams["data"].grants, grant))}}
    )


def test_child_token_lives_only_the_grace_until_recorded(
    penv: PolicyEnv, database: str, postgres: Postgres
) -> None:
    """A broker killed between minting a child token and recording it has nothing to
    revoke from: the token it leaves must end on its own within the grace, and a
    recorded token gets its full TTL (chaos smoke found a token left for its whole TTL)."""
    penv.apply(_dynamic_policy(penv, database))
    resolver = SecretResolver(penv.session(), layout=penv.layout)
    identity = task(task_id="extract")
    requests = [env("orders")]
    decision = resolver.decide(identity, requests)
    assert decision.allowed, decision.reasons
    ttl_while_recording: list[int] = []

    def look_while_recording(accessor: str | None, lease_ids: Sequence[str]) -> None:
        if accessor:  # what a broker killed right now would leave in Vault
            data = penv.root.auth.token.lookup_accessor(accessor)["data"]
            ttl_while_recording.append(int(data["ttl"]))

    bundle = resolver.resolve(
        identity, requests, decision, launch_id="launch-rec", on_issue=look_while_recording
    )
    assert ttl_while_recording and ttl_while_recording[0] <= MINT_GRACE_SECONDS
    full = penv.root.auth.token.lookup_accessor(bundle.token_accessor)["data"]
    assert full["ttl"] > MINT_GRACE_SECONDS and full["explicit_max_ttl"] == bundle.token_ttl
    creds = bundle.secrets[0].keys
    assert can_login(postgres, creds["username"].reveal(), creds["password"].reveal())
    resolver.revoke(bundle.lease_ids)
    resolver.reader.revoke_token(bundle.token_accessor)


def test_child_token_never_recorded_ends_on_its_own(penv: PolicyEnv, database: str) -> None:
    """The recording step stalls past the grace (as a killed broker never returns): the
    token is gone from Vault without anyone revoking it, and the launch fails closed."""
    penv.apply(_dynamic_policy(penv, database))
    resolver = SecretResolver(penv.session(), layout=penv.layout, mint_grace_seconds=2)
    identity = task(task_id="extract")
    requests = [env("orders")]
    decision = resolver.decide(identity, requests)
    expired: list[bool] = []

    def stall_until_expired(accessor: str | None, lease_ids: Sequence[str]) -> None:
        def gone() -> bool:
            try:
                penv.root.auth.token.lookup_accessor(accessor)
            except hvac.exceptions.InvalidRequest:
                return True
            return False

        if accessor:
            expired.append(eventually(gone, timeout=20))

    with pytest.raises(BrokerError):
        resolver.resolve(
            identity, requests, decision, launch_id="launch-lost", on_issue=stall_until_expired
        )
    assert expired == [True]


# --- Vault unavailable -------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers (a hung Vault)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    listener.close()


def test_unreachable_and_slow_vault_are_retryable(silent_server: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(VaultUnavailableError) as down:
        VaultSession.connect(f"http://127.0.0.1:{closed_port}", VaultAuth.token("t"), timeout=1)
    assert down.value.retryable and down.value.http_status == 503
    with pytest.raises(VaultUnavailableError, match="in time"):
        VaultSession.connect(silent_server, VaultAuth.token("t"), timeout=0.5)


def test_sealed_vault_fails_closed(tmp_path: Path) -> None:
    own = start_openbao(tmp_path / "bao")  # sealing the shared server would hurt others
    try:
        session = VaultSession.connect(own.url, VaultAuth.token(own.root_token))
        resolver = SecretResolver(session, cache_ttl=0)
        resolver.policy_set()  # empty policy, nothing applied yet: all denied
        assert not resolver.decide(task(), [env("wh")]).allowed
        hvac.Client(url=own.url, token=own.root_token).sys.seal()
        with pytest.raises(VaultUnavailableError, match="sealed"):
            resolver.decide(task(), [env("wh")])
        with pytest.raises(VaultUnavailableError):
            session.ping()
    finally:
        own.stop()
