"""The launch executor over in-memory ports: what it creates, in which order, what it
records, and what it undoes when a step fails."""

from __future__ import annotations

import threading

import pytest

from broker.core import podmeta
from broker.core.audit_events import EventKind
from broker.core.models import EnvDelivery, SecretRequest
from broker.core.plan import secret_name_for
from broker.errors import (
    AuditUnavailableError,
    DeniedError,
    InvalidRequestError,
    KubernetesUnavailableError,
    VaultUnavailableError,
)
from tests.unit.fakes import CALLER, NAMESPACE, OTHER_CALLER, Services, make_task, wait_until

POD_AND_SECRET = [
    EventKind.LAUNCH_REQUESTED,
    EventKind.DECISION,
    EventKind.POD_CREATED,
    EventKind.SECRETS_RESOLVED,
    EventKind.SECRET_CREATED,
]


def all_given_back(svc: Services) -> bool:
    """Every child token and lease Vault handed out has been revoked."""
    store = svc.store
    return set(store.issued_accessors) <= set(store.revoked_accessors) and set(
        store.issued_leases
    ) <= set(store.revoked_leases)


# -- the happy paths ------------------------------------------------------------------------


def test_launch_without_secrets_creates_only_the_pod(svc: Services) -> None:
    view = svc.launch()
    assert view.created is True
    assert view.phase == "Pending"
    assert list(svc.cluster.pods) == [(NAMESPACE, view.pod_name)]
    assert svc.cluster.secrets == {}
    assert svc.store.count("resolve") == 0
    assert svc.audit.kinds() == [
        EventKind.LAUNCH_REQUESTED,
        EventKind.DECISION,
        EventKind.POD_CREATED,
    ]


def test_declared_keys_let_the_pod_be_created_before_vault_answers(svc: Services) -> None:
    svc.store.gate = threading.Event()
    bundles_at_create: list[int] = []

    def vault_still_reading() -> None:
        bundles_at_create.append(len(svc.store.issued))
        assert svc.store.gate is not None
        svc.store.gate.set()

    svc.cluster.before("create_pod", vault_still_reading)
    view = svc.launch("wh")

    assert bundles_at_create == [0]
    pod = svc.cluster.pods[(NAMESPACE, view.pod_name)]
    secret = svc.cluster.secrets[(NAMESPACE, secret_name_for(view.launch_id))]
    assert secret.owner_uid == pod.uid
    assert secret.data_keys == ("s0.password", "s0.user")
    (bundle,) = svc.store.issued
    assert secret.meta.holdings == podmeta.VaultHoldings((), bundle.token_accessor)
    assert svc.audit.kinds() == POD_AND_SECRET


def test_keys_learnt_from_the_read_make_the_pod_wait_for_vault(svc: Services) -> None:
    bundles_at_create: list[int] = []
    svc.cluster.before("create_pod", lambda: bundles_at_create.append(len(svc.store.issued)))
    svc.store.kv_values["api"] = {"token": "t-1", "url": "u-1"}

    view = svc.launch("api")

    assert bundles_at_create == [1]
    manifest = svc.cluster.pod_manifests[(NAMESPACE, view.pod_name)]
    env = {e["name"] for e in manifest["spec"]["containers"][0]["env"]}
    assert env == {"API_TOKEN", "API_URL"}
    assert svc.audit.kinds() == POD_AND_SECRET


def test_dynamic_credentials_put_lease_and_token_on_the_secret(svc: Services) -> None:
    view = svc.launch("db")
    (bundle,) = svc.store.issued
    secret = svc.cluster.secrets[(NAMESPACE, secret_name_for(view.launch_id))]
    assert secret.meta.holdings == podmeta.VaultHoldings(
        tuple(bundle.lease_ids), bundle.token_accessor
    )
    assert len(bundle.lease_ids) == 1
    assert svc.store.revoked_leases == []


# -- refusals: nothing happens ----------------------------------------------------------------


def test_denial_is_403_recorded_and_creates_and_reads_nothing(svc: Services) -> None:
    caller = CALLER.model_copy(update={"allowed_dag_globs": ("*",)})
    with pytest.raises(DeniedError) as denied:
        svc.launch("wh", task_identity=make_task(dag_id="ml_train"), caller=caller)
    assert denied.value.http_status == 403
    assert denied.value.denied == ["wh"]
    assert svc.audit.kinds() == [EventKind.LAUNCH_REQUESTED, EventKind.DECISION]
    assert svc.audit.of_kind(EventKind.DECISION)[0].details["allowed"] is False
    assert svc.cluster.count("create_pod") == 0
    assert svc.store.count("resolve") == 0


def test_caller_without_the_dag_is_refused_before_anything(svc: Services) -> None:
    with pytest.raises(DeniedError, match="may not launch"):
        svc.launch("wh", caller=OTHER_CALLER)
    assert svc.audit.events == []
    assert svc.policies.calls == 0
    assert svc.cluster.count("create_pod") == 0


def test_audit_down_fails_closed_before_any_side_effect(svc: Services) -> None:
    svc.audit.down = True
    with pytest.raises(AuditUnavailableError):
        svc.launch("db")
    # Vault is read on the executor's pool: give a wrongly scheduled read time to show.
    assert not wait_until(lambda: svc.store.count("resolve") > 0, timeout=0.1)
    assert svc.cluster.count("create_pod") == 0
    assert svc.cluster.count("create_secret") == 0


def test_policy_source_down_is_retryable_and_recorded(svc: Services) -> None:
    svc.policies.fail(VaultUnavailableError("sealed"))
    with pytest.raises(VaultUnavailableError) as caught:
        svc.launch("wh")
    assert caught.value.retryable
    assert svc.audit.kinds() == [EventKind.LAUNCH_REQUESTED, EventKind.LAUNCH_FAILED]
    assert svc.audit.events[-1].details["stage"] == "decide"
    assert svc.cluster.count("create_pod") == 0


# -- reattach: the same try asked again -----------------------------------------------------


def test_existing_pod_is_reattached_without_reading_vault(svc: Services) -> None:
    planted = svc.cluster.add_pod(make_task(), secret_names=["wh"], phase="Running")
    view = svc.launch("wh")
    assert view.created is False
    assert view.pod_name == planted.name
    assert view.phase == "Running"
    assert svc.store.count("resolve") == 0
    assert svc.cluster.count("create_pod") == 0
    assert svc.audit.kinds() == [
        EventKind.LAUNCH_REQUESTED,
        EventKind.DECISION,
        EventKind.LAUNCH_REATTACHED,
    ]


def test_reattach_still_needs_the_policy_to_allow(svc: Services) -> None:
    svc.cluster.add_pod(make_task(dag_id="ml_train"), secret_names=["wh"])
    caller = CALLER.model_copy(update={"allowed_dag_globs": ("*",)})
    with pytest.raises(DeniedError):
        svc.launch("wh", task_identity=make_task(dag_id="ml_train"), caller=caller)
    assert EventKind.LAUNCH_REATTACHED not in svc.audit.kinds()


@pytest.mark.parametrize("secret", ["db", "api"], ids=["keys-declared", "keys-read"])
def test_conflict_on_create_reattaches_and_revokes_what_was_read(
    svc: Services, secret: str
) -> None:
    # A concurrent duplicate (another replica) creates the pod between our look and create.
    svc.cluster.before(
        "create_pod", lambda: svc.cluster.add_pod(make_task(), secret_names=[secret])
    )
    view = svc.launch(secret)
    assert view.created is False
    assert len(svc.store.issued) == 1
    assert all_given_back(svc)
    assert svc.cluster.secrets == {}
    assert EventKind.LEASES_REVOKED in svc.audit.kinds()


# -- rollback: a half-made launch is undone -------------------------------------------------


def failure_stage(svc: Services) -> str:
    (failed,) = svc.audit.of_kind(EventKind.LAUNCH_FAILED)
    return str(failed.details["stage"])


def test_create_secret_failure_deletes_the_pod_and_revokes_leases_and_token(
    svc: Services,
) -> None:
    svc.cluster.fail("create_secret", KubernetesUnavailableError("api server gone"))
    with pytest.raises(KubernetesUnavailableError):
        svc.launch("db")
    assert svc.cluster.pods == {}
    assert len(svc.cluster.deleted_pods) == 1
    (bundle,) = svc.store.issued
    assert svc.store.revoked_leases == bundle.lease_ids
    assert svc.store.revoked_accessors == [bundle.token_accessor]
    assert failure_stage(svc) == "create_secret"


def test_audit_lost_before_the_secret_is_written_undoes_the_launch(svc: Services) -> None:
    svc.cluster.before("create_pod", lambda: setattr(svc.audit, "down", True))
    with pytest.raises(AuditUnavailableError):
        svc.launch("db")
    assert svc.cluster.pods == {}
    assert svc.cluster.count("create_secret") == 0
    assert all_given_back(svc)


def test_rollback_goes_on_when_revoking_fails(svc: Services) -> None:
    svc.cluster.fail("create_secret", KubernetesUnavailableError("api server gone"))
    svc.store.fail("revoke", VaultUnavailableError("sealed"))
    with pytest.raises(KubernetesUnavailableError):
        svc.launch("db")
    assert svc.cluster.pods == {}
    (revoked,) = svc.audit.of_kind(EventKind.LEASES_REVOKED)
    assert revoked.details["revoked"] is False
    assert failure_stage(svc) == "create_secret"


def test_resolve_failure_after_the_pod_was_created_deletes_it(svc: Services) -> None:
    svc.store.fail("resolve", VaultUnavailableError("sealed"))
    with pytest.raises(VaultUnavailableError):
        svc.launch("wh")
    assert svc.cluster.count("create_pod") == 1
    assert svc.cluster.pods == {}
    assert svc.cluster.secrets == {}
    assert failure_stage(svc) == "resolve_secrets"


def test_resolve_failure_before_the_pod_creates_nothing(svc: Services) -> None:
    svc.store.fail("resolve", VaultUnavailableError("sealed"))
    with pytest.raises(VaultUnavailableError):
        svc.launch("api")
    assert svc.cluster.count("create_pod") == 0
    assert failure_stage(svc) == "resolve_secrets"


def test_create_pod_failure_revokes_the_bundle(svc: Services) -> None:
    svc.cluster.fail("create_pod", KubernetesUnavailableError("api server gone"))
    with pytest.raises(KubernetesUnavailableError):
        svc.launch("db")
    assert len(svc.store.issued) == 1
    assert all_given_back(svc)
    assert svc.cluster.pods == {}
    assert failure_stage(svc) == "create_pod"


def test_env_collision_seen_only_in_read_keys_revokes_what_was_read(svc: Services) -> None:
    svc.store.kv_values = {"api": {"password": "a"}, "api-copy": {"password": "b"}}
    same_prefix = EnvDelivery(prefix="X_")
    with pytest.raises(InvalidRequestError, match="X_PASSWORD"):
        svc.launch(
            SecretRequest(name="api", delivery=same_prefix),
            SecretRequest(name="api-copy", delivery=same_prefix),
        )
    assert svc.cluster.count("create_pod") == 0
    assert len(svc.store.issued) == 1
    assert all_given_back(svc)
    assert failure_stage(svc) == "plan_secret_refs"


@pytest.mark.parametrize(
    ("secrets", "env"),
    [
        (
            [
                SecretRequest(name="wh", delivery=EnvDelivery(prefix="X_")),
                SecretRequest(name="wh-copy", delivery=EnvDelivery(prefix="X_")),
            ],
            {},
        ),
        ([SecretRequest(name="wh")], {"WH_PASSWORD": "plain"}),
    ],
    ids=["two-secrets", "plain-env"],
)
def test_env_collision_of_declared_keys_leaves_nothing_read_behind(
    svc: Services, secrets: list[SecretRequest], env: dict[str, str]
) -> None:
    with pytest.raises(InvalidRequestError, match="PASSWORD"):
        svc.launch(*secrets, env=env)
    # A read already started finishes on the pool; give it time to show up.
    wait_until(lambda: len(svc.store.issued) > 0, timeout=0.5)
    assert svc.cluster.count("create_pod") == 0
    assert all_given_back(svc)
