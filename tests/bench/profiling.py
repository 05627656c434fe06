"""py-spy (a sampling profiler, installed on demand: `uv pip install py-spy`) attached to
the broker process while a benchmark runs, and a plain-text summary of where its
samples went. Root is needed to attach (ptrace)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


class PySpy:
    """``py-spy record --format raw`` (collapsed stacks, one thread per root frame)."""

    def __init__(self, pid: int, folder: Path, rate: int = 200, *, idle: bool = True) -> None:
        self.pid = pid
        self.idle = idle
        folder.mkdir(parents=True, exist_ok=True)
        self.output = folder / f"broker-{pid}-{'wall' if idle else 'cpu'}.collapsed"
        self.rate = rate
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self._process = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(self.pid),
                "--format",
                "raw",
                "--rate",
                str(self.rate),
                "--threads",
                *(["--idle"] if self.idle else []),
                "--output",
                str(self.output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.send_signal(2)  # SIGINT: py-spy writes its output and exits
        self._process.wait(timeout=60)


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:line)" -> "function (file.py)"
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1] if where else ""
    return f"{name} ({file})" if file else name


def summarise_collapsed(path: Path, top: int = 25, focus: str = "LaunchExecutor.launch") -> str:
    """Inclusive and leaf sample shares over the stacks that pass through ``focus``
    (by default: request threads serving a launch), idle samples kept: a thread
    waiting on a lock or a socket shows where a launch waits."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or (focus and focus not in stack):
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        total += count
        for name in set(frames[1:]):  # frames[0] names the thread
            inclusive[name] += count
        leaf[frames[-1]] += count
    if not total:
        return "py-spy: no samples"
    lines = [
        f"py-spy: {total} samples of broker threads inside {focus or 'anything'} (idle included)",
        "inclusive:",
    ]
    lines += [f"  {c / total:6.1%}  {n}" for n, c in inclusive.most_common(top)]
    lines.append("leaf (where threads sit):")
    lines += [f"  {c / total:6.1%}  {n}" for n, c in leaf.most_common(top)]
    return "\n".join(lines)
