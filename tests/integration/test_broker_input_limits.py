"""The broker's front door on the real stack (issue 12): bounded bodies answered before
they are read, authentication before parsing, bounded counts and strings, Airflow's id
rules, no control characters (with a PostgreSQL audit store), refused requests audited
and counted, and a usage report scoped to its reader."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from airflow_plugin.client import BrokerClient
from airflow_plugin.settings import settings_from_connection
from broker.audit.store import open_audit_store
from broker.core.api_models import MAX_REPORT_QUERY_DAG_IDS
from broker.core.audit_events import AuditEvent, EventKind
from podbroker_devstack.broker_env import (
    SYSTEM_NAMESPACE,
    TOKEN_AUDIENCE,
    BrokerHandle,
    start_broker,
)
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION, ControlPlane
from podbroker_devstack.openbao import start_openbao
from podbroker_devstack.postgres import Postgres
from podbroker_devstack.sources import SourceTree
from tests.helpers import eventually

pytestmark = pytest.mark.stack

LIMIT = 1024 * 1024  # limits.max_body_bytes, the default


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory,
    kube: ControlPlane,
    postgres: Postgres,
    sources: SourceTree,
) -> Iterator[BrokerHandle]:
    """A broker with a PostgreSQL audit store, refusals counted over 2 s, and the dev
    token as the only report reader."""
    folder = tmp_path_factory.mktemp("guarded")
    unique = uuid.uuid4().hex[:8]
    database = f"audit_{unique}"
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    vault = start_openbao(folder / "openbao")
    handle = start_broker(
        folder / "broker",
        kube,
        vault,
        postgres,
        sources,
        task_namespace=f"guard-{unique}",
        extra_settings={
            "audit": {
                "url": postgres.url(database),
                "signing_key_file": str(folder / "audit.pem"),
            },
            "auth": {"report_readers": ["static:dev"]},
            "limits": {"refusal_interval_seconds": 2},
        },
    )
    yield handle
    handle.stop()
    vault.stop()


def launch_body(dag_id: str, **task: Any) -> dict[str, Any]:
    return {
        "task": {"dag_id": dag_id, "task_id": "load", "run_id": f"manual__{uuid.uuid4().hex}"}
        | task,
        "container": {"image": "python:3.12-slim", "command": ["python", "-c", "print(1)"]},
        "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "1s"}},
    }


def post(
    broker: BrokerHandle, payload: Any, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"{broker.url}/v1/launches",
        json=payload,
        headers=broker.headers() if headers is None else headers,
        timeout=30,
    )


def events(broker: BrokerHandle, kind: EventKind) -> list[AuditEvent]:
    with open_audit_store(broker.audit_url, create=False) as store:
        return [e for e in store.events() if e.kind == kind]


def test_an_oversized_body_is_refused_before_it_is_read(guarded: BrokerHandle) -> None:
    url = f"{guarded.url}/v1/launches"
    big = b"{" + b" " * (10 * 1024 * 1024) + b"}"
    json_type = {"Content-Type": "application/json"}
    # Declared too large: 413 whoever asks, without reading it.
    answer = httpx.post(url, content=big, headers=json_type, timeout=30)
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"] == "too_large"
    answer = httpx.post(url, content=big, headers={**json_type, **guarded.headers()}, timeout=30)
    assert answer.status_code == 413
    # Not read at all: the answer comes although the declared body is never sent.
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(
            b"POST /v1/launches HTTP/1.1\r\nHost: broker\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10485760\r\n\r\n"
        )
        assert raw.recv(64).startswith(b"HTTP/1.1 413")

    def chunks(total: int) -> Iterator[bytes]:
        sent = 0
        while sent < total:
            yield b" " * 65536
            sent += 65536

    # Chunked (no length declared): unauthenticated is 401 before a byte is read;
    # authenticated is counted while read and cut off at the limit.
    answer = httpx.post(url, content=chunks(10 * LIMIT), headers=json_type, timeout=30)
    assert answer.status_code == 401
    answer = httpx.post(
        url, content=chunks(2 * LIMIT), headers={**json_type, **guarded.headers()}, timeout=30
    )
    assert answer.status_code == 413
    # Not JSON: 415; under the limit and well formed: the launch goes ahead.
    answer = httpx.post(url, content=b"{}", headers=guarded.headers(), timeout=30)
    assert answer.status_code == 415
    assert post(guarded, launch_body("analytics_etl_limits")).status_code == 201


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda b: b.update(secrets=[f"s{i}" for i in range(65)]), "secrets"),
        (lambda b: b["container"].update(env={f"V{i}": "x" for i in range(257)}), "container.env"),
        (lambda b: b["container"].update(args=["x"] * 257), "container.args"),
        (lambda b: b["container"].update(command=["x" * 20000]), "container.command"),
        (
            lambda b: b["scheduling"].update(labels={f"l{i}": "v" for i in range(65)}),
            "scheduling.labels",
        ),
        (
            lambda b: b["scheduling"].update(tolerations=[{"key": f"k{i}"} for i in range(33)]),
            "scheduling.tolerations",
        ),
        (
            lambda b: b["scheduling"].update(node_selector={"k": "v" * 64}),
            "scheduling.node_selector",
        ),
        (
            lambda b: b["container"].update(resources={"limits": {"cpu": "1" * 65}}),
            "container.resources.limits",
        ),
        (lambda b: b["task"].update(map_index=True), "task.map_index"),
        (lambda b: b["task"].update(try_number="1"), "task.try_number"),
        (lambda b: b.update(timeout_seconds=False), "timeout_seconds"),
    ],
)
def test_counts_lengths_and_types_are_bounded(
    guarded: BrokerHandle, change: Any, field: str
) -> None:
    body = launch_body("analytics_etl_bounds")
    change(body)
    answer = post(guarded, body)
    assert answer.status_code == 422, answer.text
    assert field in answer.json()["reason"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda b: b["task"].update(dag_id="analytics_etl_\x00nul"), "task.dag_id"),
        (lambda b: b["task"].update(task_id="load\nforged line"), "task.task_id"),
        (lambda b: b["task"].update(run_id="manual__\x1b[31mred"), "task.run_id"),
        (lambda b: b["task"].update(dag_id="analytics etl"), "task.dag_id"),
        (lambda b: b["task"].update(run_id="run/../x"), "task.run_id"),
        (lambda b: b["container"].update(image="python\x00:3.12"), "container.image"),
        (lambda b: b["container"].update(args=["a\x00b"]), "container.args"),
        (lambda b: b["container"].update(env={"A": "x\x00"}), "container.env"),
        (lambda b: b["scheduling"].update(labels={"team": "a\x1bb"}), "scheduling.labels"),
        (lambda b: b["scheduling"]["annotations"].update({"x\ny": "1"}), "scheduling"),
        (lambda b: b.update(namespace="ns\x00"), "namespace"),
    ],
)
def test_control_characters_and_bad_ids_are_422_not_503(
    guarded: BrokerHandle, change: Any, field: str
) -> None:
    """On PostgreSQL a NUL reached the audit store and came back as a 503."""
    body = launch_body("analytics_etl_ctrl")
    change(body)
    answer = post(guarded, body)
    assert answer.status_code == 422, answer.text
    reason = answer.json()["reason"]
    assert field in reason
    assert not any(ch in reason for ch in "\x00\x1b\n")


CONTROL_CHARACTERS = ["\n", "\r", "\t", "\x1b", "\x00", "\x7f", "\x85", "\x9b"]
"""C0 (newline, CR, tab, ESC, NUL), DEL and C1 (NEL, CSI): they forge log and report
lines or drive a terminal, and PostgreSQL refuses NUL outright."""


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_control_characters_are_422_on_every_audit_store(
    request: pytest.FixtureRequest, store: str
) -> None:
    """Wherever a stored or echoed text comes in (ids, image, labels, namespace, the
    kill reason, report filters) a control character is refused with 422, whichever
    audit store the broker writes to (the session broker's SQLite, ``guarded``'s
    PostgreSQL), and the reason does not echo it."""
    broker: BrokerHandle = request.getfixturevalue("broker" if store == "sqlite" else "guarded")
    assert broker.audit_url.startswith(store)
    one = f"{broker.url}/v1/launches/0123456789abcdef0123"
    for char in CONTROL_CHARACTERS:
        answers = []
        for place, value in [
            (("task", "dag_id"), f"analytics_etl_x{char}y"),
            (("task", "task_id"), f"load{char}"),
            (("task", "run_id"), f"manual__{char}"),
            (("container", "image"), f"python{char}:3.12"),
            (("scheduling", "labels"), {"team": f"a{char}b"}),
            ((None, "namespace"), f"ns{char}"),
        ]:
            body = launch_body("analytics_etl_ctrl")
            (body if place[0] is None else body[place[0]])[place[1]] = value
            answers.append(post(broker, body))
        answers.append(httpx.delete(one, params={"reason": f"a{char}b"}, headers=broker.headers()))
        for name in ("team", "dag", "task", "secret"):
            answers.append(
                httpx.get(
                    f"{broker.url}/v1/audit/report",
                    params={"format": "table", name: f"x{char}y"},
                    headers=broker.headers(),
                    timeout=30,
                )
            )
        for answer in answers:
            assert answer.status_code == 422, (repr(char), answer.request.url, answer.text)
            assert char not in answer.json()["reason"], (repr(char), answer.text)


def test_airflow_ids_are_accepted(guarded: BrokerHandle) -> None:
    body = launch_body(
        "analytics_etl_ids.v2-x",
        task_id="group.load-1",
        run_id="scheduled__2026-01-01T00:00:00+00:00",
        map_index=3,
    )
    body["container"]["args"] = ["multi\nline\tscript"]  # passed to the pod, not stored
    assert post(guarded, body).status_code == 201


def test_refusals_are_audited_counted_and_reported(
    guarded: BrokerHandle, kube: ControlPlane
) -> None:
    missing = f"{guarded.url}/v1/launches/0123456789abcdef0123"
    flood_started = time.monotonic()
    for _ in range(30):
        assert httpx.get(missing, timeout=10).status_code == 401
    flood_seconds = time.monotonic() - flood_started
    etl = {"Authorization": f"Bearer {guarded.etl_token}"}
    marker = f"PLANTED-BODY-{uuid.uuid4().hex}"
    for _ in range(5):
        body = launch_body("payments_settlement")
        body["container"]["env"] = {"NOTE": marker}
        assert post(guarded, body, etl).status_code == 403  # a DAG outside its scope
    bad = launch_body("analytics_etl_refused")
    bad["container"]["env"] = {"NOTE": marker}
    bad["task"]["map_index"] = True
    assert post(guarded, bad).status_code == 422
    kill = httpx.delete(missing, params={"reason": "bad\nreason"}, headers=guarded.headers())
    assert kill.status_code == 422

    def counted() -> dict[tuple[Any, ...], int]:
        totals: dict[tuple[Any, ...], int] = {}
        for e in events(guarded, EventKind.REQUEST_REFUSED):
            d = e.details
            key = (e.caller, d["endpoint"], d["status"], d["reason_class"])
            totals[key] = totals.get(key, 0) + d["count"]
        return totals

    want = {
        (None, "GET /v1/launches/{launch_id}", 401, "unauthenticated"): 30,
        ("static:etl-only", "POST /v1/launches", 403, "out_of_scope"): 5,
        ("static:dev", "POST /v1/launches", 422, "invalid_request"): 1,
        ("static:dev", "DELETE /v1/launches/{launch_id}", 422, "invalid_request"): 1,
    }
    assert eventually(lambda: all(counted().get(k, 0) >= n for k, n in want.items()), timeout=20)
    refused = events(guarded, EventKind.REQUEST_REFUSED)
    unauthenticated = [e for e in refused if e.details["status"] == 401]
    # A flood stays a few records, each with a count: the first at once, then at most one
    # per 2 s interval the flood lasted (and one more for the interval it ended in).
    assert len(unauthenticated) <= 3 + int(flood_seconds / 2)
    assert len(unauthenticated) < 30
    assert unauthenticated[0].details["count"] == 1  # the first one at once
    assert all(marker not in e.canonical_json() for e in refused)  # never the body

    report = httpx.get(
        f"{guarded.url}/v1/audit/report", headers=guarded.headers(), timeout=30
    ).json()
    rows = [d for d in report["denials"] if d["launch_id"] is None]
    assert sum(d["count"] for d in rows if "401 unauthenticated" in d["reasons"][0]) >= 30
    assert any("out_of_scope" in d["reasons"][0] for d in rows)
    assert report["totals"]["requests_refused"] >= 37
    assert marker not in str(report)
    table = httpx.get(
        f"{guarded.url}/v1/audit/report",
        params={"format": "table"},
        headers=guarded.headers(),
        timeout=30,
    ).text
    assert "401 unauthenticated on GET /v1/launches/{launch_id}" in table


def refusal_counts(broker: BrokerHandle) -> dict[tuple[Any, ...], int]:
    totals: dict[tuple[Any, ...], int] = {}
    for e in events(broker, EventKind.REQUEST_REFUSED):
        d = e.details
        key = (e.caller, d["endpoint"], d["status"], d["reason_class"])
        totals[key] = totals.get(key, 0) + d["count"]
    return totals


def test_refusals_on_status_logs_and_kill_are_audited_and_reported(
    guarded: BrokerHandle,
) -> None:
    """A caller asking for a launch of a DAG outside its scope gets 403 on status, logs
    and kill, and a malformed log read 422: each is recorded and is a denial of the
    report, like a refused launch."""
    dag_id = f"ml_refused_{uuid.uuid4().hex[:6]}"
    made = post(guarded, launch_body(dag_id))
    assert made.status_code == 201, made.text
    one = f"{guarded.url}/v1/launches/{made.json()['launch_id']}"
    etl = {"Authorization": f"Bearer {guarded.etl_token}"}
    assert httpx.get(one, headers=etl, timeout=30).status_code == 403
    assert httpx.get(f"{one}/logs", headers=etl, timeout=30).status_code == 403
    assert httpx.delete(one, headers=etl, timeout=30).status_code == 403
    bad_read = httpx.get(
        f"{one}/logs", params={"since_seconds": 0}, headers=guarded.headers(), timeout=30
    )
    assert bad_read.status_code == 422, bad_read.text
    # The launch is untouched: the refused kill did not reach it.
    assert httpx.get(one, headers=guarded.headers(), timeout=30).json()["phase"] != "Deleted"

    want = [
        ("static:etl-only", "GET /v1/launches/{launch_id}", 403, "out_of_scope"),
        ("static:etl-only", "GET /v1/launches/{launch_id}/logs", 403, "out_of_scope"),
        ("static:etl-only", "DELETE /v1/launches/{launch_id}", 403, "out_of_scope"),
        ("static:dev", "GET /v1/launches/{launch_id}/logs", 422, "invalid_request"),
    ]
    assert eventually(lambda: all(refusal_counts(guarded).get(k, 0) >= 1 for k in want), 20), (
        refusal_counts(guarded)
    )
    report = httpx.get(f"{guarded.url}/v1/audit/report", headers=guarded.headers(), timeout=30)
    rows = [(d["caller"], d["reasons"][0]) for d in report.json()["denials"] if not d["launch_id"]]
    for caller, endpoint, status, reason_class in want:
        shown = f"{status} {reason_class} on {endpoint}:"
        assert any(c == caller and r.startswith(shown) for c, r in rows), (shown, rows)
    out_of_scope = [r for _, r in rows if r.startswith("403 out_of_scope on GET /v1/launches/{")]
    assert any(dag_id in r for r in out_of_scope), out_of_scope


def test_report_is_scoped_to_its_reader(guarded: BrokerHandle, kube: ControlPlane) -> None:
    unique = uuid.uuid4().hex[:6]
    etl_dag, other_dag = f"analytics_etl_scope{unique}", f"ml_scope{unique}"
    assert post(guarded, launch_body(etl_dag)).status_code == 201
    assert post(guarded, launch_body(other_dag)).status_code == 201
    url = f"{guarded.url}/v1/audit/report"

    def dags(headers: dict[str, str], **params: Any) -> set[str]:
        answer = httpx.get(url, headers=headers, params=params, timeout=30)
        assert answer.status_code == 200, answer.text
        return {d["dag_id"] for d in answer.json()["dags"]}

    everything = dags(guarded.headers())
    assert {etl_dag, other_dag} <= everything
    etl = {"Authorization": f"Bearer {guarded.etl_token}"}
    seen = dags(etl)
    assert etl_dag in seen
    assert all(d.startswith("analytics_etl_") for d in seen)
    refusals = httpx.get(url, headers=etl, timeout=30).json()["denials"]
    assert all(d["launch_id"] is not None for d in refusals)  # refusals: readers only
    assert dags(guarded.headers(), dag_ids=[other_dag]) == {other_dag}
    assert dags(etl, dag_ids=[other_dag, etl_dag]) == {etl_dag}
    # An authenticated identity that matches no callers rule reads nothing.
    stranger = kube.mint_token(SYSTEM_NAMESPACE, "podbroker", audiences=[TOKEN_AUDIENCE])
    answer = httpx.get(url, headers={"Authorization": f"Bearer {stranger}"}, timeout=30)
    assert answer.status_code == 403
    assert "matches no callers rule" in answer.json()["reason"]


def test_the_airflow_pages_query_names_thousands_of_readable_dags(guarded: BrokerHandle) -> None:
    """An Airflow admin of a large deployment may read thousands of DAGs, and the
    "Secret usage" page asks for every one of them, through the plugin's client.
    (Regression: the ids went into the URL; past a few hundred the page answered 500.)"""
    unique = uuid.uuid4().hex[:6]
    etl_dag, other_dag = f"analytics_etl_many{unique}", f"ml_many{unique}"
    assert post(guarded, launch_body(etl_dag)).status_code == 201
    assert post(guarded, launch_body(other_dag)).status_code == 201
    # 5,000 ids of 72 characters: some 370 KB, far past any URL limit.
    readable = [f"analytics_etl_reader_{n:05d}_{'x' * 45}" for n in range(5000)]

    def reported(token: str, dag_ids: list[str]) -> set[str]:
        connection = settings_from_connection(
            host=guarded.url, port=None, password=token, extra={"auth_method": "static_token"}
        )
        with BrokerClient(connection) as client:
            report = json.loads(client.audit_report(fmt="json", dag_ids=dag_ids))
        return {d["dag_id"] for d in report["dags"]}

    assert reported(guarded.token, [*readable, etl_dag, other_dag]) == {etl_dag, other_dag}
    assert reported(guarded.token, [*readable, other_dag]) == {other_dag}
    # The caller's own scope still applies: the etl-only token never sees ml_*.
    assert reported(guarded.etl_token, [*readable, etl_dag, other_dag]) == {etl_dag}
    # A body that is not JSON is 415; a list past the cap is 422 naming the field.
    url = f"{guarded.url}/v1/audit/report"
    form = httpx.post(url, headers=guarded.headers(), data={"format": "json"}, timeout=30)
    assert form.status_code == 415, form.text
    too_many = {"dag_ids": [f"d{n}" for n in range(MAX_REPORT_QUERY_DAG_IDS + 1)]}
    refused = httpx.post(url, headers=guarded.headers(), json=too_many, timeout=30)
    assert refused.status_code == 422, refused.text
    assert "dag_ids" in refused.json()["reason"]


def test_405_names_every_method_of_the_resource(guarded: BrokerHandle) -> None:
    one = f"{guarded.url}/v1/launches/0123456789abcdef0123"
    for method in ("PATCH", "PUT", "OPTIONS"):
        answer = httpx.request(method, one, headers=guarded.headers(), timeout=10)
        assert answer.status_code == 405
        assert {m.strip() for m in answer.headers["allow"].split(",")} == {"GET", "DELETE"}
    answer = httpx.request("PUT", f"{guarded.url}/v1/launches", headers=guarded.headers())
    assert answer.headers["allow"] == "POST"


def test_the_schema_documents_what_the_broker_answers(guarded: BrokerHandle) -> None:
    spec = httpx.get(f"{guarded.url}/openapi.json", timeout=10).json()
    launch = spec["paths"]["/v1/launches"]["post"]["responses"]
    assert {"200", "201", "401", "403", "404", "409", "413", "415", "422", "500", "503"} <= set(
        launch
    )
    report = spec["paths"]["/v1/audit/report"]["get"]["responses"]["200"]["content"]
    assert {"application/json", "text/csv", "text/html", "text/plain"} <= set(report)
    assert "Retry-After" in launch["503"]["headers"]
    assert spec["components"]["securitySchemes"]
    # A URL over uvicorn's limit (many long dag_ids; httpx will not even build one) is
    # uvicorn's 400 in plain text: documented for every operation under /v1.
    query = "&".join([f"dag_ids={'d' * 249}"] * 300).encode()
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(
            b"GET /v1/audit/report?" + query + b" HTTP/1.1\r\nHost: broker\r\n"
            b"Authorization: Bearer " + guarded.token.encode() + b"\r\n\r\n"
        )
        head = raw.recv(4096).lower()
    assert head.startswith(b"http/1.1 400"), head
    assert b"content-type: text/plain" in head, head
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v1/"):
                assert "text/plain" in operation["responses"]["400"]["content"], (method, path)
