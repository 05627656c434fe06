"""check-dags decisions: the same decide() the broker uses, over declared tasks."""

from __future__ import annotations

from pathlib import Path

from airflow_plugin.secrets import env_secret, file_secret, parse_secrets
from broker.cli.check_dags import DeclaredTask, check_tasks, render_table
from broker.cli.policy_folder import load_policy_dir

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def task(dag_id: str, task_id: str, *specs: object) -> DeclaredTask:
    return DeclaredTask(dag_id, task_id, "dags/x.py", parse_secrets(list(specs)))  # type: ignore[arg-type]


def test_granted_denied_unknown_and_delivery_constraints() -> None:
    policy = load_policy_dir(POLICIES)
    results = check_tasks(
        policy,
        [
            task("analytics_etl_daily", "load", env_secret("warehouse-loader", prefix="WH_")),
            task("analytics_etl_daily", "peek", "warehouse-readonly", "payments-api"),
            task(
                "analytics_etl_daily",
                "load_files",
                file_secret("warehouse-loader", mount_path="/s"),
            ),
            task("ml_score_nightly", "score", "no-such-secret"),
        ],
    )
    assert [r.ok for r in results] == [True, False, False, False]
    assert results[1].denied == ("payments-api",)
    assert results[2].denied == ("warehouse-loader",)  # grant allows env delivery only
    assert "only env delivery" in results[2].reasons[0]
    assert results[3].unknown == ("no-such-secret",)


def test_table_aligns_columns() -> None:
    table = render_table([("DAG", "TASK"), ("a_long_dag", "t")])
    assert table.splitlines() == ["DAG         TASK", "a_long_dag  t"]


def test_dag_parsing_environment_is_scrubbed_of_credentials() -> None:
    from broker.cli.check_dags import scrubbed_environment

    environ = {
        "PATH": "/usr/bin",
        "AIRFLOW_HOME": "/a",
        "AIRFLOW__CORE__DAGS_FOLDER": "/d",
        "VAULT_TOKEN": "t",
        "VAULT_ADDR": "http://v",
        "bao_token": "t",
        "PODBROKER_VAULT__AUTH__TOKEN_FILE": "/f",
        "AIRFLOW_CONN_DB": "postgres://u:p@h/d",
        "AIRFLOW_VAR_API_KEY": "k",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql://u:p@h/d",
        "AIRFLOW__API_AUTH__JWT_SECRET": "s",
        "GITHUB_TOKEN": "t",
        "AWS_SECRET_ACCESS_KEY": "s",
        "PGPASSWORD": "p",
    }
    assert scrubbed_environment(environ) == {
        "PATH": "/usr/bin",
        "AIRFLOW_HOME": "/a",
        "AIRFLOW__CORE__DAGS_FOLDER": "/d",
    }


def test_check_dags_table_shows_control_characters_visibly() -> None:
    text = render_table([("DAG", "TASK"), ("d\n2026 forged", "t\x1b[2J")])
    assert len(text.splitlines()) == 2
    assert "d\\x0a2026 forged" in text and "\x1b" not in text
