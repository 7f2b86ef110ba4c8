"""`nodewire bench udp-recovery`: how long a connected UDP client stays on a backend that left.

A client pod holds one connected UDP socket to a ClusterIP with two backends and asks every ~2 ms
(the DNS-resolver pattern); on an error it reconnects through the VIP. Each run removes the backend
the client is on from the EndpointSlice (a manifest write) and times, from that write:
  * error: the client's first error (its socket was destroyed by the agent's sweep),
  * recovered: the client's first answer from the remaining backend.
The removed backend keeps running, so without the sweep the client would never move (its packets
would keep reaching the old pod). The agent's own sweep time is read from its debug log. The time
includes the manifest source noticing the write (it polls every 0.2 s): the API source is faster.
"""
from __future__ import annotations

import json
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent.config import state_dir_for
from ..sandbox import Sandbox
from .connect import NODEWIRE, percentile

VIP, PORT, TARGET = "10.96.50.1", 53, 5353
CLIENT = r"""
import errno, json, socket, sys, time
vip, port = sys.argv[1], int(sys.argv[2])
def dial():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.05)
    s.connect((vip, port))
    return s
s, last = dial(), None
while True:
    try:
        s.send(b"q")
        ev = s.recv(256).decode().split()[0]
    except socket.timeout:
        continue
    except OSError as e:
        ev = "error:" + errno.errorcode.get(e.errno, str(e.errno))
        s.close()
        try:
            s = dial()
        except OSError:
            time.sleep(0.002)
            s = dial()
    if ev != last:
        print(json.dumps({"t": time.time(), "ev": ev}), flush=True)
        last = ev
    time.sleep(0.002)
"""


def _manifest(path: Path, ips: list[str]) -> None:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dns", "namespace": "default"},
           "spec": {"clusterIP": VIP, "ports": [{"port": PORT, "protocol": "UDP", "targetPort": TARGET}]}}
    sl = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": "dns-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "dns"}},
          "addressType": "IPv4", "ports": [{"port": TARGET, "protocol": "UDP"}],
          "endpoints": [{"addresses": [ip]} for ip in ips]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [svc, sl]}))
    tmp.rename(path)


class _Lines:
    def __init__(self, stream):
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.q.put(json.loads(ln)) for ln in stream], daemon=True).start()

    def next(self, timeout: float = 10.0) -> dict:
        return self.q.get(timeout=timeout)


def _wait_status(pin: str, cond, timeout: float = 60.0) -> dict:
    path, t0 = Path(state_dir_for(pin), "status.json"), time.time()
    while time.time() - t0 < timeout:
        try:
            st = json.loads(path.read_text())
            if cond(st):
                return st
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    raise RuntimeError("agent did not get there in time")


def run(runs: int = 100) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="nodewire-bench-udp-"))
    manifests = tmp / "manifests"
    manifests.mkdir()
    agent = None
    with Sandbox() as sb:
        pin = f"/sys/fs/bpf/nodewire-bench-{sb.prefix}"
        try:
            client = sb.add_pod("client")
            pods = {n: sb.add_pod(n) for n in ("b1", "b2")}
            for p in pods.values():
                p.serve(udp_ports=[TARGET])
            by_ip = {p.ip4: n for n, p in pods.items()}
            _manifest(manifests / "dns.json", list(by_ip))
            log = tmp / "agent.log"
            agent = subprocess.Popen([NODEWIRE, "--debug", "run", "--manifests", str(manifests), "--cgroup", sb.cgroup,
                                      "--pin-dir", pin, "--no-observe", "--no-rdma", "--metrics-addr", ""],
                                     stdout=subprocess.DEVNULL, stderr=open(log, "w"))
            _wait_status(pin, lambda st: st.get("first_sync"))
            proc = client.popen([sys.executable, "-c", CLIENT, VIP, str(PORT)])
            lines = _Lines(proc.stdout)
            current = lines.next()["ev"]
            errors_s, recovered_s, missed = [], [], 0
            for _ in range(runs):
                remaining = next(ip for ip, n in by_ip.items() if n != current)
                t0 = time.time()
                _manifest(manifests / "dns.json", [remaining])
                err_t = None
                while True:
                    ev = lines.next()
                    if ev["ev"].startswith("error:"):
                        err_t = err_t or ev["t"]
                    elif ev["ev"] == by_ip[remaining]:
                        break
                recovered_s.append(ev["t"] - t0)
                if err_t is None:
                    missed += 1
                else:
                    errors_s.append(err_t - t0)
                current = by_ip[remaining]
                t1 = time.time()
                _manifest(manifests / "dns.json", list(by_ip))
                _wait_status(pin, lambda st: st.get("last_change", 0) > t1)
            proc.kill()
            sweeps = [float(m) for m in re.findall(r"socket sweep .*?seconds=([0-9.]+)", log.read_text())]
            ms = lambda xs, q: round(percentile(xs, q) * 1e3, 2) if xs else None  # noqa: E731
            return {"runs": runs, "recovered_p50_ms": ms(recovered_s, 0.5), "recovered_p99_ms": ms(recovered_s, 0.99),
                    "recovered_max_ms": round(max(recovered_s) * 1e3, 2),
                    "error_p50_ms": ms(errors_s, 0.5), "error_p99_ms": ms(errors_s, 0.99),
                    "moved_without_error": missed,
                    "sweep_p50_ms": ms(sweeps, 0.5), "sweep_p99_ms": ms(sweeps, 0.99), "sweeps": len(sweeps)}
        finally:
            if agent is not None and agent.poll() is None:
                agent.terminate()
                agent.wait(timeout=60)
            subprocess.run([NODEWIRE, "cleanup", "--pin-dir", pin, "--cgroup", sb.cgroup], capture_output=True)
            shutil.rmtree(tmp, ignore_errors=True)
