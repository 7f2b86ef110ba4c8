"""`nodewire bench watch`: the Kubernetes source under load, through the fake API server.

1. Change latency: N Services × E endpoints listed and watched by the real agent (Agent class: kube
   source → ClusterState → reconciler → pinned BPF maps, programs attached to a sandbox cgroup); then
   single-endpoint changes, one at a time. Measured per change: from the watch event's line arriving
   at the agent (read off the socket) to the reconciler's write call returning, i.e. the map holding
   the new backend set. Then a burst of changes to different Services written back to back, to see
   them coalesced into few reconciler runs. The backend sets are read back from the kernel maps at
   the end and checked against what was sent.
2. List-to-synced: a fresh `nodewire run --kube` process against a server holding LIST_N Services
   × E endpoints: time from the source starting to every list applied (decoding and parsing
   included), to the maps written, and the agent's RSS then (psutil).
The fake API server runs in its own process (multiprocessing), so its JSON encoding does not share the
agent's interpreter. Numbers are reported, never asserted (tests assert behaviour).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

TOKEN = "bench-token"
VIP_BASE = (10 << 24) | (96 << 16)  # 10.96.0.0/12
EP_BASE = (10 << 24) | (128 << 16)  # 10.128.0.0/9: synthetic addresses, never dialled


def _ip(n: int) -> str:
    return f"{n >> 24 & 255}.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


def _objects(n: int, endpoints: int):
    from ..fake_apiserver import endpoint_slice, service

    for i in range(n):
        yield service(f"svc-{i}", _ip(VIP_BASE + 1 + i), namespace="bench")
        yield endpoint_slice(f"svc-{i}-abc", f"svc-{i}", [_ip(EP_BASE + i * endpoints + j) for j in range(endpoints)],
                             namespace="bench")


def _server_main(conn, n: int, endpoints: int, workdir: str) -> None:
    """Child process: a fake API server loaded with n Services; obeys (op, args) messages."""
    from ..fake_apiserver import FakeApiServer, endpoint_slice

    api = FakeApiServer(tls=True, tokens={TOKEN: "bench"}, workdir=workdir, history_window=100_000)
    api.load(_objects(n, endpoints), validate_every=997)  # every object's shape is one of two, sampled
    api.start()
    conn.send((api.url, api.cert_file))
    while True:
        op, args = conn.recv()
        if op == "stop":
            api.stop()
            conn.send("stopped")
            return
        if op == "set_endpoints":  # args: [(i, addrs), ...], written back to back
            for i, addrs in args[0]:
                api.update(endpoint_slice(f"svc-{i}-abc", f"svc-{i}", addrs, namespace="bench"))
            conn.send("ok")


class ServerProcess:
    def __init__(self, n: int, endpoints: int, workdir: str):
        ctx = mp.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_server_main, args=(child, n, endpoints, workdir), daemon=True)
        self.proc.start()
        self.url, self.cert = self.conn.recv()
        self.kubeconfig = Path(workdir, "kubeconfig")
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "bench",
            "clusters": [{"name": "bench", "cluster": {"server": self.url, "certificate-authority": self.cert}}],
            "users": [{"name": "bench", "user": {"token": TOKEN}}],
            "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}]}))

    def call(self, op: str, *args):
        self.conn.send((op, args))
        return self.conn.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.call("stop")
            self.proc.join(10)


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def change_latency(n: int, endpoints: int, changes: int, workdir: str, burst: int = 1000) -> dict:
    """Part 1: single-endpoint changes through the real agent loop; per-change latency in ms."""
    from agent.agent import Agent
    from agent.config import AgentConfig
    from agent.datapath.inspect import read_services
    from agent.model.objects import ObjectKey
    from ..sandbox import Sandbox

    server = ServerProcess(n, endpoints, workdir)
    try:
        with Sandbox() as sb:
            pin = f"/sys/fs/bpf/{sb.prefix}-bw"
            agent = Agent(AgentConfig(kube=True, kubeconfig=str(server.kubeconfig), cgroup=sb.cgroup, pin_dir=pin,
                                      node_name="bench-node"))
            try:
                agent.start()
                arrivals: dict[ObjectKey, float] = {}
                done: dict[ObjectKey, float] = {}
                batch_sizes: list[int] = []

                def on_applied(kind, key, arrived):
                    if kind == "EndpointSlice":
                        arrivals[ObjectKey(key.namespace, key.name[:-4])] = arrived  # svc-i-abc → svc-i

                datapath = agent.loop.datapath
                rec_apply = datapath.apply

                def timed_apply(chg, full=False):
                    res = rec_apply(chg, full=full)
                    t = time.monotonic()
                    batch_sizes.append(len(chg))
                    for key in chg:
                        done[key] = t
                    return res

                datapath.apply = timed_apply
                agent.part("kube").source.on_applied = on_applied
                loop = threading.Thread(target=agent.run, daemon=True)
                loop.start()
                while agent.first_sync is None:
                    time.sleep(0.05)
                rng = random.Random(1)
                expected: dict[int, list[str]] = {}
                lat: list[float] = []
                for k in range(changes):
                    i = rng.randrange(n)
                    addrs = expected.get(i) or [_ip(EP_BASE + i * endpoints + j) for j in range(endpoints)]
                    addrs = list(addrs)
                    addrs[rng.randrange(endpoints)] = _ip(EP_BASE + n * endpoints + k)  # one endpoint replaced
                    expected[i] = addrs
                    key = ObjectKey("bench", f"svc-{i}")
                    t_sent = time.monotonic()
                    server.call("set_endpoints", [(i, addrs)])
                    deadline = t_sent + 10
                    while not (done.get(key, 0) > t_sent and arrivals.get(key, 0) > t_sent):
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"change {k} to {key} never reached the maps")
                        time.sleep(0.0005)
                    lat.append((done[key] - arrivals[key]) * 1000)
                    time.sleep(0.01)  # one change at a time: latency, not throughput
                # A burst: `burst` different Services changed back to back. The agent coalesces them
                # into few reconciler runs; report runs, per-change latency and time to all applied.
                burst_keys = rng.sample(range(n), burst)
                batch: list[tuple[int, list[str]]] = []
                for k, i in enumerate(burst_keys):
                    addrs = list(expected.get(i) or [_ip(EP_BASE + i * endpoints + j) for j in range(endpoints)])
                    addrs[0] = _ip(EP_BASE + n * endpoints + changes + k)
                    expected[i] = addrs
                    batch.append((i, addrs))
                runs_before = len(batch_sizes)
                t_sent = time.monotonic()
                server.call("set_endpoints", batch)
                keys = [ObjectKey("bench", f"svc-{i}") for i in burst_keys]
                deadline = t_sent + 60
                while not all(done.get(key, 0) > t_sent and arrivals.get(key, 0) > t_sent for key in keys):
                    if time.monotonic() > deadline:
                        raise RuntimeError("burst never fully reached the maps")
                    time.sleep(0.001)
                burst_lat = [(done[key] - arrivals[key]) * 1000 for key in keys]
                burst_runs = len(batch_sizes) - runs_before
                agent.stop.set()
                agent.state.changed.set()
                loop.join(10)
                rows = {r["ip"]: {b["ip"] for b in r["backends"]} for r in read_services(pin)}
                wrong = [i for i, addrs in expected.items() if rows.get(_ip(VIP_BASE + 1 + i)) != set(addrs)]
                if wrong:
                    raise RuntimeError(f"maps disagree with the API for Services {wrong[:5]}")
                return {"services": n, "endpoints_per_service": endpoints, "changes": changes,
                        "p50_ms": round(_pct(lat, 50), 3), "p99_ms": round(_pct(lat, 99), 3),
                        "max_ms": round(max(lat), 3), "mean_ms": round(statistics.mean(lat), 3),
                        "initial_full_sync_s": round(agent.first_sync.seconds, 3),
                        "burst_changes": burst, "burst_reconciler_runs": burst_runs,
                        "burst_p50_ms": round(_pct(burst_lat, 50), 3), "burst_p99_ms": round(_pct(burst_lat, 99), 3),
                        "burst_first_arrival_to_last_applied_ms": round(
                            (max(done[k] for k in keys) - min(arrivals[k] for k in keys)) * 1000, 1),
                        "maps_checked": len(expected)}
            finally:
                agent.close()
                subprocess.run([str(Path(sys.executable).with_name("nodewire")), "cleanup", "--pin-dir", pin,
                                "--cgroup", sb.cgroup], capture_output=True)
    finally:
        server.stop()


def list_to_synced(n: int, endpoints: int, workdir: str) -> dict:
    """Part 2: a fresh `nodewire run --kube` process; list → synced → maps written, and its RSS."""
    import psutil

    from agent.status import read_status, status_path
    from ..sandbox import Sandbox

    t_load = time.perf_counter()
    server = ServerProcess(n, endpoints, workdir)
    load_s = time.perf_counter() - t_load
    nodewire = str(Path(sys.executable).with_name("nodewire"))
    try:
        with Sandbox() as sb:
            pin = f"/sys/fs/bpf/{sb.prefix}-bl"
            Path(status_path(pin)).unlink(missing_ok=True)
            log = open(Path(workdir, "agent-list.log"), "w")
            proc = subprocess.Popen([nodewire, "run", "--kubeconfig", str(server.kubeconfig), "--cgroup", sb.cgroup,
                                     "--pin-dir", pin, "--metrics-addr", ""], stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, NODE_NAME="bench-node"))
            try:
                ps = psutil.Process(proc.pid)
                peak = 0
                rss_datapath = None  # after the BPF compile/load, before the list is in
                st = None
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    peak = max(peak, ps.memory_info().rss)
                    st = read_status(pin)
                    if st and st.first_sync:
                        break
                    if st and rss_datapath is None:
                        rss_datapath = ps.memory_info().rss
                    if proc.poll() is not None:
                        raise RuntimeError(f"agent exited {proc.returncode}; see {log.name}")
                    time.sleep(0.05)
                else:
                    raise RuntimeError("agent never synced")
                rss = ps.memory_info().rss
                kube = st.sources["kube"].detail
                return {"services": n, "endpoints": n * endpoints, "server_load_s": round(load_s, 1),
                        "list_to_synced_s": round(kube["synced_seconds"], 3),
                        "full_sync_to_maps_s": round(st.first_sync.seconds, 3),
                        "agent_start_to_maps_s": round(st.first_sync.since_start, 3),
                        "services_in_maps": st.services,
                        "list_cpu_s": round(kube["synced_cpu_seconds"], 3),
                        "rss_datapath_only_mib": round((rss_datapath or 0) / 2**20, 1),
                        "rss_mib": round(rss / 2**20, 1), "peak_rss_mib": round(max(peak, rss) / 2**20, 1)}
            finally:
                proc.terminate()
                proc.wait(30)
                log.close()
                subprocess.run([nodewire, "cleanup", "--pin-dir", pin, "--cgroup", sb.cgroup], capture_output=True)
    finally:
        server.stop()


@click.command("watch")
@click.option("--services", default=10_000, show_default=True, help="Services for the change-latency run.")
@click.option("--endpoints", default=5, show_default=True, help="Endpoints per Service.")
@click.option("--changes", default=300, show_default=True, help="Single-endpoint changes to time.")
@click.option("--burst", default=1000, show_default=True, help="Changes in the back-to-back burst.")
@click.option("--list-services", default="100000", show_default=True,
              help="Comma-separated Service counts for the list-to-synced run ('' to skip).")
@click.option("--out", default=None, help="Write the results as JSON here.")
def watch(services, endpoints, changes, burst, list_services, out):
    """Watch-event → map latency and list-to-synced time/RSS, through the fake API server."""
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="nodewire-bench-watch-") as d:
        results["change_latency"] = change_latency(services, endpoints, changes, d, burst)
        click.echo(json.dumps(results["change_latency"]))
        results["list_to_synced"] = []
        for n in [int(x) for x in list_services.split(",") if x.strip()]:
            r = list_to_synced(n, endpoints, d)
            results["list_to_synced"].append(r)
            click.echo(json.dumps(r))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=2))

