"""The node side of north-south: its addresses and devices followed live, and its counters visible.
Real packets from the external client of the multi-node sandbox (devkit/nodewire_dev/sandbox/
multinode.py) to a NodePort on node 1, whose agent runs with `--devices auto`; node 2 runs no agent
(its pod b1 is a remote backend, reached through SNAT). Every change is made with `ip` in the node's
namespace after the agent started; the agent's /metrics (on node 1's loopback) is read through a relay.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest

from agent.datapath.addresses import SETTLE_MAX_SECONDS
from nodewire_dev.sandbox.multinode import MultiNodeSandbox
from tests.conftest import NODEWIRE, AgentProcess, wait_for
from tests.manifests import endpoint_slice, service, write
from tests.netns_relay import NetnsRelay
from tests.observe_helpers import samples

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

NODE_PORT, EMPTY_NODE_PORT, CLOSED_NODE_PORT, TCP_PORT, METRICS_PORT = 30200, 30201, 30202, 8080, 9966
CLOSED_UDP = 5999  # nothing listens there in the pods: they answer with ICMP port unreachable
CT_COUNTERS = ("halfopen_inserted", "promoted", "snat_exhausted")  # nodewire_conntrack_<name>_total
BOTH = {"a1", "b1"}  # a1 on node 1 (local backend), b1 on node 2 (remote: SNAT to node 1's address)


@dataclass
class Env:
    sb: MultiNodeSandbox
    agent: AgentProcess
    relay: NetnsRelay

    @property
    def n1(self):
        return self.sb.nodes[0]

    def ip(self, *args: str, netns: str | None = None) -> None:
        subprocess.run(["ip", "-n", netns or self.n1.netns, *args], check=True, capture_output=True, text=True)

    def answered(self, host: str, count: int = 8, timeout: float = 1.0) -> dict:
        """Which pods answered `count` fresh connects to host:NODE_PORT, and the errors by kind."""
        r = self.sb.client.probe("tcp", host, NODE_PORT, count=count, timeout=timeout)
        return {**r["replies"], **{f"error:{k}": v for k, v in r["errors"].items()}}

    def local_connects(self, host: str, count: int = 8) -> set[str]:
        """Which pods answered connects from a process of node 1 itself (the socket path, no tc)."""
        code = (f"import socket\nout=set()\nfor _ in range({count}):\n"
                f" s=socket.create_connection(({host!r}, {NODE_PORT}), timeout=2); s.sendall(b'x')\n"
                " out.add(s.recv(100).decode().strip()); s.close()\nprint(' '.join(sorted(out)))")
        res = self.n1.run([sys.executable, "-c", code])
        assert res.returncode == 0, res.stderr[-1000:]
        return set(res.stdout.split())

    def northsouth(self) -> dict:
        return self.agent.status().northsouth or {}

    def scraped(self) -> dict[str, float]:
        """North-south counters from the agent's /metrics: packets by outcome, conntrack counters."""
        url = f"http://127.0.0.1:{self.relay.port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out = {dict(k)["outcome"]: v for k, v in samples(text, "nodewire_northsouth_packets_total").items()}
        for name in CT_COUNTERS:
            [value] = samples(text, f"nodewire_conntrack_{name}_total").values()
            out[f"ct.{name}"] = value
        return out

    def status_counters(self) -> dict[str, int]:
        """The same from `nodewire status -o json`: northsouth.counters and northsouth.conntrack.counters."""
        out = subprocess.run([NODEWIRE, "status", "-o", "json", "--pin-dir", self.agent.pin_dir],
                             capture_output=True, text=True, check=True).stdout
        ns = json.loads(out)["northsouth"]
        return {**ns["counters"], **{f"ct.{k}": ns["conntrack"]["counters"][k] for k in CT_COUNTERS}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("node-addresses")
    with MultiNodeSandbox(2) as sb:
        n1, n2 = sb.nodes
        for node, name in ((n1, "a1"), (n2, "b1")):
            sb.add_pod(node, name).serve(tcp_ports=[TCP_PORT])
        s = service("np", ["10.96.20.1", "fd00:10:96::20:1"], target_port=TCP_PORT)
        s["spec"].update(type="NodePort", ipFamilies=["IPv4", "IPv6"])
        s["spec"]["ports"][0]["nodePort"] = NODE_PORT
        slices = [endpoint_slice("np", [n1.pods["a1"].ip4, n2.pods["b1"].ip4], port=TCP_PORT),
                  endpoint_slice("np", [n1.pods["a1"].ip6, n2.pods["b1"].ip6], port=TCP_PORT)]
        for sl in slices:
            sl["endpoints"][0]["nodeName"], sl["endpoints"][1]["nodeName"] = n1.name, n2.name
        empty = service("empty", ["10.96.20.2"], target_port=TCP_PORT)  # no endpoint: rejected
        empty["spec"]["type"] = "NodePort"
        empty["spec"]["ports"][0]["nodePort"] = EMPTY_NODE_PORT
        closed = service("closed", ["10.96.20.3"], protocol="UDP", target_port=CLOSED_UDP)  # a1 only
        closed["spec"]["type"] = "NodePort"
        closed["spec"]["ports"][0]["nodePort"] = CLOSED_NODE_PORT
        closed_sl = endpoint_slice("closed", [n1.pods["a1"].ip4], port=CLOSED_UDP, protocol="UDP")
        closed_sl["endpoints"][0]["nodeName"] = n1.name
        write(d / "np.json", s, *slices, empty, endpoint_slice("empty", []), closed, closed_sl)
        # --devices auto picks the uplink by its default route (a veth: the sandbox's LAN cable)
        for gw in (sb.client.ip4, sb.client.ip6):
            subprocess.run(["ip", "-n", n1.netns, "route", "add", "default", "via", gw], check=True)
        agent = AgentProcess(d, n1.cgroup, n1.pin_dir, prefix=n1.nsenter([]),
                             extra=["--node-name", n1.name, "--devices", "auto", "--no-observe", "--no-rdma",
                                    "--metrics-addr", f"127.0.0.1:{METRICS_PORT}"])
        relay = NetnsRelay(n1.netns, METRICS_PORT)
        try:
            agent.start()
            env = Env(sb, agent, relay)
            wait_for(lambda: set(env.answered(n1.addr4)) == BOTH, 15, what="NodePort answered after start")
            yield env
        finally:
            relay.close()
            agent.cleanup()


def test_address_added_after_start_is_answered_and_removed_is_not(env):
    """An address added to the node's uplink after start serves the NodePort (both families), once
    removed it no longer does; the agent re-read the devices because netlink told it, not by polling."""
    added = {4: ("198.18.0.51", "198.18.0.51/24"), 6: ("fd00:18::51", "fd00:18::51/64")}
    for fam, (ip, cidr) in added.items():
        env.ip("addr", "add", cidr, "dev", "eth0", *(["nodad"] if fam == 6 else []))
        t0 = time.monotonic()
        wait_for(lambda ip=ip: set(env.answered(ip)) == BOTH, 15, what=f"NodePort answered on the added {ip}")
        print(f"IPv{fam} address added → NodePort answered after {time.monotonic() - t0:.2f}s")
    wait_for(lambda: set(env.northsouth()["addresses"]) >= {"198.18.0.51", "fd00:18::51"}, 15,
             what="status lists the added addresses")
    for ip, _ in added.values():  # the node's own sockets reach it too: the socket path follows as well
        assert env.local_connects(ip) == BOTH
    for fam, (ip, cidr) in added.items():
        env.ip("addr", "del", cidr, "dev", "eth0")
        # the client's neighbour entry still sends the packets to node 1: only tc could answer them
        wait_for(lambda ip=ip: not set(env.answered(ip, count=2, timeout=0.5)) & BOTH, 15,
                 what=f"NodePort no longer answered on the removed {ip}")
    assert set(env.answered(env.n1.addr4)) == BOTH  # the node's other addresses are untouched
    watch = wait_for(lambda: (lambda w: w if w["changes"] >= 4 else None)(env.northsouth()["device_watch"]), 15,
                     what="the watcher's changes in the status")
    assert watch["errors"] == 0, watch


def test_veth_is_a_device_once_it_carries_a_default_route(env):
    """devices auto leaves veths out (pod plumbing) however global their address, until the default
    route goes through one: then it gets the tc programs and serves the NodePort; when the route
    leaves, its filters go and the node's own stack answers there again (no listener: refused)."""
    sb, n1 = env.sb, env.n1
    dev, peer = f"{sb.prefix}w", f"{sb.prefix}v"
    env.ip("link", "add", peer, "type", "veth", "peer", "name", dev, "netns", n1.netns, netns=sb.client.netns)
    try:
        for netns, link, a4, a6 in ((sb.client.netns, peer, "198.19.8.100/24", "fd00:19:8::100/64"),
                                    (n1.netns, dev, "198.19.8.11/24", "fd00:19:8::11/64")):
            env.ip("addr", "add", a4, "dev", link, netns=netns)
            env.ip("addr", "add", a6, "dev", link, "nodad", netns=netns)
            env.ip("link", "set", link, "up", netns=netns)
        read = env.northsouth()["device_watch"]["rereads"]
        ns = wait_for(lambda: (lambda ns: ns if ns["device_watch"]["rereads"] > read else None)(env.northsouth()),
                      15, what="the watcher read the veth's addresses")
        assert dev not in ns["devices"] and "198.19.8.11" not in ns["addresses"], ns
        env.ip("-6", "route", "replace", "default", "via", "fd00:19:8::100", "dev", dev)
        wait_for(lambda: set(env.answered("198.19.8.11")) == BOTH, 15, what="NodePort on the default route's veth")
        env.ip("-6", "route", "replace", "default", "via", sb.client.ip6, "dev", "eth0")
        wait_for(lambda: env.answered("198.19.8.11", count=2) == {"error:ECONNREFUSED": 2}, 15,
                 what="the veth left out again once the default route left it")
        filters = subprocess.run(["tc", "-n", n1.netns, "filter", "show", "dev", dev, "ingress"],
                                 capture_output=True, text=True, check=True).stdout
        assert "nw_np_ingress" not in filters, filters
    finally:
        env.ip("link", "del", peer, netns=sb.client.netns)
        env.ip("-6", "route", "replace", "default", "via", sb.client.ip6, "dev", "eth0")


def test_pod_churn_costs_the_watcher_no_reread(env):
    """A pod's veth appearing on the node (links, link-local addresses, bridge ports) is no reason to
    re-read the devices: between two address changes, the pod's events add no re-read of their own."""
    def seen(ip: str) -> int:
        ns = wait_for(lambda: (lambda ns: ns if ip in ns["addresses"] else None)(env.northsouth()), 15,
                      what=f"status lists {ip}")
        return ns["device_watch"]["rereads"]
    env.ip("addr", "add", "198.18.0.53/24", "dev", "eth0")
    before = seen("198.18.0.53")
    env.sb.add_pod(env.n1, "churn1")
    time.sleep(SETTLE_MAX_SECONDS + 0.2)  # the pod's burst is over (and could not join the next one)
    env.ip("addr", "add", "198.18.0.54/24", "dev", "eth0")
    try:
        assert seen("198.18.0.54") == before + 1
    finally:
        for ip in ("198.18.0.53", "198.18.0.54"):
            env.ip("addr", "del", f"{ip}/24", "dev", "eth0")


def test_device_created_after_start_gets_tc_and_serves_the_nodeport(env):
    """devices auto: a link that appears after start (a VXLAN tunnel from the client, on a subnet of
    its own) and then gains a global address gets the tc programs and serves the NodePort, to the local
    and the remote pod; once deleted, it is forgotten."""
    sb, n1 = env.sb, env.n1
    dev = f"{sb.prefix}x"
    for netns, local, remote, ip in ((sb.client.netns, sb.client.ip4, n1.addr4, "198.19.7.100/24"),
                                     (n1.netns, n1.addr4, sb.client.ip4, "198.19.7.11/24")):
        env.ip("link", "add", dev, "type", "vxlan", "id", "42", "dstport", "4789", "local", local, "remote", remote,
               netns=netns)
        env.ip("link", "set", dev, "up", netns=netns)
        env.ip("addr", "add", ip, "dev", dev, netns=netns)
    try:
        wait_for(lambda: set(env.answered("198.19.7.11")) == BOTH, 15, what="NodePort answered on the new device")
        filters = subprocess.run(["tc", "-n", n1.netns, "filter", "show", "dev", dev, "ingress"],
                                 capture_output=True, text=True, check=True).stdout
        assert "nw_np_ingress" in filters, filters
        wait_for(lambda: dev in env.northsouth()["devices"], 15, what="status lists the new device")
    finally:
        for netns in (sb.client.netns, n1.netns):
            env.ip("link", "del", dev, netns=netns)
    wait_for(lambda: dev not in env.northsouth().get("devices", {dev: 0})
             and "198.19.7.11" not in env.northsouth()["addresses"], 15, what="the deleted device forgotten")
    assert set(env.answered(n1.addr4)) == BOTH


def test_counters_move_by_the_connects_made(env):
    """N connects to the NodePort are N new flows (local + remote), each with two conntrack entries made
    half-open and then promoted once its handshake completed; M connects to a Service without endpoints
    are M rejects and no conntrack entry; K datagrams to a closed UDP port are K flows whose ICMP port
    unreachable is translated back. The metrics and `nodewire status -o json` move by exactly that, and
    every outcome abi.py lists is exported (zero or not)."""
    from agent.datapath.abi import NP_OUTCOME_NAMES

    n, m, k = 10, 4, 3
    m0 = env.scraped()
    assert set(NP_OUTCOME_NAMES) <= set(m0), m0
    # no traffic now: the status file catches up with the kernel counters (it is rewritten at its next
    # check, only when something in it changed), then it is the starting point
    s0 = wait_for(lambda: (lambda s: s if s == m0 else None)(env.status_counters()), 15, what="status caught up")
    assert set(env.answered(env.n1.addr4, count=n)) == BOTH
    r = env.sb.client.probe("tcp", env.n1.addr4, EMPTY_NODE_PORT, count=m, timeout=1.0)
    assert r["errors"] == {"ECONNREFUSED": m}, r
    refused = (f"import socket\nn=0\nfor _ in range({k}):\n"  # k UDP flows, each answered by ICMP port unreachable
               " s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\n"
               f" s.connect(({env.n1.addr4!r}, {CLOSED_NODE_PORT})); s.send(b'x')\n"
               " try: s.recv(100)\n except ConnectionRefusedError: n+=1\n s.close()\nprint(n)")
    assert env.sb.client.python(refused).strip() == str(k)

    def moved(now: dict, was: dict) -> tuple:
        d = {k: now[k] - was[k] for k in was}
        return (d["local"] + d["remote"], d["reject"], d["icmp_translated"], d["ct.halfopen_inserted"],
                d["ct.promoted"], d["ct.snat_exhausted"])
    # every flow makes two half-open entries; the TCP ones are promoted, the UDP ones never got a reply
    want = (n + k, m, k, 2 * (n + k), n, 0)
    assert moved(env.scraped(), m0) == want
    wait_for(lambda: moved(env.status_counters(), s0) == want, 15, what="status counters moved")
    table = subprocess.run([NODEWIRE, "status", "--pin-dir", env.agent.pin_dir], capture_output=True, text=True,
                           check=True).stdout  # the human view says the same
    assert "north-south: devices eth0;" in table and re.search(rf"packets: .*\breject {s0['reject'] + m}\b", table), table
    assert re.search(rf"conntrack counters: .*\bpromoted {s0['ct.promoted'] + n}\b", table), table


def test_snat_address_follows_the_node_address(env):
    """The node's primary address moves: flows to the remote pod leave with the new address (the pod's
    replies could not come back to the old one), and the status names it. Runs last: it renumbers node 1."""
    n1, n2 = env.n1, env.sb.nodes[1]
    env.ip("addr", "add", "198.18.0.52/24", "dev", "eth0")
    wait_for(lambda: set(env.answered("198.18.0.52")) == BOTH, 15, what="NodePort on the second address")
    subprocess.run(["ip", "netns", "exec", n1.netns, "sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"],
                   check=True, capture_output=True)
    env.ip("addr", "del", f"{n1.addr4}/24", "dev", "eth0")  # .52 is promoted to primary
    env.ip("neigh", "flush", "to", n1.addr4, netns=n2.netns)  # node 2 must ask again where the old one is
    # every connect answered (an error would be a key of its own), by both pods
    wait_for(lambda: set(env.answered("198.18.0.52", count=8)) == BOTH, 15,
             what="remote pod reached through the new SNAT address")
    wait_for(lambda: env.northsouth()["snat"]["ipv4"] == "198.18.0.52", 15, what="status names the new SNAT address")
