"""The whole local stack (OpenBao, control plane, PostgreSQL), used by the pytest
fixtures and by `podbroker-dev up` / `make demo` alike."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from podbroker_devstack.binaries import control_plane_binaries
from podbroker_devstack.kube import ControlPlane, start_control_plane
from podbroker_devstack.openbao import OpenBao, start_openbao
from podbroker_devstack.postgres import Postgres, start_postgres
from podbroker_devstack.procs import reap_stale_processes
from podbroker_devstack.sources import SourceTree


def make_stack_folder(prefix: str = "podbroker-stack-") -> Path:
    """A fresh folder for one run; world-traversable so PostgreSQL (which cannot run
    as root) can reach its data directory inside it."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


@dataclass
class LocalStack:
    folder: Path
    vault: OpenBao
    kube: ControlPlane
    postgres: Postgres

    def stop(self) -> None:
        for part in (self.kube, self.vault, self.postgres):
            with contextlib.suppress(Exception):
                part.stop()


T = TypeVar("T")


def _timed(progress: Callable[[str], None], what: str, start: Callable[[], T]) -> T:
    began = time.monotonic()
    progress(f"starting {what} ...")
    result = start()
    progress(f"{what} ready in {time.monotonic() - began:.1f}s")
    return result


@contextlib.contextmanager
def local_stack(
    sources: SourceTree,
    folder: Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
    keep_folder: bool = False,
) -> Iterator[LocalStack]:
    """Start every part (binaries from ``sources.build_script``), yield the stack, stop
    every part (also on Ctrl-C or error)."""
    for stale in reap_stale_processes():
        progress(f"stopped a leftover process from a crashed run: {stale}")
    folder = folder or make_stack_folder()
    started: list[Callable[[], None]] = []
    try:
        vault = _timed(progress, "OpenBao", lambda: start_openbao(folder / "openbao"))
        started.append(vault.stop)
        postgres = _timed(progress, "PostgreSQL", lambda: start_postgres(folder / "postgres"))
        started.append(postgres.stop)
        kube = _timed(
            progress,
            "Kubernetes control plane (etcd, apiserver, controllers, kwok)",
            lambda: start_control_plane(
                folder / "kube", control_plane_binaries(sources.build_script)
            ),
        )
        started.append(kube.stop)
        yield LocalStack(folder, vault, kube, postgres)
    finally:
        for stop in reversed(started):
            with contextlib.suppress(Exception):
                stop()
        if not keep_folder and not os.environ.get("PODBROKER_KEEP_STACK"):
            shutil.rmtree(folder, ignore_errors=True)
