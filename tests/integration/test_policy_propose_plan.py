"""Least privilege as a change (issue 16 item 13), on the real stack: the example
policies are in Vault, a launch uses some grants, the broker's JSON report proposes the
rest for removal, `policies propose` edits a copy of the files, and `policies plan
--prune` on the result shows exactly those removals and nothing else."""

from __future__ import annotations

import re
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from broker.cli.main import app
from broker.core.report import UsageReport
from podbroker_devstack.broker_env import BrokerHandle
from podbroker_devstack.kube import RUN_DURATION_ANNOTATION
from podbroker_devstack.openbao import OpenBao
from podbroker_devstack.sources import SourceTree

pytestmark = pytest.mark.stack

GRANT_LINE = re.compile(r"^([+~-]) grant (\S+?)(?::|$)")


def plan_lines(folder: Path, vault: OpenBao) -> set[str]:
    result = CliRunner().invoke(
        app,
        [
            "policies",
            "plan",
            str(folder),
            "--prune",
            "--vault-addr",
            vault.url,
            "--vault-token",
            vault.root_token,
        ],
    )
    assert result.exit_code == 0, result.output
    return set(result.output.splitlines())


def test_proposed_removals_are_exactly_what_plan_shows(
    broker: BrokerHandle, vault: OpenBao, sources: SourceTree, tmp_path: Path
) -> None:
    since = (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    task = {
        "dag_id": f"analytics_etl_propose_{uuid.uuid4().hex[:6]}",
        "task_id": "extract_orders",
        "run_id": "manual__p1",
    }
    launched = httpx.post(
        f"{broker.url}/v1/launches",
        json={
            "task": task,
            "container": {"image": "python:3.12-slim"},
            "secrets": ["warehouse-readonly", "orders-db"],
            "namespace": broker.namespace,
            "scheduling": {"annotations": {RUN_DURATION_ANNOTATION: "300s"}},
        },
        headers=broker.headers(),
        timeout=30,
    )
    assert launched.status_code == 201, launched.text
    httpx.delete(
        f"{broker.url}/v1/launches/{launched.json()['launch_id']}",
        headers=broker.headers(),
        timeout=30,
    )
    response = httpx.get(
        f"{broker.url}/v1/audit/report",
        params={"format": "json", "since": since},
        headers=broker.headers(),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    report = UsageReport.model_validate_json(response.text)
    unused = {g.grant_id: g for g in report.unused_grants}
    # The launch used warehouse-readonly through warehouse-etl: only its sibling goes.
    assert unused["analytics/warehouse-etl"].unused_secrets == ["warehouse-loader"]
    assert not unused["analytics/warehouse-etl"].remove_grant
    assert "analytics/orders-readonly" not in unused

    folder = tmp_path / "policies"
    shutil.copytree(sources.policies, folder)
    before = plan_lines(folder, vault)
    report_file = tmp_path / "report.json"
    report_file.write_text(response.text)
    proposed = CliRunner().invoke(
        app, ["policies", "propose", str(folder), "--from-report", str(report_file)]
    )
    assert proposed.exit_code == 0, proposed.output
    assert "-    secrets: [warehouse-readonly, warehouse-loader]" in proposed.output
    assert "+    secrets: [warehouse-readonly]" in proposed.output

    new = plan_lines(folder, vault) - before
    grant_changes = {
        (m.group(1), m.group(2)) for line in new if (m := GRANT_LINE.match(line)) is not None
    }
    expected = {("-" if g.remove_grant else "~", gid) for gid, g in unused.items()}
    assert grant_changes == expected, sorted(new)
    assert not [line for line in new if line.startswith("+")]
    partial = next(line for line in new if line.startswith("~ grant analytics/warehouse-etl"))
    assert "warehouse-loader" in partial
    # Every other new line is the Vault ACL policy of one of those grants.
    others = [line for line in new if GRANT_LINE.match(line) is None]
    assert all(" vault-policy " in line for line in others), others
    assert len(others) == len(expected)
