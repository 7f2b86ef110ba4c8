"""`nodewire bench scrape`: what one /metrics scrape costs the agent, as Prometheus asks for it
(OpenMetrics Accept header, gzip), at N pods — side by side with another commit in one run.

The "agent" is a child process running the tree under test: its telemetry (HTTP server, OTel
MeterProvider, Prometheus reader), an Observer reading the interface counters of N real veth pairs
in a throwaway netns over netlink, its identity tables and series book. The kernel histograms
(connect and srtt per pod) and retransmits per (pod, peer) are synthetic — every pod has them,
with counts that grow at each scrape — because N pods of real TCP traffic would take longer to
set up than to measure; they go through the same Reading → SeriesBook → exporter path as the
kernel's. The child's CPU time (user + system, all threads, and its own children's) is read around each scrape.
Figures only: nothing is asserted.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib

# What Prometheus 2.x/3.x sends (scrape.go acceptHeader with OpenMetrics enabled, the default)
ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
          "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def _worker(netns: str, pods: int, peers: int) -> None:
    """The agent side (runs with the tree under test first on sys.path). Prints its port, then
    serves until stdin closes."""
    from opentelemetry.metrics import Observation

    from agent.export.telemetry import start_telemetry
    from agent.model.objects import ObjectKey, Pod
    from agent.observe.identity import ObserveConfig
    from agent.observe.links import LinkStats
    from agent.observe.observer import Observer
    from agent.state import ClusterState

    state = ClusterState()
    for i in range(pods):
        k = ObjectKey("bench", f"pod-{i}")
        state.apply_pod(k, Pod(k, (f"10.{200 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}",), "bench",
                               annotations=(("nodewire.io/host-veth", f"nws{i}"),)))
    tel = start_telemetry("127.0.0.1:0", "bench")
    tel.meter("bench").create_observable_gauge("bench.up", [lambda _o: [Observation(1)]])
    obs = Observer(state, tel, ObserveConfig(node_name="bench", max_series=1_000_000), "/nonexistent", netns)
    obs.links = LinkStats(netns)
    obs.sync()
    obs._pod_ifnames = obs._interfaces_of({ref.key for ref in obs.identity.local.values()})
    rng = random.Random(1)
    refs = list(obs.identity.local.values())
    shape = {ref.key: [rng.randrange(1, 50) if 6 <= s <= 14 else 0 for s in range(28)] for ref in refs}
    peer_ips = [ref_ip for ref_ip in list(obs.identity.local)[:peers]]
    scrapes = [0]

    def produce():
        r = obs.read()
        scrapes[0] += 1
        n = scrapes[0]
        for ref in refs:
            counts = [c * n for c in shape[ref.key]]
            attrs = ref.attributes()
            r.hist("connect", attrs).add_counts(counts, sum(counts) * 300)
            r.hist("srtt", attrs).add_counts(counts, sum(counts) * 120)
            for ip in peer_ips:
                r.count("retrans", {**attrs, **obs.identity.peer(ip)}, n)
        return obs.book.to_metrics(r)

    tel.add_producer(produce)
    prof = None
    if os.environ.get("NW_BENCH_PROFILE"):
        import cProfile
        prof = cProfile.Profile()
        handler = tel.server.RequestHandlerClass
        plain = handler.do_GET
        handler.do_GET = lambda self: prof.runcall(plain, self)
    print(tel.port, flush=True)
    sys.stdin.read()
    if prof is not None:
        import pstats
        with open(os.environ["NW_BENCH_PROFILE"], "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(45)
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(30)
    tel.shutdown()


def _cpu_s(pid: int) -> float:
    """CPU time of the agent process and its live children (pyroute2's NetNS works in a forked helper)."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _scrape(port: int) -> tuple[bytes, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Accept": ACCEPT, "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read(), r.headers.get("Content-Encoding", "")


def _measure(tree: str, netns: str, pods: int, peers: int, scrapes: int, profile: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if profile:
        env["NW_BENCH_PROFILE"] = profile
    child = subprocess.Popen([sys.executable, "-c", "import sys; from nodewire_dev.bench.scrape import _worker; "
                              f"_worker({netns!r}, {pods}, {peers})"], cwd=tree, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        _scrape(port)  # the first one builds the instruments and the series book
        walls, cpus = [], []
        for _ in range(scrapes):
            c0, t0 = _cpu_s(child.pid), time.perf_counter()
            body, enc = _scrape(port)
            walls.append(time.perf_counter() - t0)
            cpus.append(_cpu_s(child.pid) - c0)
        text = zlib.decompress(body, 16 + zlib.MAX_WBITS) if enc == "gzip" else body
    finally:
        child.stdin.close()
        child.wait(timeout=120)
    return {"tree": tree, "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
            "bytes_sent": len(body), "bytes_text": len(text), "lines": text.count(b"\n"), "gzip": enc == "gzip",
            "openmetrics": text.rstrip().endswith(b"# EOF")}


def _veths(netns: str, pods: int) -> None:
    subprocess.run(["ip", "netns", "add", netns], check=True)
    batch = "".join(f"link add nws{i} type veth peer name nwp{i}\nlink set nws{i} up\nlink set nwp{i} up\n"
                    for i in range(pods))
    subprocess.run(["ip", "-n", netns, "-batch", "-"], input=batch, text=True, check=True)


def _tree_at(commit: str, where: str) -> str:
    subprocess.run(["git", "worktree", "add", "--detach", where, commit], check=True, capture_output=True)
    return where


def run(pods: int, peers: int, scrapes: int, against: str | None, profile_dir: str | None) -> list[dict]:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    netns = f"nwscr{os.getpid()}"
    tmp = tempfile.mkdtemp(prefix="nw-bench-scrape-")
    trees = [here]
    rows = []
    try:
        _veths(netns, pods)
        if against:
            trees.insert(0, _tree_at(against, os.path.join(tmp, "against")))
        for i, tree in enumerate(trees):
            prof = os.path.join(profile_dir, f"scrape-{i}.txt") if profile_dir else None
            rows.append({"which": "against" if tree != here else "this", "pods": pods,
                         **_measure(tree, netns, pods, peers, scrapes, prof)})
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        if against:
            subprocess.run(["git", "worktree", "remove", "--force", os.path.join(tmp, "against")],
                           cwd=here, capture_output=True)
    if len(rows) == 2:
        a, b = rows
        rows.append({"which": "ratio this/against", "pods": pods,
                     **{k: b[k] / a[k] for k in ("wall_s", "cpu_s", "bytes_sent", "bytes_text", "lines") if a[k]}})
    return rows


def main_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1)
