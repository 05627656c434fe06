"""The leak guard: issued values (raw, base64, URL-encoded) never pass through the log
stream the broker relays, whatever the chunking; exposures are audited, counted, and
revoke a dynamic credential when the grant says so."""

from __future__ import annotations

import base64
import random
from pathlib import Path
from urllib.parse import quote

import pytest

from broker.audit.store import open_audit_store
from broker.core.audit_events import EventKind
from broker.core.leakguard import MASK, LogMasker
from broker.core.leases import IssuedLease
from broker.core.policy import DatabaseSecret, Grant, KvSecret, PolicySet, Team
from broker.core.secret_value import SecretValue
from broker.metrics import SECRET_EXPOSURES
from broker.service.lookup import LaunchLookup
from tests.unit.fakes import CALLER, NAMESPACE, Services, make_task

PASSWORD = "pw-PLANTED-9c1e/2b+7d=x"


def masker(**values: str) -> LogMasker:
    return LogMasker({name: [SecretValue(v)] for name, v in values.items()})


def relay(m: LogMasker, chunks: list[bytes]) -> bytes:
    return b"".join(m.feed(c) for c in chunks) + m.flush()


def test_raw_base64_and_url_encoded_forms_are_masked() -> None:
    text = (
        f"password={PASSWORD}\n"
        f"b64={base64.b64encode(PASSWORD.encode()).decode()}\n"
        f"url={quote(PASSWORD, safe='')}\n"
        f"b64url={base64.urlsafe_b64encode(PASSWORD.encode()).decode().rstrip('=')}\n"
    ).encode()
    m = masker(db=PASSWORD)
    out = relay(m, [text])
    assert b"PLANTED" not in out and b"cHctUExBTlRFRC" not in out
    assert out.count(MASK) == 4
    assert m.exposed == {"db"}


@pytest.mark.parametrize("seed", range(20))
def test_a_value_split_over_any_chunk_boundaries_never_passes(seed: int) -> None:
    rng = random.Random(seed)
    text = f"start {PASSWORD} middle {PASSWORD[:5]} end {PASSWORD}".encode()
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    out = relay(masker(db=PASSWORD), chunks)
    assert PASSWORD.encode() not in out
    assert out == f"start *** middle {PASSWORD[:5]} end ***".encode()


def test_text_that_only_starts_like_a_value_is_released_at_the_end() -> None:
    m = masker(db=PASSWORD)
    assert m.feed(b"line one\npw-PLAN") == b"line one\n"
    assert m.flush() == b"pw-PLAN"
    assert m.exposed == set()


def test_the_longest_value_wins_over_its_own_prefix() -> None:
    m = masker(short="abcdef", long="abcdefghij")
    out = relay(m, [b"x abcde", b"fgh", b"ij y abcdef z"])
    assert out == b"x *** y *** z"
    assert m.exposed == {"short", "long"}


def test_short_values_are_not_masked() -> None:
    assert not masker(flag="on").active


def test_repr_names_no_value() -> None:
    assert PASSWORD not in repr(masker(db=PASSWORD))


# -- the service: the broker's log stream --------------------------------------------------


def exposure_policy(on_exposure: str) -> PolicySet:
    catalog: dict[str, KvSecret | DatabaseSecret] = {
        "wh": KvSecret(mount="secret", path="wh", keys=("user", "password")),
        "db": DatabaseSecret(mount="database", role="ro"),
    }
    grant = Grant(
        id="loaders",
        dags="etl_*",
        secrets=tuple(catalog),
        on_exposure=on_exposure,  # type: ignore[arg-type]
    )
    return PolicySet(catalog=catalog, teams={"etl": Team(grants=(grant,))})


@pytest.mark.parametrize("on_exposure", ["mask", "revoke"])
def test_log_stream_masks_audits_counts_and_revokes_per_grant(
    svc: Services, tmp_path: Path, on_exposure: str
) -> None:
    svc.policies.policy = exposure_policy(on_exposure)
    svc.store.kv_values["wh"] = {"user": "etl_user_7f3a", "password": PASSWORD}
    view = svc.launch("wh", "db")
    pod = svc.cluster.pods[(NAMESPACE, view.pod_name)]
    store = open_audit_store(f"sqlite:///{tmp_path / 'audit.db'}")
    ledger = store.holdings()
    lease_id = svc.store.issued_leases[0]
    ledger.hold(view.launch_id, NAMESPACE, lease_ids=[lease_id])
    ledger.track_lease(
        view.launch_id, IssuedLease(lease_id, "db", "etl/loaders", 600, 3600, 0.0), 400.0
    )
    db_password = f"db-password-{svc.store.count('resolve')}"
    svc.cluster.logs[(NAMESPACE, view.pod_name)] = [
        f"connecting as etl_user_7f3a with {PASSWORD[:9]}".encode(),
        f"{PASSWORD[9:]}\ndb {base64.b64encode(db_password.encode()).decode()}\n".encode(),
    ]
    lookup = LaunchLookup(
        cluster=svc.cluster,
        audit=svc.audit,
        cleanup=svc.cleanup,
        namespaces=(NAMESPACE,),
        policies=svc.policies,
        leases=ledger,
    )
    before = SECRET_EXPOSURES.labels("revoked")._value.get()
    out = b"".join(
        lookup.logs(CALLER, view.launch_id, follow=False, since_seconds=None, timestamps=False)
    )
    assert out == b"connecting as *** with ***\ndb ***\n"
    assert pod.launch_id == view.launch_id
    exposed = svc.audit.of_kind(EventKind.SECRET_EXPOSED)
    assert sorted(e.secret_names[0] for e in exposed) == ["db", "wh"]
    db_event = next(e for e in exposed if e.secret_names == ("db",))
    assert db_event.details["on_exposure"] == on_exposure
    assert PASSWORD not in str([e.to_json_dict() for e in svc.audit.events])
    if on_exposure == "revoke":
        assert lease_id in svc.store.revoked_leases
        assert db_event.details["revoked"] is True
        assert SECRET_EXPOSURES.labels("revoked")._value.get() == before + 1
        assert ledger.due_leases(10_000.0, 10) == []  # no renewal of a revoked lease
    else:
        assert svc.store.revoked_leases == []
    # A second stream of the same launch is masked too, but not a new exposure.
    again = b"".join(
        lookup.logs(CALLER, view.launch_id, follow=False, since_seconds=None, timestamps=False)
    )
    assert again == out
    assert len(svc.audit.of_kind(EventKind.SECRET_EXPOSED)) == 2
    assert make_task().dag_id == exposed[0].dag_id


def test_the_report_lists_exposures_without_values() -> None:
    from broker.core.audit_events import launch_event
    from broker.core.report import compute_report

    event = launch_event(
        EventKind.SECRET_EXPOSED,
        launch_id="l-1",
        task=make_task(),
        secret_names=["db"],
        grant="etl/loaders",
        on_exposure="revoke",
        revoked=True,
    )
    (exposure,) = compute_report([event]).exposures
    assert (exposure.secret, exposure.dag_id, exposure.revoked) == ("db", "etl_daily", True)
