"""Faults for the stack's own processes: freeze (SIGSTOP ... SIGCONT) a process with every
descendant, and SIGKILL. Only processes the stack started are signalled, by pid."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from podbroker_devstack.procs import ManagedProcess


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name may hold spaces; ppid is the 2nd field after its ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
            tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (PostgreSQL's backends start sessions of
    their own, so the process group alone misses them)."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def stop(process: ManagedProcess) -> list[int]:
    """SIGSTOP ``process`` and its descendants; the pids stopped, for :func:`resume`."""
    stopped: list[int] = []
    for pid in descendants(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
    return stopped


def resume(stopped: list[int]) -> None:
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def frozen(process: ManagedProcess) -> Iterator[None]:
    """SIGSTOP ``process`` and its descendants; SIGCONT them all on the way out."""
    stopped: list[int] = []
    try:
        stopped = stop(process)
        yield
    finally:
        resume(stopped)


def sigkill(process: ManagedProcess) -> None:
    """SIGKILL the process group ``process`` leads (a crash, no clean-up) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.popen is not None:
        process.popen.wait(10)
