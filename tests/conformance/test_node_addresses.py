"""Node addresses and devices followed live (north-south): real packets from the external client of the
multi-node sandbox (devkit/nodewire_dev/sandbox/multinode.py) to a NodePort on node 1, whose agent
runs with `--devices auto`; node 2 runs no agent (its pod b1 is a remote backend, reached through
SNAT). Every change is made with `ip` in the node's namespace after the agent started.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import pytest

from nodewire_dev.sandbox.multinode import MultiNodeSandbox
from tests.conftest import AgentProcess, wait_for
from tests.manifests import endpoint_slice, service, write

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

NODE_PORT, TCP_PORT = 30200, 8080
BOTH = {"a1", "b1"}  # a1 on node 1 (local backend), b1 on node 2 (remote: SNAT to node 1's address)


@dataclass
class Env:
    sb: MultiNodeSandbox
    agent: AgentProcess

    @property
    def n1(self):
        return self.sb.nodes[0]

    def ip(self, *args: str, netns: str | None = None) -> None:
        subprocess.run(["ip", "-n", netns or self.n1.netns, *args], check=True, capture_output=True, text=True)

    def answered(self, host: str, count: int = 8, timeout: float = 1.0) -> dict:
        """Which pods answered `count` fresh connects to host:NODE_PORT, and the errors by kind."""
        r = self.sb.client.probe("tcp", host, NODE_PORT, count=count, timeout=timeout)
        return {**r["replies"], **{f"error:{k}": v for k, v in r["errors"].items()}}

    def northsouth(self) -> dict:
        return self.agent.status().northsouth or {}


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
        write(d / "np.json", s, *slices)
        # --devices auto picks the uplink by its default route (a veth: the sandbox's LAN cable)
        for gw in (sb.client.ip4, sb.client.ip6):
            subprocess.run(["ip", "-n", n1.netns, "route", "add", "default", "via", gw], check=True)
        agent = AgentProcess(d, n1.cgroup, n1.pin_dir, prefix=n1.nsenter([]),
                             extra=["--node-name", n1.name, "--devices", "auto", "--no-observe", "--no-rdma"])
        try:
            agent.start()
            env = Env(sb, agent)
            assert set(env.answered(n1.addr4)) == BOTH
            yield env
        finally:
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
    for fam, (ip, cidr) in added.items():
        env.ip("addr", "del", cidr, "dev", "eth0")
        # the client's neighbour entry still sends the packets to node 1: only tc could answer them
        wait_for(lambda ip=ip: not set(env.answered(ip, count=2, timeout=0.5)) & BOTH, 15,
                 what=f"NodePort no longer answered on the removed {ip}")
    assert set(env.answered(env.n1.addr4)) == BOTH  # the node's other addresses are untouched
    watch = env.northsouth()["device_watch"]
    assert watch["changes"] >= 4 and watch["errors"] == 0, watch


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
