"""`podbroker audit keygen|verify|report|export` end to end on real stores."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from broker.audit.keys import load_signing_key
from broker.audit.store import open_audit_store
from broker.cli.main import app
from podbroker_devstack.postgres import Postgres
from tests.unit.test_report import scenario

runner = CliRunner()


def seed(url: str, key_path: Path) -> int:
    events = scenario()
    with open_audit_store(url, load_signing_key(key_path)) as store:
        for event in events:
            store.append(event)
    return len(events)


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.key"
    result = runner.invoke(app, ["audit", "keygen", str(path)])
    assert result.exit_code == 0, result.output
    assert (path.stat().st_mode & 0o777) == 0o600
    return path


def test_keygen_refuses_to_overwrite(key_path: Path) -> None:
    before = key_path.read_bytes()
    result = runner.invoke(app, ["audit", "keygen", str(key_path)])
    assert result.exit_code == 2 and "already exists" in result.output
    assert key_path.read_bytes() == before


def test_verify_ok_then_tampered_on_postgres(
    postgres: Postgres, unique: str, key_path: Path
) -> None:
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "cli_{unique}"')
    url = postgres.url(f"cli_{unique}")
    count = seed(url, key_path)
    pub = f"{key_path}.pub"
    ok = runner.invoke(app, ["audit", "verify", "--store", url, "--public-key", pub])
    assert ok.exit_code == 0, ok.output
    assert f"OK: {count} records" in ok.output
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE audit_records SET event_json = REPLACE(event_json, "
                "'warehouse', 'w4rehouse') WHERE position = 7"
            )
        )
    engine.dispose()
    bad = runner.invoke(app, ["audit", "verify", "--store", url, "--public-key", pub])
    assert bad.exit_code == 1
    assert "BROKEN at position 7" in bad.output
    assert postgres.password not in bad.output


def test_report_formats_and_policies(tmp_path: Path, key_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    seed(url, key_path)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "catalog.yaml").write_text(
        "kind: catalog\nsecrets:\n"
        + "".join(
            f"  {name}: {{type: kv, mount: secret, path: ml/{name}}}\n"
            for name in ("gpu-quota", "warehouse", "ftp")
        )
    )
    (policies / "ml.yaml").write_text(
        "kind: team\nteam: ml\ngrants:\n"
        "  - id: train\n    dags: train_*\n    secrets: [gpu-quota, warehouse]\n"
        "  - id: legacy\n    dags: old_*\n    secrets: [ftp]\n"
    )
    window = ["--since", "2026-03-01", "--until", "2026-03-08T00:00:00Z"]
    table = runner.invoke(
        app, ["audit", "report", "--store", url, *window, "--policies", str(policies)]
    )
    assert table.exit_code == 0, table.output
    assert "remove grant ml/legacy" in table.output
    assert "remove warehouse from grant ml/train" in table.output

    out = tmp_path / "r.json"
    js = runner.invoke(
        app,
        [
            "audit",
            "report",
            "--store",
            url,
            *window,
            "--format",
            "json",
            "--output",
            str(out),
            "--secret",
            "warehouse",
        ],
    )
    assert js.exit_code == 0, js.output
    data = json.loads(out.read_text())
    assert [(s["secret"], s["uses"]) for s in data["secrets"]] == [("warehouse", 4)]

    html = tmp_path / "report" / "usage.html"
    h = runner.invoke(
        app, ["audit", "report", "--store", url, *window, "--format", "html", "--output", str(html)]
    )
    assert h.exit_code == 0
    for chart in ("uses per secret", "DAG by secret matrix"):
        assert f'aria-label="{chart}"' in html.read_text()

    csv_run = runner.invoke(app, ["audit", "report", "--store", url, "--format", "csv"])
    assert csv_run.exit_code == 0 and csv_run.output.startswith("section,")


def test_report_rejects_bad_input(tmp_path: Path, key_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    seed(url, key_path)
    bad_since = runner.invoke(app, ["audit", "report", "--store", url, "--since", "yesterday"])
    assert bad_since.exit_code != 0 and "yesterday" in bad_since.output
    bad_fmt = runner.invoke(app, ["audit", "report", "--store", url, "--format", "pdf"])
    assert bad_fmt.exit_code == 2 and "pdf" in bad_fmt.output
    policies = tmp_path / "p"
    policies.mkdir()
    (policies / "x.yaml").write_text("kind: team\nteam: a\ngrants:\n  - id: [unclosed\n")
    bad_pol = runner.invoke(app, ["audit", "report", "--store", url, "--policies", str(policies)])
    assert bad_pol.exit_code == 2 and "x.yaml:" in bad_pol.output
    missing = runner.invoke(app, ["audit", "report", "--store", f"sqlite:///{tmp_path}/none.db"])
    assert missing.exit_code == 2 and "no such file" in missing.output


def test_export_is_resumable_with_a_cursor(tmp_path: Path, key_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    count = seed(url, key_path)
    out, cursor = tmp_path / "siem.jsonl", tmp_path / "siem.cursor"
    args = ["audit", "export", "--store", url, "--output", str(out), "--cursor", str(cursor)]
    first = runner.invoke(app, [*args, "--limit", "10"])
    assert first.exit_code == 0, first.output
    assert json.loads(cursor.read_text()) == {"next_position": 11}
    rest = runner.invoke(app, args)
    assert rest.exit_code == 0, rest.output
    again = runner.invoke(app, args)  # nothing new: nothing written
    assert "exported 0 records" in again.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["position"] for r in lines] == list(range(1, count + 1))
    assert lines[1]["prev_hash"] == lines[0]["hash"]
    assert lines[0]["event"]["kind"] == "launch_requested"

    from_pos = runner.invoke(app, ["audit", "export", "--store", url, "--from", str(count)])
    assert from_pos.exit_code == 0
    assert json.loads(from_pos.stdout.splitlines()[0])["position"] == count


def test_relative_since() -> None:
    from broker.cli.audit import parse_when

    now = datetime(2026, 3, 10, tzinfo=UTC)
    assert parse_when("7d", now) == now - timedelta(days=7)
    assert parse_when("2026-03-01T05:00", now) == datetime(2026, 3, 1, 5, tzinfo=UTC)


def test_anchor_catches_truncation_rollback_and_rewrite(tmp_path: Path, key_path: Path) -> None:
    """Each replacement store below verifies on its own (a validly signed chain); only
    the anchor from an earlier verify tells it is not the history seen before."""
    pub, anchor = f"{key_path}.pub", tmp_path / "anchor.json"
    original = f"sqlite:///{tmp_path / 'original.db'}"
    count = seed(original, key_path)

    def verify(url: str) -> tuple[int, str]:
        result = runner.invoke(
            app, ["audit", "verify", "--store", url, "--public-key", pub, "--anchor", str(anchor)]
        )
        return result.exit_code, result.output

    code, output = verify(original)
    assert code == 0, output
    assert json.loads(anchor.read_text())["position"] == count

    emptied = f"sqlite:///{tmp_path / 'emptied.db'}"
    open_audit_store(emptied, load_signing_key(key_path)).close()
    shorter = f"sqlite:///{tmp_path / 'shorter.db'}"
    with open_audit_store(shorter, load_signing_key(key_path)) as store:
        for event in scenario()[: count - 2]:
            store.append(event)
    rewritten = f"sqlite:///{tmp_path / 'rewritten.db'}"
    with open_audit_store(rewritten, load_signing_key(key_path)) as store:
        for event in reversed(scenario()):
            store.append(event)
    for url, problem in (
        (emptied, "truncated or rolled back"),
        (shorter, "truncated or rolled back"),
        (rewritten, "history was rewritten"),
    ):
        plain = runner.invoke(app, ["audit", "verify", "--store", url, "--public-key", pub])
        assert plain.exit_code == 0, plain.output  # no anchor: the forgery passes
        code, output = verify(url)
        assert code == 1, output
        assert problem in output
    assert json.loads(anchor.read_text())["position"] == count  # a failure keeps the anchor

    with open_audit_store(original, load_signing_key(key_path)) as store:
        store.append(scenario()[0])
    code, output = verify(original)
    assert code == 0, output
    assert json.loads(anchor.read_text())["position"] == count + 1
