"""`nodewire demo`: a sandbox cluster, the real agent on it, traffic to ClusterIPs, a live view.

Pods are network namespaces on a bridge in the sandbox's own node namespace; the agent attaches only
to the sandbox's cgroup and pins under its own directory, so the demo never touches the host's
datapath. Midway the demo marks web-3 not ready (by editing its manifest) and later ready again, so a
person sees the datapath follow the manifests.

The telemetry half is on by default: the agent serves /metrics on a local port (printed at start;
127.0.0.1:9966 when free), and the live view reads it like Prometheus would — per-Service connect
latency p50/p99 (from the socket LB's own record of which backend each connect went to) beside the
backend counts, and per-pod bytes from the veths' own counters, each pod beside the Deployment its
series name (k8s.deployment.name, which the agent derives from the pod's ReplicaSet ownerReference).
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

from agent.status import AgentStatus, read_status, status_path
from .sandbox import Sandbox
from .sandbox.cluster import PROBE

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # the checkout's examples/
NODEWIRE = str(Path(sys.executable).with_name("nodewire"))
TARGETS = [
    ("web (IPv4)", "tcp:10.96.0.10:80"),
    ("web (IPv6)", "tcp:[fd00:10:96::10]:80"),
    ("dns (UDP)", "udp:10.96.0.53:53"),
    ("billing (no ready endpoint)", "tcp:10.96.0.20:80"),
]
POD_ORDER = ["client", "web-1", "web-2", "web-3", "dns-1", "dns-2"]  # fixes the addresses in examples/
SERVICE_OF = {"web (IPv4)": ("default", "web"), "web (IPv6)": ("default", "web"), "dns (UDP)": ("default", "dns"),
              "billing (no ready endpoint)": ("default", "billing")}


def default_metrics_addr() -> str:
    """127.0.0.1:9966 (the agent's port) when free, else any free local port."""
    for port in (9966, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return f"127.0.0.1:{s.getsockname()[1]}"
    raise RuntimeError("no free local port for the demo's /metrics")


class Telemetry:
    """The agent's /metrics as the live view shows it: since the demo's first scrape."""

    def __init__(self, url: str | None):
        self.url, self.first, self.last, self.t0, self.t1 = url, None, None, 0.0, 0.0
        self.deployments: dict[str, str] = {}  # pod → k8s.deployment.name, as its series carry it

    def refresh(self) -> None:
        from agent.observe.views import parse

        if not self.url:
            return
        try:
            with urllib.request.urlopen(self.url, timeout=10) as r:
                text = r.read().decode()
        except OSError:
            return
        cur = parse(text)
        self.deployments.update(deployments(text))
        if self.first is None:
            self.first, self.t0 = cur, time.monotonic()
        self.last, self.t1 = cur, time.monotonic()

    def services(self) -> dict:
        from agent.observe.views import service_rows

        if self.last is None:
            return {}
        return {r.service: r for r in service_rows(self.first, self.last, max(self.t1 - self.t0, 1e-3))}

    def pod_bytes(self) -> dict[str, tuple[float, float]]:
        """pod → (received, transmitted) bytes since the first scrape."""
        if self.last is None:
            return {}
        out = {}
        for (pod, direction), v in self.last.bytes.items():
            rx, tx = out.get(pod[1], (0.0, 0.0))
            d = v - self.first.bytes.get((pod, direction), 0.0)
            out[pod[1]] = (rx + d, tx) if direction == "receive" else (rx, tx + d)
        return out


def deployments(text: str) -> dict[str, str]:
    """pod → its k8s_deployment_name label, from the per-pod byte series of a /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "k8s_pod_network_io_bytes_total" and "k8s_deployment_name" in labels:
                out[labels["k8s_pod_name"]] = labels["k8s_deployment_name"]
    return out


class Tally:
    def __init__(self):
        self.replies: dict[str, Counter] = defaultdict(Counter)
        self.errors: dict[str, Counter] = defaultdict(Counter)
        self.events: list[str] = []
        self.lock = threading.Lock()

    def read(self, stream) -> None:
        for line in stream:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self.lock:
                if r["reply"]:
                    self.replies[r["target"]][r["reply"]] += 1
                if r["error"]:
                    self.errors[r["target"]][r["error"]] += 1

    def event(self, text: str) -> None:
        with self.lock:
            self.events.append(f"{time.strftime('%H:%M:%S')}  {text}")


def _set_web3_ready(manifests: Path, ready: bool) -> None:
    path = manifests / "web.yaml"
    text = (EXAMPLES / "web.yaml").read_text()
    if not ready:
        for addr in ("10.244.0.5", '"fd00:10:244::5"'):
            text = text.replace(f"{{addresses: [{addr}], conditions: {{ready: true}}",
                                f"{{addresses: [{addr}], conditions: {{ready: false}}")
    tmp = manifests / ".web.yaml.tmp"
    tmp.write_text(text)
    tmp.rename(path)


def _render(tally: Tally, status: AgentStatus | None, elapsed: float, tel: "Telemetry | None" = None):
    from rich.console import Group
    from rich.table import Table

    from agent.observe.views import fmt_rate, fmt_seconds

    svcs = tel.services() if tel else {}
    t = Table(title=f"nodewire demo: requests from pod 'client' to ClusterIPs ({elapsed:.0f}s)", expand=False)
    t.add_column("Service (ClusterIP)")
    t.add_column("answered by backend pod (count)")
    t.add_column("errors")
    t.add_column("connect p50 / p99", justify="right")
    with tally.lock:
        for name, _ in TARGETS:
            replies = ", ".join(f"{k}: {v}" for k, v in sorted(tally.replies[name].items())) or "-"
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(tally.errors[name].items())) or "-"
            row = svcs.get(SERVICE_OF[name])
            lat = f"{fmt_seconds(row.p50)} / {fmt_seconds(row.p99)}" if row and row.p50 is not None else "-"
            t.add_row(name, replies, errors, lat)
        events = list(tally.events[-6:])
    pods = Table(title="per-pod bytes since start (the veths' own counters)", expand=False)
    for col in ("pod", "deployment", "received", "transmitted"):
        pods.add_column(col, justify="left" if col in ("pod", "deployment") else "right")
    for pod, (rx, tx) in sorted((tel.pod_bytes() if tel else {}).items()):
        pods.add_row(pod, tel.deployments.get(pod, "-"), fmt_rate(rx, "B"), fmt_rate(tx, "B"))
    info = Table.grid(padding=(0, 2))
    if status is not None:
        info.add_row("agent", f"pid {status.pid}, {len(status.programs)} socket programs on the sandbox cgroup")
        for name, m in status.maps.items():
            info.add_row("map", f"{name}: {m.entries} entries")
        last = status.last_sync
        if last:
            info.add_row("last sync", f"{last.written} written, {last.deleted} deleted in {last.seconds * 1000:.2f} ms")
    ev = Table.grid()
    for e in events:
        ev.add_row(e)
    return Group(t, pods, info, ev)


def run_demo(duration: float | None, metrics_addr: str | None, interval: float = 0.1) -> dict:
    """Run the demo; returns the final tally (used by the test and printed at the end).
    metrics_addr: where the agent serves /metrics (None: a local port, "" : off)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    if metrics_addr is None:
        metrics_addr = default_metrics_addr()
    tel = Telemetry(f"http://{metrics_addr}/metrics" if metrics_addr else None)
    tmp = Path(tempfile.mkdtemp(prefix="nodewire-demo-"))
    manifests = tmp / "manifests"
    shutil.copytree(EXAMPLES, manifests, ignore=shutil.ignore_patterns("*.md"))
    agent = None
    tally = Tally()
    status: AgentStatus | None = None
    start = time.time()
    with Sandbox() as sb:
        pin_dir = f"/sys/fs/bpf/nodewire-demo-{sb.prefix}"
        try:
            pods = {name: sb.add_pod(name) for name in POD_ORDER}
            for name in ("web-1", "web-2", "web-3"):
                pods[name].serve(tcp_ports=[8080])
            for name in ("dns-1", "dns-2"):
                pods[name].serve(udp_ports=[5353])
            tally.event(f"sandbox {sb.prefix}: {len(pods)} pods up (netns + veth on a bridge, one cgroup each)")
            cmd = [NODEWIRE, "run", "--manifests", str(manifests), "--cgroup", sb.cgroup, "--pin-dir", pin_dir,
                   "--node-name", "sandbox", "--veth-netns", sb.node_netns]
            cmd += ["--metrics-addr", metrics_addr or ""]  # "": off (the agent's default is :9966)
            agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "agent.log", "w"))
            status_file = Path(status_path(pin_dir))
            deadline = time.time() + 60
            while not status_file.exists():
                if agent.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"agent did not start: {(tmp / 'agent.log').read_text()[-2000:]}")
                time.sleep(0.1)
            tally.event(f"agent synced the manifests in {EXAMPLES.name}/ (metrics: {metrics_addr or 'off'})")
            if metrics_addr:
                console.print(f"metrics: http://{metrics_addr}/metrics  (try: nodewire top --metrics-addr {metrics_addr})")
            client = pods["client"].popen(
                [sys.executable, str(PROBE), "stream", *[f"{n}={t}" for n, t in TARGETS], "--interval", str(interval)])
            threading.Thread(target=tally.read, args=(client.stdout,), daemon=True).start()

            start = time.time()
            toggles = [(1 / 3, False), (2 / 3, True)] if duration else []
            with Live(console=console, refresh_per_second=4, transient=not console.is_terminal) as live:
                while duration is None or time.time() - start < duration:
                    elapsed = time.time() - start
                    if toggles and elapsed >= toggles[0][0] * duration:
                        _, ready = toggles.pop(0)
                        _set_web3_ready(manifests, ready)
                        tally.event("web-3 marked ready again" if ready else "web-3 marked NOT ready: no new connects go to it")
                    elif duration is None and int(elapsed) % 30 == 15 and int(elapsed) != getattr(live, "_nw_t", -1):
                        live._nw_t = int(elapsed)
                        ready = int(elapsed) % 60 != 15
                        _set_web3_ready(manifests, ready)
                        tally.event("web-3 marked ready again" if ready else "web-3 marked NOT ready")
                    status = read_status(pin_dir) or status
                    tel.refresh()
                    live.update(_render(tally, status, elapsed, tel))
                    time.sleep(0.25)
        except KeyboardInterrupt:
            pass
        finally:
            if agent is not None and agent.poll() is None:
                agent.terminate()
                agent.wait(timeout=20)
            subprocess.run([NODEWIRE, "cleanup", "--pin-dir", pin_dir, "--cgroup", sb.cgroup],
                           capture_output=True, text=True)
            shutil.rmtree(tmp, ignore_errors=True)
    if not console.is_terminal:
        console.print(_render(tally, status, time.time() - start, tel))
    console.print(f"removed sandbox {sb.prefix} (namespaces, cgroups, pinned maps)")
    from .demo_northsouth import run_north_south  # from outside the node: NodePort and LoadBalancer IP
    north_south = run_north_south(console)
    svcs = tel.services()
    return {"replies": {k: dict(v) for k, v in tally.replies.items()},
            "errors": {k: dict(v) for k, v in tally.errors.items()}, "events": tally.events,
            "metrics_addr": metrics_addr, "north_south": north_south,
            "connect_seconds": {f"{ns}/{n}": {"p50": r.p50, "p99": r.p99, "backends": r.backends}
                                for (ns, n), r in svcs.items()},
            "pod_bytes": {pod: {"received": rx, "transmitted": tx} for pod, (rx, tx) in tel.pod_bytes().items()},
            "deployments": tel.deployments}
