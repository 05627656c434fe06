"""Policy files: file:line:field errors, lint findings, export/load round trip, CLI lint."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli.main import app
from broker.cli.policy_folder import (
    lint_policy_dir,
    load_policy_dir,
    read_policy_dir,
    write_policy_dir,
)
from broker.core.policy import PolicyFileError, parse_policy_texts, render_policy_texts

EXAMPLES = Path(__file__).resolve().parents[2] / "policies"

CATALOG = """\
kind: catalog
secrets:
  wh:
    type: kv
    mount: secret
    path: a/wh
  api:
    type: kv
    mount: secret
    path: a/api
    sensitive: true
  spare:
    type: database
    mount: database
    role: ro
"""


def write(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text))
    return folder


def team(grants: str, name: str = "t") -> str:
    return f"kind: team\nteam: {name}\ngrants:\n" + textwrap.indent(textwrap.dedent(grants), "")


def test_examples_lint_clean() -> None:
    assert [str(i) for i in lint_policy_dir(EXAMPLES)] == []


def test_schema_errors_name_file_line_and_field(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "catalog.yaml": CATALOG.replace("path: a/api", "path: a/../api"),
            "teams/t.yaml": team(
                """\
                - id: g
                  dags: "etl_*"
                  secrets: [wh]
                  constraints: {delivery: pigeon}
                  colour: red
                """
            ),
        },
    )
    with pytest.raises(PolicyFileError) as caught:
        load_policy_dir(tmp_path)
    text = {str(i) for i in caught.value.issues}
    catalog, team_file = tmp_path / "catalog.yaml", tmp_path / "teams/t.yaml"
    assert any(t.startswith(f"{catalog}:10: secrets.api.path:") for t in text), text
    assert any(t.startswith(f"{team_file}:7: grants[0].constraints.delivery:") for t in text), text
    assert any(t.startswith(f"{team_file}:8: grants[0].colour:") for t in text), text
    assert caught.value.http_status == 422


def test_duplicates_are_errors(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "catalog.yaml": CATALOG,
            "more.yaml": "kind: catalog\nsecrets:\n  wh: {type: kv, mount: s, path: p}\n",
            "teams/t.yaml": team("- id: g\n  dags: a\n  secrets: [wh]\n"),
            "teams/t2.yaml": team("- id: h\n  dags: a\n  secrets: [wh]\n"),
            "dupkey.yaml": "kind: team\nteam: u\nteam: v\ngrants: []\n",
        },
    )
    messages = [str(i) for i in read_policy_dir(tmp_path).errors]
    assert any("more.yaml:3" in m and "duplicate secret name 'wh'" in m for m in messages)
    assert any("t2.yaml" in m and "duplicate team 't'" in m for m in messages)
    assert any("dupkey.yaml:3" in m and "duplicate key 'team'" in m for m in messages)


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    write(tmp_path, {"catalog.yaml": "kind: catalog\nsecrets:\n  wh: [unclosed\n"})
    (issue,) = read_policy_dir(tmp_path).errors
    assert issue.file.endswith("catalog.yaml") and issue.line >= 3 and "YAML" in issue.message


def test_lint_findings(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "catalog.yaml": CATALOG,
            "teams/t.yaml": team(
                """\
                - id: g
                  dags: "*"
                  secrets: [wh, api, ghost]
                - id: g
                  dags: etl
                  secrets: [wh]
                """
            ),
        },
    )
    issues = lint_policy_dir(tmp_path)
    errors = {str(i) for i in issues if i.severity == "error"}
    warnings = {str(i) for i in issues if i.severity == "warning"}
    team_file = tmp_path / "teams/t.yaml"
    assert f"{team_file}:6: grants[0].secrets[2]: grant names unknown secret 'ghost'" in errors
    assert any(e.startswith(f"{team_file}:5: grants[0].dags: over-broad") for e in errors)
    assert any("duplicate grant id t/g" in e for e in errors)
    assert any("catalog secret 'spare' is not granted" in w for w in warnings)
    with pytest.raises(PolicyFileError):
        load_policy_dir(tmp_path)  # lint errors block loading for apply

    result = CliRunner().invoke(app, ["policies", "lint", str(tmp_path)])
    assert result.exit_code == 1
    assert "ghost" in result.output and "warning:" in result.output


def test_lint_warns_that_a_digest_glob_is_not_a_pin(tmp_path: Path) -> None:
    digest = "sha256:" + "0123456789abcdef" * 4
    write(
        tmp_path,
        {
            "catalog.yaml": CATALOG,
            "teams/t.yaml": team(
                f"""\
                - id: sync
                  dags: sync
                  secrets: [api]
                  images:
                    - reg/sync@sha256:*
                    - reg/sync@sha256:0123?*
                    - reg/sync@{digest}
                    - reg/*@{digest}
                """
            ),
        },
    )
    team_file = tmp_path / "teams/t.yaml"
    about_images = [str(i) for i in lint_policy_dir(tmp_path) if ".images[" in str(i)]
    assert [w.split(": ", 2)[:2] for w in about_images] == [
        [f"{team_file}:8", "grants[0].images[0]"],
        [f"{team_file}:9", "grants[0].images[1]"],
    ]
    assert all("a glob in the digest is not a pin" in w for w in about_images)
    # On a grant of nothing sensitive neither a digest glob nor a tag is flagged.
    (tmp_path / "teams/t.yaml").write_text(
        team("- id: sync\n  dags: sync\n  secrets: [wh]\n  images: [reg/sync@sha256:*]\n")
    )
    assert not [i for i in lint_policy_dir(tmp_path) if ".images[" in str(i)]


def test_task_glob_makes_a_star_grant_narrow(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "catalog.yaml": "kind: catalog\nsecrets:\n  api: {type: kv, mount: s, path: p, "
            "sensitive: true}\n",
            "teams/t.yaml": team("- id: g\n  dags: '*'\n  tasks: notify\n  secrets: [api]\n"),
        },
    )
    assert [i for i in lint_policy_dir(tmp_path) if i.severity == "error"] == []


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    original = load_policy_dir(EXAMPLES)
    write_policy_dir(original, tmp_path / "out")
    assert load_policy_dir(tmp_path / "out") == original


def test_cli_lint_ok_and_usage_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["policies", "lint", str(EXAMPLES)])
    assert ok.exit_code == 0, ok.output
    assert runner.invoke(app, ["policies", "lint", str(tmp_path / "missing")]).exit_code == 2
    assert runner.invoke(app, ["policies", "lint"]).exit_code == 2


def test_text_parsing_needs_no_files() -> None:
    """Core parses (file name, text) pairs; the names only label the issues."""
    parsed = parse_policy_texts(
        [
            ("mem/catalog.yaml", CATALOG),
            ("mem/t.yaml", team("- id: g\n  dags: a\n  secrets: [x]\n")),
        ]
    )
    assert parsed.policy is not None
    (error,) = [i for i in parsed.lint() if i.severity == "error"]
    assert str(error) == "mem/t.yaml:6: grants[0].secrets[0]: grant names unknown secret 'x'"
    with pytest.raises(PolicyFileError):
        parsed.validated()

    policy = load_policy_dir(EXAMPLES)
    rendered = render_policy_texts(policy)
    assert parse_policy_texts(rendered.items()).validated() == policy
