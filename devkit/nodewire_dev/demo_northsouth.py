"""The north-south part of `nodewire demo`: two sandbox nodes with an agent each (`--devices eth0`),
a NodePort and a LoadBalancer IP Service, and an external client on their LAN that is answered by
pods on both nodes. Shown after the socket-path demo, in its own sandbox."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from agent.config import state_dir_for

from .sandbox.multinode import MultiNodeSandbox, nodewire_command

NODE_PORT, LB_IP = 30080, "203.0.113.80"


def _objects(nodes, pods) -> dict:
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shop", "namespace": "demo"},
           "spec": {"type": "LoadBalancer", "clusterIP": "10.96.80.1",
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": NODE_PORT}]},
           "status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}}
    sl = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": "shop-1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "shop"}},
          "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
          "endpoints": [{"addresses": [p.ip4], "nodeName": n.name, "conditions": {"ready": True}}
                        for n, p in zip(nodes, pods)]}
    return {"apiVersion": "v1", "kind": "List", "items": [svc, sl]}


def _wait_synced(pin_dir: str, proc: subprocess.Popen, log: Path) -> None:
    status = Path(state_dir_for(pin_dir), "status.json")
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if json.loads(status.read_text()).get("first_sync"):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"north-south demo agent did not sync: {log.read_text()[-2000:]}")


def run_north_south(console, requests: int = 12) -> dict:
    """Start the two nodes, ask from outside, print who answered; returns {target: {pod: replies}}."""
    tmp = Path(tempfile.mkdtemp(prefix="nodewire-demo-ns-"))
    nw = nodewire_command()
    out: dict = {}
    with MultiNodeSandbox(2) as sb:
        pods = [sb.add_pod(n, f"shop-{i}") for i, n in enumerate(sb.nodes, 1)]
        for p in pods:
            p.serve(tcp_ports=[8080])
        (tmp / "shop.json").write_text(json.dumps(_objects(sb.nodes, pods)))
        agents = []
        try:
            for n in sb.nodes:
                log = tmp / f"{n.name}.log"
                proc = subprocess.Popen(n.nsenter([nw, "run", "--manifests", str(tmp), "--cgroup", n.cgroup,
                                                   "--pin-dir", n.pin_dir, "--node-name", n.name, "--devices", "eth0",
                                                   "--metrics-addr", "", "--no-observe", "--no-rdma"]),
                                        stdout=subprocess.DEVNULL, stderr=open(log, "w"))
                agents.append((n, proc))
                _wait_synced(n.pin_dir, proc, log)
            targets = [(f"NodePort {n.addr4}:{NODE_PORT} ({n.name})", n.addr4, NODE_PORT) for n in sb.nodes]
            targets.append((f"LoadBalancer {LB_IP}:80 (routed to {sb.nodes[0].name})", LB_IP, 80))
            for label, host, port in targets:
                r = sb.client.probe("tcp", host, port, count=requests, timeout=1.0)
                out[label] = dict(Counter(r["replies"]) + Counter({f"error {k}": v for k, v in r["errors"].items()}))
                console.print(f"external client {sb.client.ip4} → {label}: {out[label]}")
        finally:
            for n, proc in agents:
                proc.terminate()
                proc.wait(timeout=20)
                subprocess.run(n.nsenter([nw, "cleanup", "--pin-dir", n.pin_dir, "--cgroup", n.cgroup]),
                               capture_output=True)
    console.print(f"removed north-south sandbox {sb.prefix} (2 nodes, an external client)")
    return out


if __name__ == "__main__":  # pragma: no cover - manual use
    from rich.console import Console

    print(run_north_south(Console()), file=sys.stderr)
