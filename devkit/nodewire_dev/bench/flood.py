"""`nodewire bench flood`: established NodePort flows under a spoofed SYN flood, nodewire's tc
conntrack against kube-proxy's nftables layout with the kernel's conntrack, in one run.

Per mode, a fresh two-node sandbox: pod a1 on node 1, b1 on node 2 (echo servers), a NodePort on
node 1 to both (b1 through SNAT/masquerade to node 1's address), --flows connections opened from the
external client and left idle (the flows an LRU table drops first) while --flood SYNs from random
sources (hping3) hit the node port, then talked on for 3 s. Reported: flows that never failed,
seconds from the flood's end until a batch of 8 fresh connections all get answers, the flood's size
and duration. nftables: kube-proxy's layout (nftables_rules.py) plus its `external-` chain for the
node port (masquerade, then the service chain), kernel conntrack at the netns defaults. nodewire: the agent with `--devices eth0` and default
map sizes. Figures are printed, never asserted.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import click

from agent.output import render

from ..sandbox.flood import HeldFlows, connects, seconds_until_connects_work, syn_flood
from ..sandbox.multinode import MultiNodeSandbox
from . import nftables_rules
from .nodeport import _start_nodewire, _stop_nodewire
from .services import BenchService, Endpoint

NODE_PORT, ECHO_PORT = 30180, 7000
MODES = ("nodewire", "nftables")


def _nft_text(svc: BenchService) -> str:
    text = nftables_rules.full_sync([svc])
    t, chain = nftables_rules.TABLE, nftables_rules.service_chain(svc)
    ext = "external-" + chain[len("service-"):]
    return text + "\n".join([
        f"add chain {t} {ext}",
        f"add rule {t} {ext} jump mark-for-masquerade",  # eTP Cluster: masquerade external traffic
        f"add rule {t} {ext} goto {chain}",
        f"add element {t} service-nodeports {{ tcp . {NODE_PORT} : goto {ext} }}",
    ]) + "\n"


def run_one(mode: str, flows: int, flood: int, interval_us: int) -> dict:
    with MultiNodeSandbox(2) as sb:
        n1, n2 = sb.nodes
        a1, b1 = sb.add_pod(n1, "a1"), sb.add_pod(n2, "b1")
        for p in (a1, b1):
            p.serve(echo_ports=[ECHO_PORT])
        svc = BenchService("bench-flood", "flood", "10.96.18.1", 80, "TCP",
                           (Endpoint(a1.ip4, ECHO_PORT), Endpoint(b1.ip4, ECHO_PORT)))
        proc = None
        if mode == "nodewire":
            proc, _, _ = _start_nodewire(sb, [], svc, 120, NODE_PORT, {a1.ip4: n1.name, b1.ip4: n2.name})
        else:
            res = subprocess.run(n1.nsenter(["nft", "-f", "-"]), input=_nft_text(svc), text=True, capture_output=True)
            if res.returncode != 0:
                raise RuntimeError(f"nft: {res.stderr[-1000:]}")
        try:
            held = HeldFlows(sb.client, n1.addr4, NODE_PORT, flows, seconds=3, idle=True)
            f = syn_flood(sb.client, n1.addr4, NODE_PORT, flood, interval_us, timeout=600)
            end = time.monotonic()
            held.resume()
            until = seconds_until_connects_work(sb.client, n1.addr4, NODE_PORT, end, limit=75)
            out = held.result(timeout=120)
            after = connects(sb.client, n1.addr4, NODE_PORT, 16)
        finally:
            if proc is not None:
                _stop_nodewire(sb, proc)
        remote = sum(1 for n in held.names if n == "b1")
        broken = held.broken(out)
        return {"mode": mode, "flows": flows, "remote_flows": remote, "kept": flows - len(broken),
                "kept_remote": remote - broken.count("b1"), "flood_sent": f["sent"], "flood_s": f["seconds"],
                "connects_work_after_s": until, "connects_after": " ".join(sorted(set(after)))}


def table(rows: list[dict]) -> str:
    lines = ["| mode | flows kept (SNATed kept) | SYNs sent in s | new connects work after s |",
             "| --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['kept']}/{r['flows']} ({r['kept_remote']}/{r['remote_flows']}) | "
                     f"{r['flood_sent']:,} in {r['flood_s']} | {r['connects_work_after_s']} |")
    return "\n".join(lines)


@click.command("flood")
@click.option("--flows", default=40, show_default=True, help="Established flows held through the flood.")
@click.option("--flood", default=2 * 262144, show_default=True, help="Spoofed SYNs sent (hping3 --rand-source).")
@click.option("--interval-us", default=10, show_default=True, help="hping3 -i u<N> between SYNs.")
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True)
def flood_bench(flows, flood, interval_us, modes, output) -> None:
    """Established flows kept and seconds until new connects work after a SYN flood: nodewire vs kube-proxy nftables."""
    rows = []
    for mode in [m for m in modes.split(",") if m in MODES]:
        rows.append(run_one(mode, flows, flood, interval_us))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    click.echo(render(rows, output) if output != "table" else table(rows))
