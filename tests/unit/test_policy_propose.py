"""`podbroker policies propose --from-report` (issue 16 item 13): the report's proposed
removals become edits of the policy files that keep comments and layout, and the edited
folder still validates. The real-stack check (plan shows exactly these removals) is in
tests/integration/test_policy_propose_plan.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli.main import app
from broker.cli.policy_edits import Removal, propose, removals_from_report
from broker.cli.policy_folder import load_policy_dir, policy_files
from broker.core.report import compute_report, grant_refs_from_policy

POLICIES = Path(__file__).resolve().parents[2] / "policies"

COMMENTED = """\
# Team file kept by hand: comments must survive.
kind: team
team: analytics
grants:
  # the ETL grant
  - id: warehouse-etl
    dags: 'analytics_etl_*'   # single quotes stay
    secrets:
      - warehouse-readonly   # still used
      - warehouse-loader     # unused
    constraints: {delivery: env}
  - id: reports-upload
    dags: "analytics_reports_*"
    secrets: [s3-reports]
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICIES, target)
    (target / "teams" / "analytics.yaml").write_text(COMMENTED)
    return target


def test_a_partial_removal_keeps_comments_quotes_and_layout(folder: Path) -> None:
    removal = Removal("analytics", "warehouse-etl", ("warehouse-loader",), whole_grant=False)
    result = propose(policy_files(folder), [removal])
    [edit] = result.edits
    assert edit.after == COMMENTED.replace("      - warehouse-loader     # unused\n", "")
    assert result.not_found == []


def test_a_whole_grant_goes_and_the_rest_stays(folder: Path) -> None:
    removal = Removal("analytics", "reports-upload", ("s3-reports",), whole_grant=True)
    [edit] = propose(policy_files(folder), [removal]).edits
    assert "reports-upload" not in edit.after
    assert edit.after.startswith("# Team file kept by hand")
    assert "# the ETL grant" in edit.after and "# still used" in edit.after
    diff = edit.diff(folder)
    assert diff.startswith("--- a/teams/analytics.yaml\n+++ b/teams/analytics.yaml\n")
    assert [line for line in diff.splitlines() if line.startswith("+")] == [
        "+++ b/teams/analytics.yaml"
    ]


def test_removing_every_secret_removes_the_grant(folder: Path) -> None:
    removal = Removal("analytics", "reports-upload", ("s3-reports",), whole_grant=False)
    [edit] = propose(policy_files(folder), [removal]).edits
    assert "reports-upload" not in edit.after


def test_an_unknown_grant_is_reported_not_invented(folder: Path) -> None:
    removal = Removal("analytics", "nope", ("x",), whole_grant=True)
    result = propose(policy_files(folder), [removal])
    assert result.edits == [] and result.not_found == [removal]


def test_the_cli_writes_the_example_report_proposals_and_the_result_validates(
    folder: Path, tmp_path: Path
) -> None:
    policy = load_policy_dir(folder)
    before = {p: p.read_text() for p in policy_files(folder)}
    report = compute_report([], grant_refs_from_policy(policy))  # nothing used: all unused
    report_file = tmp_path / "report.json"
    report_file.write_text(report.model_dump_json())
    runner = CliRunner()

    dry = runner.invoke(
        app, ["policies", "propose", str(folder), "--from-report", str(report_file), "--dry-run"]
    )
    assert dry.exit_code == 0, dry.output
    assert "--- a/teams/payments.yaml" in dry.output
    assert {p: p.read_text() for p in policy_files(folder)} == before  # nothing written

    done = runner.invoke(
        app, ["policies", "propose", str(folder), "--from-report", str(report_file)]
    )
    assert done.exit_code == 0, done.output
    assert f"applied {len(report.unused_grants)} of {len(report.unused_grants)}" in done.output
    after = load_policy_dir(folder)  # still valid policy files
    assert after.grants() == []
    assert after.catalog == policy.catalog
    assert (folder / "catalog.yaml").read_text() == before[folder / "catalog.yaml"]
    again = propose(policy_files(folder), removals_from_report(report.unused_grants))
    assert again.edits == []  # nothing left to remove
