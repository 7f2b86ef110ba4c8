"""`nodewire bench compare --nodeport`: a NodePort reached from outside the node, through kube-proxy's
iptables or nftables NodePort rules or through nodewire's tc programs, beside the same requests sent
straight to the backends, in one multi-node sandbox run (one node, an external client on its LAN).

The node holds N ClusterIP Services plus the NodePort Service the client dials (node address :30080,
E endpoints on the node). In iptables mode a NodePort packet walks nat PREROUTING → KUBE-SERVICES
(all N rules, the node-port jump is its last rule, proxier.go) → KUBE-NODEPORTS; in nftables mode it
is two verdict-map lookups (service-ips, then service-nodeports); nodewire looks it up in one hash at
tc ingress. Masquerade is left out in all three (the backends are local, so replies come back through
the node anyway). "direct" is the client dialling a backend pod address, routed through the same node.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.config import state_dir_for

from ..sandbox.multinode import MultiNodeSandbox
from . import iptables_rules, nftables_rules
from .harness import Settings, interleaved
from .measure import run_capped
from .modes import IPTABLES_BACKENDS
from .nodewire_mode import _service_doc, _slice_doc, _write_json
from .services import TARGET_PORT, BenchService, make_services

NODE_PORT = 30080
MODES = ("iptables", "nftables", "nodewire")


def _nodeport_service(backend_ips: list[str], e: int) -> BenchService:
    svc = make_services(1, backend_ips, e, namespace="bench-np")[0]
    return BenchService(svc.namespace, "nodeport", "10.95.255.1", svc.port, "TCP", svc.endpoints)


def _iptables_text(services: list[BenchService], np_svc: BenchService) -> str:
    text = iptables_rules.full_sync([*services, np_svc])
    rule = (f"-A KUBE-NODEPORTS -p tcp -m comment --comment \"{np_svc.port_key}\" -m tcp --dport {NODE_PORT} "
            f"-j {iptables_rules.svc_chain(np_svc)}")
    return text.replace("\nCOMMIT\n", f"\n{rule}\nCOMMIT\n")


def _nftables_text(services: list[BenchService], np_svc: BenchService) -> str:
    text = nftables_rules.full_sync([*services, np_svc])
    chain = nftables_rules.service_chain(np_svc)
    return text + f"add element {nftables_rules.TABLE} service-nodeports {{ tcp . {NODE_PORT} : goto {chain} }}\n"


def _start_nodewire(sb: MultiNodeSandbox, services: list[BenchService], np_svc: BenchService, cap_s: float,
                    node_port: int = NODE_PORT, owners: dict[str, str] | None = None):
    """The agent on the first node, serving np_svc on node_port; owners: endpoint address → node name
    (default: every endpoint on the first node)."""
    node = sb.nodes[0]
    d = Path(tempfile.mkdtemp(prefix="nodewire-bench-np-"))
    np_doc = _service_doc(np_svc)
    np_doc["spec"]["type"] = "NodePort"
    np_doc["spec"]["ports"][0]["nodePort"] = node_port
    slice_doc = _slice_doc(np_svc)
    for e in slice_doc["endpoints"]:
        e["nodeName"] = (owners or {}).get(e["addresses"][0], node.name)
    _write_json(d / "services.json", [x for s in services for x in (_service_doc(s), _slice_doc(s))] + [np_doc, slice_doc])
    log = open(d / "agent.log.txt", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(node.nsenter([str(Path(sys.executable).with_name("nodewire")), "run", "--manifests", str(d),
                                          "--cgroup", node.cgroup, "--pin-dir", node.pin_dir, "--node-name", node.name,
                                          "--devices", "eth0", "--metrics-addr", "", "--no-observe", "--no-rdma"]),
                            stdout=log, stderr=subprocess.STDOUT)
    status = Path(state_dir_for(node.pin_dir), "status.json")
    while time.perf_counter() - t0 < cap_s:
        try:
            st = json.loads(status.read_text())
            if st.get("first_sync") and st.get("northsouth"):
                return proc, time.perf_counter() - t0, d
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited {proc.returncode}: {(d / 'agent.log.txt').read_text()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"nodewire not ready in {cap_s} s")


def _stop_nodewire(sb: MultiNodeSandbox, proc) -> None:
    node = sb.nodes[0]
    proc.terminate()
    proc.wait(timeout=20)
    subprocess.run(node.nsenter([str(Path(sys.executable).with_name("nodewire")), "cleanup", "--pin-dir", node.pin_dir,
                                 "--cgroup", node.cgroup]), capture_output=True)


def run_one(n: int, e: int, mode: str, s: Settings) -> dict:
    with MultiNodeSandbox(1) as sb:
        node = sb.nodes[0]
        backends = [sb.add_pod(node, f"be{i}") for i in range(max(e, 1))]
        for b in backends:
            b.serve(tcp_ports=[TARGET_PORT])
        sb.route_via(node.pod_net4, node)  # direct: the client dials pod addresses through the node
        services = make_services(n, [b.ip4 for b in backends], e)
        np_svc = _nodeport_service([b.ip4 for b in backends], e)
        row = {"mode": mode, "services": n, "endpoints": e}
        proc = None
        if mode == "nodewire":
            proc, load_s, _ = _start_nodewire(sb, services, np_svc, s.sync_cap_s)
            row["load_s"] = round(load_s, 2)
        else:
            text = _iptables_text(services, np_svc) if mode == "iptables" else _nftables_text(services, np_svc)
            cmd = [IPTABLES_BACKENDS[s.iptables_backend][0], "-w", "--noflush"] if mode == "iptables" else ["nft", "-f"]
            res = run_capped(cmd, text, s.sync_cap_s, node.netns)
            row["load_s"] = round(res.seconds, 2)
            if not res.ok:
                row["status"] = res.error or "> cap"
                return row
        try:
            m = interleaved(sb.client, sb.client, backends, s, "--target", f"{node.addr4}:{NODE_PORT}")
        finally:
            if proc is not None:
                _stop_nodewire(sb, proc)
        row.update(rps=m["mode"]["rps"]["rps"], direct_rps=m["direct"]["rps"]["rps"],
                   p50_us=m["mode"]["lat"].get("p50_us"), direct_p50_us=m["direct"]["lat"].get("p50_us"),
                   errors=m["mode"]["rps"]["errors"] + m["mode"]["lat"]["errors"], status="ok")
        row["rps_ratio"] = round(row["rps"] / row["direct_rps"], 3) if row["rps"] and row["direct_rps"] else None
        return row


def run_nodeport(s: Settings, out: str | None) -> str:
    # Request rates on this shared 2-core machine swing by 2x between half-second windows: many
    # alternating one-second windows per mode, so both series see the same neighbours.
    s.rps_seconds, s.rounds = max(s.rps_seconds, 12.0), max(s.rounds, 12)
    rows = []
    for e in s.endpoints:
        for n in s.services:
            for mode in [m for m in s.modes if m in MODES]:
                rows.append(run_one(n, e, mode, s))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = ["| mode | N | E | req/s NodePort / direct | p50 connect µs NodePort / direct | load s | status |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        rps = f"{r.get('rps')} / {r.get('direct_rps')} = **{r.get('rps_ratio')}×**" if r.get("rps_ratio") else "–"
        lat = f"{r.get('p50_us')} / {r.get('direct_p50_us')}" if r.get("p50_us") else "–"
        lines.append(f"| {r['mode']} | {r['services']} | {r['endpoints']} | {rps} | {lat} | {r.get('load_s')} | "
                     f"{r.get('status')} |")
    table = "\n".join(lines)
    out = out or tempfile.mkdtemp(prefix="nodewire-bench-np-")
    os.makedirs(out, exist_ok=True)
    Path(out, "nodeport.json").write_text(json.dumps(rows, indent=1))
    Path(out, "nodeport.md").write_text(table + "\n")
    return table + f"\n\nwrote {out}/nodeport.md, nodeport.json"
