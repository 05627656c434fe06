"""`podbroker policies check-dags DAGS_DIR`: load a DAG folder with Airflow's DagBag,
list every BrokerPodOperator's declared secrets and decide them against the policy
(from a policies folder, or the one stored in Vault). For DAG repositories' CI, before
deploying: exit 1 with a table of task -> secrets not granted (or unknown), or when a
DAG file does not import.

Exit codes: 0 every declared secret is granted, 1 denials / unknown names / DAG import
errors / policy-file errors, 2 usage, 3 Vault unreachable or refused. Needs the
``airflow`` extra (DagBag); only names are read, never values.

DAG files are arbitrary code, and no process alive while they run has ever held the
Vault token. The command reads the policy first (from files, or from Vault with the
token), writes it to a private temporary file and replaces itself (``execve``: same
pid, new memory, argv and environment) with a fresh interpreter whose argv names only
the DAG folder and that file and whose environment is scrubbed of credentials
(:func:`scrubbed_environment`: Vault and broker settings, Airflow connections, tokens,
secrets, passwords). That process parses the DAGs in a child of its own (same clean
argv and environment; the decision is made outside the DAG code's process), where DAG
code finds no token in its own or its parent's ``/proc/<pid>/environ``, ``cmdline``
or memory.
``--vault-token`` is deprecated: a command line is readable by every local process
(``ps``, ``/proc/<pid>/cmdline``) until the exec replaces it; use ``VAULT_TOKEN``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, NoReturn

import typer

from broker.core.escaping import visible
from broker.core.models import SecretRequest, TaskIdentity
from broker.core.policy import PolicySet, decide
from broker.errors import BrokerError
from broker.vault import names

# check-dags decides without a real run; grants match on dag and task ids only.
CHECK_RUN_ID = "check-dags"


@dataclass(frozen=True)
class DeclaredTask:
    """One BrokerPodOperator task and the secret names it declares."""

    dag_id: str
    task_id: str
    fileloc: str
    secrets: tuple[SecretRequest, ...]


@dataclass(frozen=True)
class TaskCheck:
    task: DeclaredTask
    denied: tuple[str, ...]
    unknown: tuple[str, ...]
    reasons: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.denied and not self.unknown


def check_tasks(policy: PolicySet, tasks: Iterable[DeclaredTask]) -> list[TaskCheck]:
    """Decide each task's declared secrets exactly as the broker would at launch time
    (same :func:`broker.core.policy.decide`, including delivery constraints)."""
    results = []
    for task in tasks:
        identity = TaskIdentity(dag_id=task.dag_id, task_id=task.task_id, run_id=CHECK_RUN_ID)
        decision = decide(policy, identity, task.secrets)
        results.append(
            TaskCheck(
                task=task,
                denied=tuple(decision.denied),
                unknown=tuple(decision.unknown),
                reasons=tuple(decision.reasons),
            )
        )
    return results


def _declared(task: Any) -> tuple[SecretRequest, ...] | None:
    """Secrets of a BrokerPodOperator (also a mapped one, from its partial kwargs)."""
    from airflow_plugin.operator import BrokerPodOperator
    from airflow_plugin.secrets import parse_secrets

    if isinstance(task, BrokerPodOperator):
        return task.secret_requests
    operator_class = getattr(task, "operator_class", None)
    if isinstance(operator_class, type) and issubclass(operator_class, BrokerPodOperator):
        return parse_secrets(getattr(task, "partial_kwargs", {}).get("secrets"))
    return None


def load_declared_tasks(dags_dir: Path) -> tuple[list[DeclaredTask], dict[str, str]]:
    """Parse ``dags_dir`` with Airflow's DagBag (no metadata database needed); return
    the BrokerPodOperator tasks and the import errors by file."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(dags_dir), collect_dags=True)
    tasks = []
    for dag_id in sorted(bag.dags):
        dag = bag.dags[dag_id]
        for task in sorted(dag.tasks, key=lambda t: t.task_id):
            secrets = _declared(task)
            if secrets is None:
                continue
            tasks.append(
                DeclaredTask(
                    dag_id=dag_id,
                    task_id=task.task_id,
                    fileloc=str(getattr(dag, "fileloc", "") or ""),
                    secrets=secrets,
                )
            )
    return tasks, dict(bag.import_errors)


# Environment variables a DAG file must never see (matched case-insensitively).
_CREDENTIAL_VARIABLE: Final = re.compile(
    r"^(VAULT_|BAO_|PODBROKER_|AIRFLOW_CONN_|AIRFLOW_VAR_)"
    r"|_TOKEN$|SECRET|PASSWORD|PASSWD|^AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    re.IGNORECASE,
)


def scrubbed_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without anything that may hold a credential or point at one: VAULT_*,
    BAO_*, PODBROKER_* (incl. token file settings), AIRFLOW_CONN_*, AIRFLOW_VAR_*,
    *_TOKEN, *SECRET*, *PASSWORD*, and the metadata database URL."""
    return {k: v for k, v in environ.items() if not _CREDENTIAL_VARIABLE.search(k)}


def _task_to_json(task: DeclaredTask) -> dict[str, Any]:
    return {
        "dag_id": task.dag_id,
        "task_id": task.task_id,
        "fileloc": task.fileloc,
        "secrets": [s.model_dump(mode="json") for s in task.secrets],
    }


def _task_from_json(data: dict[str, Any]) -> DeclaredTask:
    return DeclaredTask(
        dag_id=str(data["dag_id"]),
        task_id=str(data["task_id"]),
        fileloc=str(data["fileloc"]),
        secrets=tuple(SecretRequest.model_validate(s) for s in data["secrets"]),
    )


def load_declared_tasks_isolated(
    dags_dir: Path, environ: Mapping[str, str] | None = None
) -> tuple[list[DeclaredTask], dict[str, str]]:
    """:func:`load_declared_tasks` in a child Python process with a scrubbed
    environment; the result comes back as JSON through a file of a private temporary
    folder. The child's own output goes to stderr. ValueError if the child fails."""
    with tempfile.TemporaryDirectory(prefix="podbroker-check-dags-") as folder:
        result_path = Path(folder) / "result.json"
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "broker.cli.check_dags",
                "parse",
                str(dags_dir),
                str(result_path),
            ],
            env=scrubbed_environment(os.environ if environ is None else environ),
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),
            check=False,
        )
        try:
            result = json.loads(result_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"parsing the DAG folder failed (exit status {child.returncode})"
            ) from exc
    if "error" in result:
        raise ValueError(str(result["error"]))
    tasks = [_task_from_json(t) for t in result["tasks"]]
    return tasks, {str(k): str(v) for k, v in result["import_errors"].items()}


def _parse_main(dags_dir: Path, result_path: Path) -> int:
    """In the DAG-parsing child: parse ``dags_dir``, write the JSON result."""
    try:
        tasks, import_errors = load_declared_tasks(dags_dir)
        result: dict[str, Any] = {
            "tasks": [_task_to_json(t) for t in tasks],
            "import_errors": import_errors,
        }
    except ValueError as exc:
        result = {"error": str(exc)}
    result_path.write_text(json.dumps(result))
    return 0


def _continue_without_credentials(dags_dir: Path, policy: PolicySet) -> NoReturn:
    """Replace this process (which may have held the token, in its memory, environment
    or argv) with a fresh interpreter that decides ``policy`` for ``dags_dir``. The
    policy goes through a file in a private (0700) temporary folder, which the new
    process deletes before any DAG code runs."""
    folder = Path(tempfile.mkdtemp(prefix="podbroker-check-dags-"))
    policy_path = folder / "policy.json"
    policy_path.write_text(policy.model_dump_json())
    argv = [sys.executable, "-m", "broker.cli.check_dags", "decide"]
    argv += [str(dags_dir.resolve()), str(policy_path)]
    sys.stdout.flush()  # execve discards what is still buffered
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, scrubbed_environment(os.environ))  # noqa: S606 (our interpreter)
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        typer.echo(f"error: could not start the checking process: {exc.strerror}", err=True)
        raise typer.Exit(1) from exc


def _decide_main(dags_dir: Path, policy_path: Path) -> int:
    """In the process :func:`_continue_without_credentials` started: read and delete
    the policy file, then parse (in a child) and report; returns the exit status."""
    try:
        policy = PolicySet.model_validate_json(policy_path.read_text())
    finally:
        shutil.rmtree(policy_path.parent, ignore_errors=True)
    try:
        tasks, import_errors = load_declared_tasks_isolated(dags_dir)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 1
    return report(policy, tasks, import_errors)


def render_table(rows: Sequence[Sequence[str]]) -> str:
    # Ids come from DAG code: a control character must not forge a line of the table.
    cells = [[visible(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def _policy_from_vault(
    addr: str, token: str, ca_file: str | None, mount: str, prefix: str
) -> PolicySet:
    """Read the stored policy from Vault (``podbroker`` KV v2 mount, read only)."""
    from broker.cli.vault import connect, fail
    from broker.vault.layout import VaultLayout
    from broker.vault.policy_store import export_policy

    session = connect(addr, token, ca_file)
    try:
        return export_policy(
            session.hvac_client, VaultLayout(config_mount=mount, policy_prefix=prefix)
        )
    except BrokerError as exc:
        fail(exc)


def check_dags(
    ctx: typer.Context,
    dags_dir: Annotated[
        Path,
        typer.Argument(exists=True, file_okay=False, dir_okay=True, help="The DAG folder."),
    ],
    policies: Annotated[
        Path | None,
        typer.Option(
            "--policies",
            exists=True,
            file_okay=False,
            dir_okay=True,
            help="Policy folder to check against (instead of Vault).",
        ),
    ] = None,
    vault_addr: Annotated[
        str, typer.Option("--vault-addr", envvar="VAULT_ADDR", help="Vault URL.")
    ] = "",
    vault_token: Annotated[
        str,
        typer.Option(
            "--vault-token",
            envvar="VAULT_TOKEN",
            help="Deprecated as an option (every local process can read a command line): "
            "set VAULT_TOKEN. Never printed.",
            show_default=False,
        ),
    ] = "",
    vault_ca_file: Annotated[
        str | None, typer.Option("--vault-ca-file", envvar="VAULT_CACERT")
    ] = None,
    config_mount: Annotated[str, typer.Option("--config-mount")] = names.CONFIG_MOUNT,
    policy_prefix: Annotated[str, typer.Option("--policy-prefix")] = names.GRANT_POLICY_PREFIX,
) -> None:
    """Check every BrokerPodOperator's declared secrets against the policies."""
    if policies is not None:
        from broker.cli.policy_folder import load_policy_dir
        from broker.core.policy import PolicyFileError

        try:
            policy = load_policy_dir(policies)
        except PolicyFileError as exc:
            for issue in exc.issues:
                typer.echo(f"error: {issue}", err=True)
            raise typer.Exit(1) from exc
    elif vault_addr:
        source = ctx.get_parameter_source("vault_token")
        if source is not None and source.name == "COMMANDLINE":
            typer.echo(
                "warning: --vault-token is deprecated: a command line is readable by every "
                "local process (ps, /proc/PID/cmdline); set VAULT_TOKEN instead",
                err=True,
            )
        policy = _policy_from_vault(
            vault_addr, vault_token, vault_ca_file, config_mount, policy_prefix
        )
    else:
        typer.echo("error: give --policies DIR or --vault-addr (or VAULT_ADDR)", err=True)
        raise typer.Exit(2)
    _continue_without_credentials(dags_dir, policy)


def report(policy: PolicySet, tasks: list[DeclaredTask], import_errors: dict[str, str]) -> int:
    """Print the import errors, the table and the reasons; the exit status (1 when a
    task has secrets not granted or a DAG file failed to import)."""
    for file, message in sorted(import_errors.items()):
        last = message.strip().splitlines()[-1] if message.strip() else "import failed"
        typer.echo(f"error: {visible(file)}: DAG import failed: {visible(last)}", err=True)

    results = check_tasks(policy, tasks)
    rows = [("DAG", "TASK", "SECRETS", "RESULT")]
    for r in results:
        if r.ok:
            outcome = "granted"
        else:
            parts = []
            if r.denied:
                parts.append(f"not granted: {', '.join(r.denied)}")
            if r.unknown:
                parts.append(f"unknown: {', '.join(r.unknown)}")
            outcome = "; ".join(parts)
        names = ", ".join(s.name for s in r.task.secrets) or "-"
        rows.append((r.task.dag_id, r.task.task_id, names, outcome))
    typer.echo(render_table(rows))
    failing = [r for r in results if not r.ok]
    for r in failing:
        for reason in r.reasons:
            typer.echo(visible(f"  {r.task.dag_id}.{r.task.task_id}: {reason}"))
    typer.echo(
        f"{len(results)} task(s) checked, {len(failing)} with secrets not granted, "
        f"{len(import_errors)} DAG file(s) failed to import"
    )
    return 1 if failing or import_errors else 0


def register(policies_app: typer.Typer) -> None:
    """Add ``check-dags`` to the ``podbroker policies`` sub-app."""
    policies_app.command("check-dags")(check_dags)


if __name__ == "__main__":
    # Internal entry points: "decide DAGS_DIR POLICY_FILE" (the credential-free process
    # check-dags execs into) and "parse DAGS_DIR RESULT_FILE" (its DAG-parsing child).
    _step, _dags, _file = sys.argv[1:4]
    _steps = {"decide": _decide_main, "parse": _parse_main}
    sys.exit(_steps[_step](Path(_dags), Path(_file)))
