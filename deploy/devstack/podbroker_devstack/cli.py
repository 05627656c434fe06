"""`podbroker-dev up` and `podbroker-dev demo`: the local stack (OpenBao, a Kubernetes
control plane with kwok, PostgreSQL), a real broker, and, for the demo, the example DAGs
run by Airflow, ending with the secret-usage report. Same code as the test fixtures.

Repository paths are options whose defaults are relative to the current directory, so
run it from the repository root (as `make demo` does) or pass them."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from podbroker_devstack.procs import StackError
from podbroker_devstack.sources import SourceTree

app = typer.Typer(
    name="podbroker-dev",
    help="Run podbroker locally on a real (throwaway) stack (development only).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # locals may hold secret values
)

_DEFAULTS = SourceTree.in_checkout(Path())
EXAMPLE_DAGS = Path("airflow_plugin") / "example_dags"
PoliciesOption = Annotated[Path, typer.Option(help="Policy folder applied to Vault.")]
ChartOption = Annotated[
    Path, typer.Option(help="Helm chart whose ServiceAccount and RBAC the broker gets.")
]
BuildScriptOption = Annotated[
    Path, typer.Option(help="Script that builds and names the cached binaries.")
]


def _sources(policies: Path, chart: Path, build_script: Path) -> SourceTree:
    sources = SourceTree(
        policies=policies.resolve(), chart=chart.resolve(), build_script=build_script.resolve()
    )
    try:
        sources.check()
    except StackError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    return sources


def _say(message: str) -> None:
    typer.echo(f"[{time.strftime('%H:%M:%S')}] {message}")


def _wait_for_ctrl_c() -> None:
    _say("running; press Ctrl-C to stop everything")
    try:
        signal.pause()
    except KeyboardInterrupt:
        _say("stopping ...")


def _airflow_dag_ids(env: dict[str, str]) -> list[str]:
    airflow = Path(sys.executable).parent / "airflow"
    # Airflow 3 lists DAGs from its database: parse the folder into it first.
    subprocess.run([str(airflow), "dags", "reserialize"], env=env, capture_output=True, check=False)
    result = subprocess.run(
        [str(airflow), "dags", "list", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        typer.echo(f"error: airflow dags list failed:\n{result.stderr[-2000:]}", err=True)
        raise typer.Exit(1)
    # Log lines may precede the JSON document; it is the last line that parses.
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("["):
            return sorted(item["dag_id"] for item in json.loads(line))
    typer.echo(f"error: airflow dags list printed no DAG list:\n{result.stdout[-2000:]}", err=True)
    raise typer.Exit(1)


def _expects_denial(database: Path, dag_id: str) -> bool:
    """A DAG tagged ``expect-denied`` asks for a secret it is not granted, on purpose."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        row = conn.execute(
            "SELECT 1 FROM dag_tag WHERE dag_id = ? AND name = 'expect-denied'", (dag_id,)
        ).fetchone()
    return row is not None


def _task_states(database: Path, dag_id: str) -> list[tuple[str, str]]:
    """Each task's final state in the DAG's latest run, read from Airflow's SQLite DB."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        rows = conn.execute(
            "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = "
            "(SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1) "
            "ORDER BY task_id",
            (dag_id, dag_id),
        ).fetchall()
    return [(str(task), str(state)) for task, state in rows]


@app.command()
def up(
    folder: Annotated[Path | None, typer.Option(help="Keep the stack's files here.")] = None,
    policies: PoliciesOption = _DEFAULTS.policies,
    chart: ChartOption = _DEFAULTS.chart,
    build_script: BuildScriptOption = _DEFAULTS.build_script,
) -> None:
    """Start OpenBao, the control plane, PostgreSQL and a broker; print where each
    listens; stop everything on Ctrl-C."""
    from podbroker_devstack.broker_env import start_broker
    from podbroker_devstack.stack import local_stack

    sources = _sources(policies, chart, build_script)
    with local_stack(sources, folder, progress=_say, keep_folder=folder is not None) as stack:
        _say("starting the broker (own ServiceAccount, Vault login by Kubernetes auth) ...")
        broker = start_broker(
            stack.folder / "broker", stack.kube, stack.vault, stack.postgres, sources
        )
        try:
            typer.echo("")
            typer.echo(
                f"  OpenBao      {stack.vault.url}   (dev root token in "
                f"{stack.folder}/openbao is test-only)"
            )
            typer.echo(f"  Kubernetes   {stack.kube.server}   KUBECONFIG={stack.kube.kubeconfig}")
            typer.echo(f"  PostgreSQL   {stack.postgres.host}:{stack.postgres.port}")
            typer.echo(f"  broker       {broker.url}   (config {broker.config_path})")
            typer.echo(f"  task pods    namespace {broker.namespace}")
            typer.echo("")
            _wait_for_ctrl_c()
        finally:
            broker.stop()


@app.command()
def demo(
    keep_running: Annotated[
        bool, typer.Option(help="Stay up after the demo until Ctrl-C.")
    ] = False,
    demo_dir: Annotated[
        Path, typer.Option(help="Where the HTML report and the Airflow output go.")
    ] = Path(".demo"),
    dags: Annotated[
        Path, typer.Option(help="DAG folder whose every DAG the demo runs.")
    ] = EXAMPLE_DAGS,
    policies: PoliciesOption = _DEFAULTS.policies,
    chart: ChartOption = _DEFAULTS.chart,
    build_script: BuildScriptOption = _DEFAULTS.build_script,
) -> None:
    """The whole story on this machine: stack, broker, policies applied, every example DAG
    run by `airflow dags test`, then the secret-usage report."""
    from podbroker_devstack.airflow_api import start_airflow_api
    from podbroker_devstack.airflow_env import prepare_airflow_home
    from podbroker_devstack.broker_env import (
        AIRFLOW_NAMESPACE,
        TOKEN_AUDIENCE,
        WORKER_SERVICE_ACCOUNT,
        start_broker,
    )
    from podbroker_devstack.stack import local_stack

    sources = _sources(policies, chart, build_script)
    if not dags.is_dir():
        typer.echo(f"error: no DAG folder {dags} (run from the repository root)", err=True)
        raise typer.Exit(2)
    began = time.monotonic()
    outcomes: list[tuple[str, list[tuple[str, str]], float, int, str, bool]] = []
    report_file = demo_dir / "podbroker-usage-report.html"
    with local_stack(sources, progress=_say) as stack:
        _say("preparing Airflow (SQLite, airflow db migrate) ...")
        env = prepare_airflow_home(stack.folder / "airflow", dags.resolve())
        _say("starting Airflow's API server (the broker verifies task instances with it) ...")
        airflow_api = start_airflow_api(stack.folder / "airflow-api", env)
        _say("starting the broker (own ServiceAccount, Vault login by Kubernetes auth) ...")
        try:
            broker = start_broker(
                stack.folder / "broker",
                stack.kube,
                stack.vault,
                stack.postgres,
                sources,
                extra_settings={"airflow": airflow_api.settings("enforce")},
            )
        except BaseException:
            airflow_api.stop()
            raise
        try:
            _say(f"broker ready at {broker.url}; example policies from {policies}/ applied")
            _say(f"task verification: enforce (every launch is checked with {airflow_api.url})")
            token_file = stack.folder / "worker-token"
            token_file.write_text(
                stack.kube.mint_token(
                    AIRFLOW_NAMESPACE, WORKER_SERVICE_ACCOUNT, audiences=[TOKEN_AUDIENCE]
                )
            )
            env["AIRFLOW_CONN_PODBROKER_DEFAULT"] = json.dumps(
                {
                    "conn_type": "podbroker",
                    "host": broker.url,
                    "extra": {
                        "auth_method": "service_account_token",
                        "token_file": str(token_file),
                        "namespace": broker.namespace,
                    },
                }
            )
            airflow = Path(sys.executable).parent / "airflow"
            demo_dir.mkdir(exist_ok=True)
            database = stack.folder / "airflow" / "airflow.db"
            for dag_id in _airflow_dag_ids(env):
                expect_denied = _expects_denial(database, dag_id)
                _say(f"airflow dags test {dag_id} ...")
                started = time.monotonic()
                run = subprocess.run(
                    [str(airflow), "dags", "test", dag_id],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                output = run.stdout + run.stderr
                (demo_dir / f"airflow-{dag_id}.log").write_text(output)
                states = _task_states(database, dag_id)
                denials = [line.strip() for line in output.splitlines() if "not granted" in line]
                denial = next((d for d in denials if "secrets not granted" in d), "")
                pod_lines = sum(1 for line in output.splitlines() if "podbroker-demo:" in line)
                ok = bool(states) and all(state == "success" for _, state in states)
                as_expected = (not ok and bool(denial)) if expect_denied else ok
                outcomes.append(
                    (dag_id, states, time.monotonic() - started, pod_lines, denial, as_expected)
                )
            typer.echo("")
            typer.echo("Example DAG runs (each task's final state):")
            for dag_id, states, seconds, pod_lines, denial, as_expected in outcomes:
                tasks = ", ".join(f"{task}={state}" for task, state in states) or "no task ran"
                mark = "ok " if as_expected else "!! "
                typer.echo(f"  {mark}{dag_id:<30} {seconds:5.1f}s  {tasks}")
                if pod_lines:
                    typer.echo(f"       {pod_lines} pod log lines reached the Airflow task log")
                if denial:
                    reason = (
                        denial[denial.find("secrets not") :] if "secrets not" in denial else denial
                    )
                    typer.echo(f"       denied: {reason[:150]}")
            typer.echo(f"  (full Airflow output per DAG in {demo_dir.resolve()})")
            typer.echo("")
            import httpx

            table = httpx.get(
                f"{broker.url}/v1/audit/report",
                params={"format": "table"},
                headers=broker.headers(),
                timeout=60,
            )
            typer.echo(table.text)
            html = httpx.get(
                f"{broker.url}/v1/audit/report",
                params={"format": "html"},
                headers=broker.headers(),
                timeout=60,
            )
            report_file.write_text(html.text)
            _say(f"HTML report written to {report_file.resolve()}")
            unexpected = [o[0] for o in outcomes if not o[5]]
            _say(f"demo finished in {time.monotonic() - began:.0f}s")
            if keep_running:
                typer.echo(f"  broker {broker.url}   KUBECONFIG={stack.kube.kubeconfig}")
                _wait_for_ctrl_c()
        finally:
            broker.stop()
            airflow_api.stop()
    unexpected = [dag_id for dag_id, *_, as_expected in outcomes if not as_expected]
    if unexpected:
        typer.echo(f"error: unexpected outcome for {', '.join(unexpected)}", err=True)
        raise typer.Exit(1)
