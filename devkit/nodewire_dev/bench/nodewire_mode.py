"""nodewire as a benchmark mode: the real agent (`nodewire run`) as a subprocess, fed the same
Service list as manifests, attached to the sandbox's cgroup with a per-run pin dir."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from agent.status import AgentStatus, read_status
from ..sandbox import Sandbox
from .measure import LoadResult
from .modes import Unavailable

from .services import BenchService

PROBE = Path(__file__).with_name("probe.py")
_CLI = [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())"]


def _service_doc(svc: BenchService) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": svc.name, "namespace": svc.namespace},
            "spec": {"clusterIP": svc.cluster_ip,
                     "ports": [{"name": svc.port_name, "port": svc.port, "protocol": svc.protocol,
                                "targetPort": svc.endpoints[0].port}]}}


def _slice_doc(svc: BenchService) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{svc.name}-1", "namespace": svc.namespace,
                         "labels": {"kubernetes.io/service-name": svc.name}},
            "addressType": "IPv4",
            "ports": [{"name": svc.port_name, "port": svc.endpoints[0].port, "protocol": svc.protocol}],
            "endpoints": [{"addresses": [ep.ip], "conditions": {"ready": True}} for ep in svc.endpoints]}


def _write_json(path: Path, items: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")  # not a manifest suffix: the agent never reads a half-written file
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    os.replace(tmp, path)


class NodewireMode:
    name = "nodewire"

    def __init__(self, sb: Sandbox):
        self.sb = sb
        self.pin_dir = f"/sys/fs/bpf/nodewire-bench-{sb.prefix}-{secrets.token_hex(2)}"
        self.dir = Path(tempfile.mkdtemp(prefix="nodewire-bench-"))
        self.proc: subprocess.Popen | None = None
        self.stats: dict = {}
        self.observe: tuple | None = None  # (client pod, name of the backend the change adds)
        if not os.path.isdir("/sys/fs/bpf"):
            raise Unavailable("/sys/fs/bpf is not mounted")

    def _status(self) -> AgentStatus | None:
        return read_status(self.pin_dir)

    def load(self, services: list[BenchService], cap_s: float) -> LoadResult:
        # The last Service's EndpointSlice lives in its own file, so the endpoint change rewrites a
        # small file (as one EndpointSlice update is one small object on a watch).
        _write_json(self.dir / "services.json",
                    [d for s in services[:-1] for d in (_service_doc(s), _slice_doc(s))] + [_service_doc(services[-1])])
        _write_json(self.dir / "last-slice.json", [_slice_doc(services[-1])])
        self.log = open(self.dir / "agent.log.txt", "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([*_CLI, "run", "--manifests", str(self.dir), "--cgroup", self.sb.cgroup,
                                      "--pin-dir", self.pin_dir, "--metrics-addr", ""], stdout=self.log, stderr=subprocess.STDOUT)
        ps = psutil.Process(self.proc.pid)
        while True:
            st = self._status()
            if st and st.first_sync and st.services >= len(services):
                break
            if self.proc.poll() is not None:
                return LoadResult(time.perf_counter() - t0, 0.0,
                                  error=f"agent exited {self.proc.returncode}: {self._log_tail()}")
            if time.perf_counter() - t0 > cap_s:
                return LoadResult(time.perf_counter() - t0, 0.0, timed_out=True)
            time.sleep(0.02)
        ready = time.perf_counter() - t0
        cpu = ps.cpu_times()
        self.stats.update(ready_s=round(ready, 3), agent_cpu_to_ready_s=round(cpu.user + cpu.system, 3),
                          sync_errors=st.counters.sync_errors)
        # sync_s is the agent's own full-sync duration (reconciler: model → batched map writes).
        return LoadResult(st.first_sync.seconds, cpu.user + cpu.system)

    def _log_tail(self) -> str:
        try:
            return (self.dir / "agent.log.txt").read_text()[-600:].replace("\n", " | ")
        except OSError:
            return ""

    def change(self, services: list[BenchService], before: BenchService, after: BenchService,
               cap_s: float) -> LoadResult:
        # End to end is observed in the datapath: a client loops connecting to the VIP until the new
        # endpoint answers (the status file is rewritten at most once a second, too coarse for this).
        watcher = None
        if self.observe is not None:
            client, spare_name = self.observe
            watcher = client.popen([sys.executable, str(PROBE), "await", "--target",
                                    f"{after.cluster_ip}:{after.port}", "--expect", spare_name,
                                    "--max-seconds", str(cap_s), "--timeout", "0.5"])
            if "ready" not in watcher.stdout.readline():
                raise RuntimeError(f"await probe failed: {watcher.stderr.read()[-500:]}")
        st0 = self._status()
        syncs0 = st0.counters.syncs if st0 else 0
        t_write = time.time()
        _write_json(self.dir / "last-slice.json", [_slice_doc(after)])
        if watcher is not None:
            out, _ = watcher.communicate(timeout=cap_s + 30)
            client.procs.remove(watcher)
            seen = json.loads(out.strip().splitlines()[-1]).get("seen_at")
            if seen is None:
                return LoadResult(cap_s, 0.0, timed_out=True)
            self.stats["change_e2e_ms"] = round((seen - t_write) * 1000, 1)  # file write → traffic moved
        deadline = time.monotonic() + cap_s
        while time.monotonic() < deadline:  # the agent's own figure for that sync, once it writes it
            st = self._status()
            if st and st.counters.syncs > syncs0 and st.last_sync:
                return LoadResult(st.last_sync.seconds, 0.0)
            time.sleep(0.02)
        return LoadResult(cap_s, 0.0, timed_out=True)

    def memory(self) -> dict:
        out = {"agent_rss_mib": None, "bpf_memlock_mib": None}
        if self.proc and self.proc.poll() is None:
            mi = psutil.Process(self.proc.pid).memory_info()
            out["agent_rss_mib"] = round(mi.rss / 2**20, 1)
        total = 0
        try:
            for name in os.listdir(self.pin_dir):
                r = subprocess.run(["bpftool", "-j", "map", "show", "pinned", os.path.join(self.pin_dir, name)],
                                   capture_output=True, text=True, timeout=30)
                if r.returncode == 0:
                    total += int(json.loads(r.stdout).get("bytes_memlock", 0))
            out["bpf_memlock_mib"] = round(total / 2**20, 1)
        except (OSError, ValueError):
            pass
        return {**out, **self.stats}

    def unload(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run([*_CLI, "cleanup", "--pin-dir", self.pin_dir, "--cgroup", self.sb.cgroup],
                       capture_output=True, text=True, timeout=120)
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
