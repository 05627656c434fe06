"""A throwaway PostgreSQL cluster from Debian's packages, on a free loopback port."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from podbroker_devstack.procs import ManagedProcess, StackError, free_port, wait_until


def find_postgres_bindir() -> Path:
    """$PODBROKER_PG_BINDIR, else the newest /usr/lib/postgresql/*/bin with initdb."""
    explicit = os.environ.get("PODBROKER_PG_BINDIR")
    dirs = (
        [explicit]
        if explicit
        else sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda d: int(Path(d).parent.name),
            reverse=True,
        )
    )
    for folder in dirs:
        if folder and (Path(folder) / "initdb").exists():
            return Path(folder)
    raise StackError(
        "PostgreSQL: no initdb found (apt-get install postgresql, or set PODBROKER_PG_BINDIR)"
    )


@dataclass
class Postgres:
    host: str
    port: int
    superuser: str
    password: str
    process: ManagedProcess

    def url(self, database: str = "postgres", *, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{self.superuser}:{self.password}@{self.host}:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        return (
            f"host={self.host} port={self.port} user={self.superuser} "
            f"password={self.password} dbname={database}"
        )

    def stop(self) -> None:
        self.process.stop()


def _run_as_postgres_user(argv: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; Debian's package creates the postgres user.
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser")
    if runuser is None:
        raise StackError("PostgreSQL: running as root needs `runuser` to drop to user postgres")
    return [runuser, "-u", "postgres", "--", *argv]


def start_postgres(folder: Path) -> Postgres:
    bindir = find_postgres_bindir()
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data"
    password = secrets.token_hex(12)
    pwfile = folder / "pwfile"
    pwfile.write_text(password)
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(pwfile, "postgres")
    initdb = _run_as_postgres_user(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
            "-E",
            "UTF8",
        ]
    )
    result = subprocess.run(initdb, capture_output=True, text=True, check=False)
    pwfile.unlink()
    if result.returncode != 0:
        raise StackError(f"PostgreSQL: initdb failed: {result.stderr.strip()}")
    port = free_port()
    argv = _run_as_postgres_user(
        [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(folder),
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ]
    )
    process = ManagedProcess("postgres", argv, folder / "postgres.log").start()
    pg_isready = bindir / "pg_isready"

    def ready() -> bool:
        check = subprocess.run(
            [str(pg_isready), "-h", "127.0.0.1", "-p", str(port)],
            capture_output=True,
            check=False,
        )
        return check.returncode == 0

    try:
        wait_until(ready, timeout=30, what="PostgreSQL", alive=process)
    except StackError:
        process.stop()
        raise
    return Postgres("127.0.0.1", port, "postgres", password, process)
