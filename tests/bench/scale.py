"""Scale figures of issue 15, each with its goal, in one run on the real local stack.

    python -m tests.bench.scale [--bursts 50,200,500] [--kinds no_secrets,kv]
        [--cleanup 100] [--grants 10,1000,10000] [--apply-grants 10000]
        [--audit-events 100000] [--streams 200] [--profile FOLDER] [--only burst,...]

Figures (sections, in this order): burst (launches at once against the floor at the same
concurrency), cleanup (pod end to Secret deleted and leases revoked, alone and during a
burst), policy (decision time by number of grants; plan/apply of many grants against the
real OpenBao), audit (report and verify time over a long trail), memory (broker RSS idle,
after the launches, with followed log streams). Prints one summary table with the
machine (cores, load); asserts nothing about time. ``--profile`` records the broker
process with py-spy (all threads, idle included) during the bursts and prints where its
samples went."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client

from podbroker_devstack.broker_env import BrokerHandle, start_broker
from podbroker_devstack.sources import SourceTree
from podbroker_devstack.stack import local_stack
from tests.bench import burst as bursts
from tests.bench import cleanup as cleanups
from tests.bench.profiling import PySpy, summarise_collapsed

SECTIONS = ("burst", "cleanup", "policy", "audit", "memory")


@dataclass
class Figure:
    section: str
    name: str
    value: str
    goal: str = ""
    verdict: str = ""  # "ok", "MISS", or "" when there is no goal


@dataclass
class ScaleReport:
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)
    setup_s: float = 0.0
    wall_s: float = 0.0

    def add(
        self, section: str, name: str, value: str, goal: str = "", ok: bool | None = None
    ) -> None:
        verdict = "" if ok is None else ("ok" if ok else "MISS")
        self.figures.append(Figure(section, name, value, goal, verdict))

    def sections(self) -> set[str]:
        return {f.section for f in self.figures}


def broker_pid(broker: BrokerHandle) -> int:
    popen = broker.process.popen
    assert popen is not None
    return int(popen.pid)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- burst --------------------------------------------------------------------------------


def run_bursts(
    report: ScaleReport,
    broker: BrokerHandle,
    admin: client.ApiClient,
    sizes: Sequence[int],
    kinds: Sequence[str],
    progress: Callable[[str], None],
) -> int:
    """Floor and broker bursts side by side for each N; returns the launches made."""
    launched = 0
    for n in sizes:
        floor = bursts.floor_burst(admin, broker.namespace, n)
        bursts.wait_gone(admin, broker.namespace)
        progress(
            f"burst {n}: floor {floor.throughput:.0f}/s p99 "
            f"{bursts.percentile(floor.latencies, 0.99) * 1000:.0f} ms"
        )
        report.add(
            "burst",
            f"N={n} floor Pod+Secret",
            _burst_text(floor),
            "",
            None,
        )
        for kind in kinds:
            cpu_before = cpu_seconds(broker_pid(broker))
            result, ids = bursts.broker_burst(broker, admin, kind, n)
            cpu_ms = (cpu_seconds(broker_pid(broker)) - cpu_before) * 1000 / n
            launched += len(ids)
            bursts.kill_launches(broker, ids)
            bursts.wait_gone(admin, broker.namespace)
            ratio = result.throughput / floor.throughput if floor.throughput else 0.0
            p99_ratio = bursts.percentile(result.latencies, 0.99) / bursts.percentile(
                floor.latencies, 0.99
            )
            progress(
                f"burst {n}: {kind} {result.throughput:.0f}/s ({ratio:.2f}x floor), "
                f"errors {result.errors}, 503s {result.retries_503}"
            )
            report.add(
                "burst",
                f"N={n} broker {kind}",
                _burst_text(result)
                + f"; {ratio:.2f}x floor tput, p99 {p99_ratio:.1f}x floor; broker CPU "
                f"{cpu_ms:.1f} ms/launch",
                ">=0.8x floor tput, 0 errors, 0 dup",
                ratio >= 0.8 and result.errors == 0 and result.duplicates == 0,
            )
            for sample in result.error_samples:
                report.notes.append(f"N={n} {kind}: {sample}")
    return launched


def _burst_text(result: bursts.BurstResult) -> str:
    p50 = bursts.percentile(result.latencies, 0.5) * 1000
    p99 = bursts.percentile(result.latencies, 0.99) * 1000
    text = f"{result.throughput:6.1f}/s p50 {p50:5.0f} ms p99 {p99:5.0f} ms"
    text += f" err {result.errors} dup {result.duplicates} pods {result.pods}"
    if result.retries_503:
        text += f" 503s {result.retries_503}"
    return text


def run_cleanup(
    report: ScaleReport,
    broker: BrokerHandle,
    admin: client.ApiClient,
    n: int,
    burst: int,
    progress: Callable[[str], None],
) -> int:
    launched = 0
    for during in (0, burst) if burst else (0,):
        result = cleanups.measure_cleanup(broker, admin, n, during_burst=during)
        launched += n + during
        p50 = bursts.percentile(result.latencies, 0.5) * 1000
        p99 = bursts.percentile(result.latencies, 0.99) * 1000
        name = f"{n} pods end" + (f", burst of {during} launching" if during else ", quiet")
        progress(f"cleanup {name}: p50 {p50:.0f} ms p99 {p99:.0f} ms missing {result.missing}")
        report.add(
            "cleanup",
            name,
            f"p50 {p50:5.0f} ms p99 {p99:5.0f} ms (pod end -> Secret deleted and revoked), "
            f"not seen {result.missing}",
            "p99 < 1000 ms",
            p99 < 1000 and result.missing == 0,
        )
    return launched


# -- output -------------------------------------------------------------------------------


def format_report(report: ScaleReport) -> str:
    width = max((len(f.name) for f in report.figures), default=10) + 2
    lines = ["Scale figures (issue 15): value, goal, verdict"]
    for section in SECTIONS:
        rows = [f for f in report.figures if f.section == section]
        if not rows:
            continue
        lines += ["", f"[{section}]"]
        for f in rows:
            goal = f"  goal {f.goal}" if f.goal else ""
            verdict = f"  {f.verdict}" if f.verdict else ""
            lines.append(f"  {f.name:<{width}}{f.value}{goal}{verdict}")
    if report.notes:
        lines += ["", "notes:"] + [f"  {n}" for n in report.notes]
    lines += [
        "",
        f"machine: {os.cpu_count()} CPUs, 1-minute load average {report.load[0]:.1f} before and "
        f"{report.load[1]:.1f} after; wall {report.wall_s:.0f}s"
        + (f", stack start-up {report.setup_s:.0f}s (not in any figure)" if report.setup_s else ""),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bursts", default="50,200,500")
    parser.add_argument("--kinds", default="no_secrets,kv")
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--cleanup", type=int, default=50, help="pods ending on cue")
    parser.add_argument("--cleanup-burst", type=int, default=100, help="launches meanwhile")
    parser.add_argument("--profile", type=Path, help="py-spy the broker during the bursts")
    parser.add_argument(
        "--profile-mode",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: launch threads, waiting included; cpu: where the broker's CPU goes",
    )
    parser.add_argument(
        "--launch-cap", type=int, default=0, help="override server.max_in_flight.launch"
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(","))

    def progress(message: str) -> None:
        print(f"[scale] {message}", file=sys.stderr, flush=True)

    report = ScaleReport(load=(os.getloadavg()[0], 0.0))
    began = time.perf_counter()
    root = Path(__file__).resolve().parents[2]
    sources = SourceTree.in_checkout(root)
    extra: dict[str, dict[str, object]] = {}
    if args.launch_cap:
        extra["server"] = {"max_in_flight": {"launch": args.launch_cap, "logs": 12, "other": 12}}
    with local_stack(sources, progress=progress) as stack, contextlib.ExitStack() as running:
        broker = start_broker(
            stack.folder / "broker",
            stack.kube,
            stack.vault,
            stack.postgres,
            sources,
            extra_settings=extra,
        )
        running.callback(broker.stop)
        report.setup_s = time.perf_counter() - began
        progress(f"stack and broker ready in {report.setup_s:.0f}s")
        with stack.kube.api_client() as admin:
            if "burst" in only:
                wall = args.profile_mode == "wall"
                spy = PySpy(broker_pid(broker), args.profile, idle=wall) if args.profile else None
                if spy:
                    spy.start()
                run_bursts(
                    report,
                    broker,
                    admin,
                    [int(n) for n in args.bursts.split(",") if n],
                    [k for k in args.kinds.split(",") if k],
                    progress,
                )
                if spy:
                    spy.stop()
                    report.notes.append(f"py-spy profile of the broker: {spy.output}")
                    focus = "LaunchExecutor.launch" if wall else ""
                    print(summarise_collapsed(spy.output, focus=focus))
            if "cleanup" in only:
                spy = (
                    PySpy(broker_pid(broker), args.profile / "cleanup", idle=True)
                    if args.profile and "burst" not in only
                    else None
                )
                if spy:
                    spy.start()
                run_cleanup(report, broker, admin, args.cleanup, args.cleanup_burst, progress)
                if spy:
                    spy.stop()
                    print(summarise_collapsed(spy.output, focus="on_pod_event"))
    report.load = (report.load[0], os.getloadavg()[0])
    report.wall_s = time.perf_counter() - began
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
