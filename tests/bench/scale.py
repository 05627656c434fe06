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
from tests.bench.audit_scale import measure_audit
from tests.bench.policy_scale import time_decisions, time_plan_apply
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


def run_policy(
    report: ScaleReport,
    folder: Path,
    grant_counts: Sequence[int],
    apply_grants: int,
    vault: tuple[str, str] | None,
    progress: Callable[[str], None],
) -> None:
    timings = [time_decisions(folder / f"decide-{n}", n) for n in grant_counts]
    base = timings[0].median_us
    for t in timings:
        ratio = t.median_us / base if base else float("nan")
        report.add(
            "policy",
            f"decide, {t.grants} grants",
            f"median {t.median_us:6.1f} us ({ratio:.2f}x {timings[0].grants} grants), "
            f"first {t.first_us / 1000:.1f} ms (builds the index), folder read {t.load_s:.1f} s",
            f"within 1.2x of {timings[0].grants}",
            ratio <= 1.2 and t.allowed,
        )
    if vault and apply_grants:
        t2 = time_plan_apply(folder / "apply", vault[0], vault[1], apply_grants, progress)
        report.add(
            "policy",
            f"plan + apply, {t2.grants} grants",
            f"plan {t2.plan_s:.1f} s, apply {t2.apply_s:.1f} s ({t2.policies_written} ACL "
            f"policies, {t2.parts} KV parts), broker's first read {t2.read_s:.2f} s, "
            f"plan again {t2.replan_s:.1f} s ({t2.replan_changes} changes)"
            + (f"; FAILED after {t2.apply_s:.1f} s: {t2.error}" if t2.error else ""),
            "each under 60 s",
            t2.plan_s < 60 and t2.apply_s < 60 and t2.replan_changes == 0 and not t2.error,
        )


def run_audit(
    report: ScaleReport, folder: Path, sizes: Sequence[int], progress: Callable[[str], None]
) -> None:
    for size in sizes:
        progress(f"audit: generating {size} signed events ...")
        result = measure_audit(folder, size, progress)
        report.add(
            "audit",
            f"{size} events: generate",
            f"{result.generate_s:.1f} s ({size / result.generate_s:.0f} events/s), "
            f"{result.db_mb:.0f} MB",
        )
        for name, seconds in result.reports.items():
            airflow = name.startswith("Airflow")
            report.add(
                "audit",
                f"{size} events: {name}",
                f"{seconds * 1000:.0f} ms",
                "< 1 s" if airflow else "",
                seconds < 1.0 if airflow else None,
            )
        report.add(
            "audit",
            f"{size} events: audit verify",
            f"{result.verify_s:.1f} s ({size / result.verify_s:.0f} records/s), ok "
            f"{result.verified}",
        )
        (folder / f"audit-{size}.db").unlink(missing_ok=True)


def follow_logs(broker: BrokerHandle, launch_ids: Sequence[str]) -> tuple[int, Callable[[], None]]:
    """Open a followed log stream per launch; how many the broker accepted, and a
    function that closes them."""
    import httpx

    http = httpx.Client(
        base_url=broker.url,
        headers=broker.headers(),
        timeout=httpx.Timeout(30, read=None),
        limits=httpx.Limits(max_connections=len(launch_ids) + 4),
    )
    streams = []
    opened = 0
    for launch_id in launch_ids:
        request = http.build_request(
            "GET", f"/v1/launches/{launch_id}/logs", params={"follow": "true"}
        )
        response = http.send(request, stream=True)
        if response.status_code == 200:
            opened += 1
        streams.append(response)

    def close() -> None:
        for response in streams:
            response.close()
        http.close()

    return opened, close


def run_memory(
    report: ScaleReport,
    broker: BrokerHandle,
    admin: client.ApiClient,
    idle_mb: float,
    launched: int,
    streams: int,
    progress: Callable[[str], None],
    *,
    target: int = 1000,
) -> None:
    pid = broker_pid(broker)
    report.add(
        "memory", "broker RSS idle (after start)", f"{idle_mb:.0f} MB", "< 120 MB", idle_mb < 120
    )
    if launched < target:
        progress(f"memory: {target - launched} more launches to reach {target} ...")
        while launched < target:
            n = min(200, target - launched)
            _, ids = bursts.broker_burst(broker, admin, "kv", n)
            bursts.kill_launches(broker, ids)
            bursts.wait_gone(admin, broker.namespace)
            launched += n
    after = rss_mb(pid)
    report.add(
        "memory",
        f"broker RSS after {launched} launches",
        f"{after:.0f} MB",
        "< 120 MB",
        after < 120,
    )
    if streams:
        _, ids = bursts.broker_burst(broker, admin, "no_secrets", streams)
        opened, close = follow_logs(broker, ids)
        time.sleep(2)
        with_streams = rss_mb(pid)
        close()
        bursts.kill_launches(broker, ids)
        bursts.wait_gone(admin, broker.namespace)
        report.add(
            "memory",
            f"broker RSS with {opened} followed log streams",
            f"{with_streams:.0f} MB",
            f"< 250 MB, {streams} streams open",
            with_streams < 250 and opened == streams,
        )


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
    parser.add_argument("--grants", default="10,1000,10000")
    parser.add_argument("--apply-grants", type=int, default=10000)
    parser.add_argument("--audit-events", default="100000")
    parser.add_argument("--streams", type=int, default=200, help="followed log streams")
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
    # The log-stream cap admits the streams the memory figure opens (default 12).
    caps = {"launch": args.launch_cap or 48, "logs": max(12, args.streams), "other": 12}
    extra: dict[str, dict[str, object]] = {"server": {"max_in_flight": caps}}
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
        idle_mb = rss_mb(broker_pid(broker))
        launched = 0
        with stack.kube.api_client() as admin:
            if "burst" in only:
                wall = args.profile_mode == "wall"
                spy = PySpy(broker_pid(broker), args.profile, idle=wall) if args.profile else None
                if spy:
                    spy.start()
                launched += run_bursts(
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
                launched += run_cleanup(
                    report, broker, admin, args.cleanup, args.cleanup_burst, progress
                )
                if spy:
                    spy.stop()
                    print(summarise_collapsed(spy.output, focus="on_pod_event"))
            if "memory" in only:
                run_memory(report, broker, admin, idle_mb, launched, args.streams, progress)
        if "policy" in only:
            progress("policy: decisions and plan/apply ...")
            run_policy(
                report,
                stack.folder / "policy-bench",
                [int(n) for n in args.grants.split(",") if n],
                args.apply_grants,
                (stack.vault.url, stack.vault.root_token),
                progress,
            )
        if "audit" in only:
            run_audit(
                report,
                stack.folder / "audit-bench",
                [int(n) for n in args.audit_events.split(",") if n],
                progress,
            )
    report.load = (report.load[0], os.getloadavg()[0])
    report.wall_s = time.perf_counter() - began
    print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
