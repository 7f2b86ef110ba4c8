"""`nodewire bench connect`: ClusterIP connect latency vs direct, start-up, sync, RSS and idle CPU, per N.

For each N: a sandbox (client pod, E backend pods), N Services × E endpoints written as manifests
(one file, or --files F files; the last Service points at the real backend pods, the others at
synthetic addresses), the real agent started on them, once per flag set: "default" (observe and rdma
on, as a user runs it) and "lb" (--no-observe --no-rdma, the load balancer alone). Reported:
  - start → first full sync (wall clock from spawning the agent, and the agent's own figure) and the
    reconciler's full-sync time;
  - the agent's RSS once synced and settled, and its helper processes' RSS separately;
  - idle CPU: the agent's (and its children's) CPU time over --idle-seconds with nothing changing,
    as % of one core;
  - p50/p99 of connect() through the last Service's ClusterIP and directly to a backend, interleaved
    in one process, and their ratio; the connect4 hook's own run time (kernel accounting).
--against COMMIT also runs the agent as it was at that commit (git archive of this checkout), side
by side, for before/after figures. The status file is read as JSON (not agent.status) so that an
older agent's is read too.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from agent.config import state_dir_for
from ..sandbox import Sandbox
from .loader import RUN, _tree
from .workload import vip, write_manifests

NODEWIRE = str(Path(sys.executable).with_name("nodewire"))
PROBE = Path(__file__).with_name("connect_probe.py")
# default: as a user runs it; lb: the load balancer alone; nocheck: default without the sampled drift
# check (its periodic cost shows apart: it is the main idle cost at 100k Services).
FLAGS = {"default": [], "lb": ["--no-observe", "--no-rdma"], "nocheck": ["--check-interval", "0"]}
SETTLE_SECONDS = 2.0  # after the first sync: the heap freed by start-up is handed back (malloc_trim)


def percentile(values: list[int], q: float) -> float:
    s = sorted(values)
    return float(s[min(len(s) - 1, int(q * len(s)))])


def _prog_stats(cgroup: str, name: str) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of the program `name` attached to cgroup (needs kernel.bpf_stats_enabled)."""
    shown = json.loads(subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup], capture_output=True,
                                      text=True, check=True).stdout.strip() or "[]")
    for p in shown:
        if p.get("name") == name:
            info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(p["id"])],
                                             capture_output=True, text=True, check=True).stdout)
            return info.get("run_time_ns", 0), info.get("run_cnt", 0)
    return 0, 0


class BpfStats:
    """Turns on the kernel's per-program run-time accounting for the duration of a block."""

    PATH = "/proc/sys/kernel/bpf_stats_enabled"

    def __enter__(self):
        self.before = Path(self.PATH).read_text().strip()
        Path(self.PATH).write_text("1")
        return self

    def __exit__(self, *exc):
        Path(self.PATH).write_text(self.before)


def _first_sync(pin: str) -> dict | None:
    try:
        return json.loads(Path(state_dir_for(pin), "status.json").read_text()).get("first_sync")
    except (OSError, json.JSONDecodeError):
        return None


def _cpu_seconds(p: psutil.Process) -> float:
    """CPU time of the process and of its live children."""
    total = sum(p.cpu_times()[:2])
    for c in p.children(recursive=True):
        try:
            total += sum(c.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def _helpers_rss_mib(p: psutil.Process) -> float:
    out = 0.0
    for c in p.children(recursive=True):
        try:
            out += c.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return out


def run_one(n: int, connects: int, endpoints: int = 5, files: int = 1, flags: str = "lb", tree: Path | None = None,
            idle_seconds: float = 30.0, map_sizes: tuple[str, ...] = (), timeout: float = 1800) -> dict:
    """One agent (this checkout, or `tree`) on N Services × E endpoints in `files` files, with FLAGS[flags]."""
    tmp = Path(tempfile.mkdtemp(prefix="nodewire-bench-"))
    agent = None
    with Sandbox() as sb:
        pin = f"/sys/fs/bpf/nodewire-bench-{sb.prefix}"
        try:
            client = sb.add_pod("client")
            backends = [sb.add_pod(f"b{i}") for i in range(endpoints)]
            for b in backends:
                b.serve(tcp_ports=[8080])
            write_manifests(tmp / "manifests", n, endpoints, [b.ip4 for b in backends], files)
            entries = n * (1 + endpoints)
            sizes = [f"services={max(1024, int(entries * 1.25))}", f"backends={max(1024, int(n * endpoints * 1.25))}",
                     *map_sizes]
            argv = ["run", "--manifests", str(tmp / "manifests"), "--cgroup", sb.cgroup, "--pin-dir", pin,
                    "--metrics-addr", "127.0.0.1:0", *FLAGS[flags]]
            for m in sizes:
                argv += ["--map-size", m]
            cmd = [NODEWIRE, *argv] if tree is None else [sys.executable, "-c", RUN, *argv]
            env = None if tree is None else {**__import__("os").environ, "PYTHONPATH": str(tree)}
            t0 = time.monotonic()
            agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "agent.log", "w"),
                                     cwd=tree, env=env)
            ps = psutil.Process(agent.pid)
            peak = 0.0
            while not (first := _first_sync(pin)):
                if agent.poll() is not None:
                    raise RuntimeError(f"agent exited: {(tmp / 'agent.log').read_text()[-2000:]}")
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError(f"agent not synced after {timeout}s")
                peak = max(peak, ps.memory_info().rss / 2**20)
                time.sleep(0.05)
            synced_wall = time.monotonic() - t0
            time.sleep(SETTLE_SECONDS)
            rss = ps.memory_info().rss / 2**20
            c0, w0 = _cpu_seconds(ps), time.monotonic()
            time.sleep(idle_seconds)
            idle_cpu = 100 * (_cpu_seconds(ps) - c0) / (time.monotonic() - w0)
            rss_idle = ps.memory_info().rss / 2**20
            helpers = _helpers_rss_mib(ps)
            with BpfStats():
                t_ns0, runs0 = _prog_stats(sb.cgroup, "nw_connect4")
                out = client.run([sys.executable, str(PROBE), vip(n - 1), "80", ",".join(b.ip4 for b in backends),
                                  "8080", str(connects)], timeout=900)
                t_ns1, runs1 = _prog_stats(sb.cgroup, "nw_connect4")
            lat = json.loads(out.stdout)
            row = {
                "services": n, "endpoints": n * endpoints, "files": files, "flags": flags,
                "vip_p50_us": percentile(lat["vip"], 0.5) / 1e3, "vip_p99_us": percentile(lat["vip"], 0.99) / 1e3,
                "direct_p50_us": percentile(lat["direct"], 0.5) / 1e3,
                "direct_p99_us": percentile(lat["direct"], 0.99) / 1e3,
                "sync_s": first["seconds"], "start_to_synced_s": first.get("since_start"),
                "spawn_to_synced_s": synced_wall, "entries_written": first["written"],
                "agent_rss_mib": rss, "agent_rss_idle_mib": rss_idle, "agent_peak_rss_mib": max(peak, rss),
                "helpers_rss_mib": helpers, "idle_cpu_pct": idle_cpu, "idle_seconds": idle_seconds,
                # every connect (VIP or direct) runs the hook once; kernel-measured, so not subject to timer noise
                "connect4_ns_per_run": (t_ns1 - t_ns0) / max(1, runs1 - runs0),
            }
            row["ratio_p50"] = row["vip_p50_us"] / row["direct_p50_us"]
            row["ratio_p99"] = row["vip_p99_us"] / row["direct_p99_us"]
            return row
        finally:
            if agent is not None and agent.poll() is None:
                agent.terminate()
                try:
                    agent.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    agent.kill()
            subprocess.run([NODEWIRE, "cleanup", "--pin-dir", pin, "--cgroup", sb.cgroup], capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)


def run(counts: list[int], connects: int, endpoints: int, files: list[int], flag_sets: list[str],
        against: str | None, idle_seconds: float, map_sizes: tuple[str, ...], progress=lambda row: None) -> list[dict]:
    """Every combination, this checkout and (when given) `against` one after the other per combination."""
    trees: dict[str, Path | None] = {"this": None}
    if against:
        trees[against] = _tree(against, Path(tempfile.mkdtemp(prefix="nodewire-bench-against-")))
    rows = []
    for n in counts:
        for f in files:
            for flags in flag_sets:
                for label, tree in trees.items():
                    row = {"tree": label, **run_one(n, connects, endpoints, f, flags, tree, idle_seconds, map_sizes)}
                    rows.append(row)
                    progress(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| tree | flags | Services | endpoints | files | start→synced s | full sync s | agent RSS MiB | helpers MiB "
            "| idle CPU % | VIP p50 µs | direct p50 µs | ratio p50 | ratio p99 | connect4 hook ns |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r.get('tree', 'this')} | {r['flags']} | {r['services']:,} | {r['endpoints']:,} | {r['files']} | "
                     f"{r['spawn_to_synced_s']:.2f} | {r['sync_s']:.3f} | {r['agent_rss_mib']:.0f} | "
                     f"{r['helpers_rss_mib']:.0f} | {r['idle_cpu_pct']:.2f} | {r['vip_p50_us']:.1f} | "
                     f"{r['direct_p50_us']:.1f} | {r['ratio_p50']:.3f} | {r['ratio_p99']:.3f} | "
                     f"{r['connect4_ns_per_run']:.0f} |")
    return "\n".join(lines)
