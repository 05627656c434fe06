"""Child processes of the local stack: started in their own process group, logged to a
file, recorded in a pid registry so a crashed earlier run can be cleaned up, and stopped
by their own pid only."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class StackError(RuntimeError):
    """A part of the local stack could not be started; the message says which and why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    alive: ManagedProcess | None = None,
) -> None:
    """Poll ``check`` until it returns True; raise StackError naming ``what`` on timeout
    or if ``alive`` exits first (with the tail of its log, which holds the reason)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.exited():
            raise StackError(f"{what}: {alive.name} exited early\n{alive.log_tail()}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(interval)
    tail = f"\n{alive.log_tail()}" if alive is not None else ""
    raise StackError(f"{what}: not ready after {timeout:.0f}s{tail}")


def _registry_dir() -> Path:
    root = Path(os.environ.get("PODBROKER_CACHE", Path.home() / ".cache" / "podbroker"))
    path = root / "running"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def reap_stale_processes() -> list[str]:
    """Stop processes recorded by an earlier run whose owner (the pid that started them)
    is gone. A record is honoured only if the pid still runs the recorded command line,
    so a recycled pid is never signalled. Returns what was stopped."""
    stopped: list[str] = []
    for record_path in _registry_dir().glob("*.json"):
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record_path.unlink(missing_ok=True)
            continue
        owner_alive = _cmdline(int(record["owner"])) is not None
        if owner_alive:
            continue
        pid = int(record["pid"])
        if _cmdline(pid) == record["argv"]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(f"{record['name']} (pid {pid})")
        record_path.unlink(missing_ok=True)
    return stopped


@dataclass
class ManagedProcess:
    """One server process of the stack."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise StackError(f"{self.name}: cannot run {self.argv[0]!r}: {exc.strerror}") from exc
        finally:
            log.close()
        self._record().write_text(
            json.dumps(
                {
                    "name": self.name,
                    "pid": self.popen.pid,
                    "owner": os.getpid(),
                    "argv": [str(a) for a in self.argv],
                }
            )
        )
        return self

    def _record(self) -> Path:
        assert self.popen is not None
        return _registry_dir() / f"{self.popen.pid}.json"

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def exited(self) -> bool:
        return self.popen is not None and self.popen.poll() is not None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group this process leads, then SIGKILL after ``timeout``."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        self._record().unlink(missing_ok=True)
