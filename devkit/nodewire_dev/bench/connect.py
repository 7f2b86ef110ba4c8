"""`nodewire bench connect`: ClusterIP connect latency vs direct, full-sync time and agent RSS, per N.

For each N: a sandbox (client pod, five backend pods), N Services × 5 endpoints written as one
manifest (the last Service points at the real backend pods, the others at synthetic addresses),
the real agent started on it. Reported: p50/p99 of connect() through the last Service's ClusterIP
and directly to a backend (interleaved in one process), their ratio, the agent's full-sync time
(reconciler: entries written to the maps) and start-to-synced time (compile, parse, model, write),
and the agent's RSS once synced. The agent runs with --no-observe --no-rdma: this measures the load
balancer alone (observability has its own benchmark, `nodewire bench observe`).
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
from .workload import vip, write_manifests

NODEWIRE = str(Path(sys.executable).with_name("nodewire"))
PROBE = Path(__file__).with_name("connect_probe.py")
ENDPOINTS = 5


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


def run_one(n: int, connects: int, timeout: float = 900) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="nodewire-bench-"))
    agent = None
    with Sandbox() as sb:
        pin = f"/sys/fs/bpf/nodewire-bench-{sb.prefix}"
        try:
            client = sb.add_pod("client")
            backends = [sb.add_pod(f"b{i}") for i in range(ENDPOINTS)]
            for b in backends:
                b.serve(tcp_ports=[8080])
            write_manifests(tmp / "manifests", n, ENDPOINTS, [b.ip4 for b in backends])
            entries = n * (1 + ENDPOINTS)
            sizes = [f"services={max(1024, int(entries * 1.25))}", f"backends={max(1024, int(n * ENDPOINTS * 1.25))}"]
            # The load balancer alone: observability's cost is measured by `nodewire bench observe`.
            cmd = [NODEWIRE, "run", "--manifests", str(tmp / "manifests"), "--cgroup", sb.cgroup, "--pin-dir", pin,
                   "--no-observe", "--no-rdma", "--metrics-addr", ""]
            for s in sizes:
                cmd += ["--map-size", s]
            t0 = time.time()
            agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "agent.log", "w"))
            status_file = Path(state_dir_for(pin), "status.json")
            while True:
                if agent.poll() is not None:
                    raise RuntimeError(f"agent exited: {(tmp / 'agent.log').read_text()[-2000:]}")
                if time.time() - t0 > timeout:
                    raise RuntimeError(f"agent not synced after {timeout}s")
                try:
                    st = json.loads(status_file.read_text())
                    if st.get("first_sync"):
                        break
                except (OSError, json.JSONDecodeError):
                    pass
                time.sleep(0.2)
            rss = psutil.Process(agent.pid).memory_info().rss / 2**20
            with BpfStats():
                t_ns0, runs0 = _prog_stats(sb.cgroup, "nw_connect4")
                out = client.run([sys.executable, str(PROBE), vip(n - 1), "80", ",".join(b.ip4 for b in backends),
                                  "8080", str(connects)], timeout=600)
                t_ns1, runs1 = _prog_stats(sb.cgroup, "nw_connect4")
            lat = json.loads(out.stdout)
            first = st["first_sync"]
            row = {
                "services": n, "endpoints": n * ENDPOINTS,
                "vip_p50_us": percentile(lat["vip"], 0.5) / 1e3, "vip_p99_us": percentile(lat["vip"], 0.99) / 1e3,
                "direct_p50_us": percentile(lat["direct"], 0.5) / 1e3,
                "direct_p99_us": percentile(lat["direct"], 0.99) / 1e3,
                "sync_s": first["seconds"], "start_to_synced_s": first["since_start"],
                "entries_written": first["written"], "agent_rss_mib": rss,
                # every connect (VIP or direct) runs the hook once; kernel-measured, so not subject to timer noise
                "connect4_ns_per_run": (t_ns1 - t_ns0) / max(1, runs1 - runs0),
            }
            row["ratio_p50"] = row["vip_p50_us"] / row["direct_p50_us"]
            row["ratio_p99"] = row["vip_p99_us"] / row["direct_p99_us"]
            return row
        finally:
            if agent is not None and agent.poll() is None:
                agent.terminate()
                agent.wait(timeout=60)
            subprocess.run([NODEWIRE, "cleanup", "--pin-dir", pin, "--cgroup", sb.cgroup], capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)


def table(rows: list[dict]) -> str:
    head = ("| Services | endpoints | VIP p50 µs | direct p50 µs | ratio p50 | VIP p99 µs | direct p99 µs | ratio p99 "
            "| connect4 hook ns | full sync s | start→synced s | agent RSS MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['services']:,} | {r['endpoints']:,} | {r['vip_p50_us']:.1f} | {r['direct_p50_us']:.1f} | "
                     f"{r['ratio_p50']:.3f} | {r['vip_p99_us']:.1f} | {r['direct_p99_us']:.1f} | {r['ratio_p99']:.3f} | "
                     f"{r['connect4_ns_per_run']:.0f} | {r['sync_s']:.3f} | {r['start_to_synced_s']:.2f} | {r['agent_rss_mib']:.0f} |")
    return "\n".join(lines)
