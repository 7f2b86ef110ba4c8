"""A multi-node sandbox: 2-3 "nodes", each a network namespace with its own pods, cgroup, pin dir
and agent, joined by a LAN bridge that lives in a namespace of its own, plus an "external client"
namespace on the same LAN with routes to the load-balancer and external-IP ranges via a node.

    client (198.18.0.100) ─┐                     ┌─ n1: eth0 198.18.0.11, br0 10.244.1.1 ─ pods 10.244.1.x
                           ├── lan0 (in -lan) ───┤
                           │                     └─ n2: eth0 198.18.0.12, br0 10.244.2.1 ─ pods 10.244.2.x
Every node routes the other nodes' pod ranges via their LAN address (as a routed CNI would) and
forwards. IPv6 mirrors it (fd00:18::/64 on the LAN, fd00:244:N::/64 pods). Nothing touches a host
interface: every link is inside a per-run namespace, removed by close() even after a failure.
The addresses come from the benchmarking (198.18.0.0/15, RFC 2544) and documentation ranges.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from agent.datapath.attach import detect_cgroup2_root

from ..lifecycle import SetUp
from .cluster import Pod, _ip, _ip_batch, _kill_cgroup_tree, _rmdir

LAN4, LAN6 = "198.18.0.", "fd00:18::"
CLIENT4, CLIENT6 = LAN4 + "100", LAN6 + "100"
LB_RANGE4, LB_RANGE6 = "203.0.113.0/24", "2001:db8:5::/64"       # status.loadBalancer.ingress
EXTERNAL_RANGE4, EXTERNAL_RANGE6 = "198.51.100.0/24", "2001:db8:6::/64"  # spec.externalIPs


@dataclass
class Node:
    name: str
    index: int
    netns: str
    cgroup: str
    pin_dir: str
    pods: dict[str, Pod] = field(default_factory=dict)
    _next: int = 2

    @property
    def addr4(self) -> str:
        return f"{LAN4}{10 + self.index}"

    @property
    def addr6(self) -> str:
        return f"{LAN6}{10 + self.index}"

    @property
    def pod_net4(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def pod_net6(self) -> str:
        return f"fd00:244:{self.index}::/64"

    def nsenter(self, argv: list[str]) -> list[str]:
        """argv run in this node's network namespace, keeping the host's mounts (/sys/fs/bpf,
        cgroup2), which `ip netns exec` would hide by remounting /sys."""
        return ["nsenter", f"--net=/var/run/netns/{self.netns}", *argv]

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """A node (host-network) process, in the node's cgroup so its sockets use the node's LB."""
        procs = os.path.join(self.cgroup, "cgroup.procs")

        def enter():
            with open(procs, "w") as f:
                f.write("0")
        return subprocess.Popen(self.nsenter(argv), preexec_fn=enter, **kw)

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        p = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(argv, p.returncode, out, err)


class MultiNodeSandbox(SetUp):
    def __init__(self, nodes: int = 2, prefix: str | None = None):
        self.prefix = prefix or f"nw{secrets.token_hex(3)}"
        self.lan_netns = f"{self.prefix}-lan"
        self.root_cgroup = os.path.join(detect_cgroup2_root(), f"nodewire-{self.prefix}")
        self.nodes = [Node(f"{self.prefix}-n{i}", i, f"{self.prefix}-n{i}",
                           os.path.join(self.root_cgroup, f"n{i}"), f"/sys/fs/bpf/{self.prefix}-n{i}")
                      for i in range(1, nodes + 1)]
        self.client: Pod | None = None
        self._netns: list[str] = []

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._netns.append(name)

    def up(self) -> None:
        os.makedirs(self.root_cgroup, exist_ok=True)
        self._add_netns(self.lan_netns)
        _ip_batch(self.lan_netns, ["link set lo up", "link add lan0 type bridge", "link set lan0 up"])
        for node in self.nodes:
            os.makedirs(node.cgroup, exist_ok=True)
            self._add_netns(node.netns)
            _ip_batch(self.lan_netns, [f"link add n{node.index} type veth peer name eth0 netns {node.netns}",
                                       f"link set n{node.index} master lan0 up"])
            gw4, gw6 = f"10.244.{node.index}.1", f"fd00:244:{node.index}::1"
            lines = ["link set lo up", f"addr add {node.addr4}/24 dev eth0", f"addr add {node.addr6}/64 dev eth0 nodad",
                     "link set eth0 up", "link add br0 type bridge", f"addr add {gw4}/24 dev br0",
                     f"addr add {gw6}/64 dev br0 nodad", "link set br0 up"]
            for other in self.nodes:
                if other is not node:
                    lines += [f"route add {other.pod_net4} via {other.addr4}",
                              f"route add {other.pod_net6} via {other.addr6}"]
            _ip_batch(node.netns, lines)
            self._sysctl(node.netns, ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                                      "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.eth0.send_redirects=0"])
        self.client = self._add_client()

    def _sysctl(self, netns: str, settings: list[str]) -> None:
        subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", *settings], check=True,
                       capture_output=True)

    def _add_client(self) -> Pod:
        netns = f"{self.prefix}-client"
        cg = os.path.join(self.root_cgroup, "client")  # no node's cgroup: no socket LB for it
        os.makedirs(cg, exist_ok=True)
        self._add_netns(netns)
        _ip_batch(self.lan_netns, [f"link add client type veth peer name eth0 netns {netns}",
                                   "link set client master lan0 up"])
        first = self.nodes[0]
        _ip_batch(netns, ["link set lo up", f"addr add {CLIENT4}/24 dev eth0", f"addr add {CLIENT6}/64 dev eth0 nodad",
                          "link set eth0 up",
                          f"route add {LB_RANGE4} via {first.addr4}", f"route add {LB_RANGE6} via {first.addr6}",
                          f"route add {EXTERNAL_RANGE4} via {first.addr4}",
                          f"route add {EXTERNAL_RANGE6} via {first.addr6}"])
        return Pod("client", "external", netns, CLIENT4, CLIENT6, cg, "client")

    def route_via(self, cidr: str, node: Node) -> None:
        """Send the client's traffic for cidr to this node (as a router in front of the cluster)."""
        via = node.addr6 if ":" in cidr else node.addr4
        _ip("-n", self.client.netns, "route", "replace", cidr, "via", via)

    def add_pod(self, node: Node, name: str, namespace: str = "default") -> Pod:
        n = node._next
        node._next += 1
        pod = Pod(name=name, namespace=namespace, netns=f"{self.prefix}-{name}",
                  ip4=f"10.244.{node.index}.{n}", ip6=f"fd00:244:{node.index}::{n}",
                  cgroup=os.path.join(node.cgroup, f"pod-{name}"), host_veth=f"v{name}"[:15])
        os.makedirs(pod.cgroup, exist_ok=True)
        self._add_netns(pod.netns)
        node.pods[name] = pod
        _ip_batch(node.netns, [f"link add {pod.host_veth} type veth peer name eth0 netns {pod.netns}",
                               f"link set {pod.host_veth} master br0 up"])
        _ip_batch(pod.netns, ["link set lo up", f"addr add {pod.ip4}/24 dev eth0",
                              f"addr add {pod.ip6}/64 dev eth0 nodad", "link set eth0 up",
                              f"route add default via 10.244.{node.index}.1",
                              f"route add default via fd00:244:{node.index}::1"])
        return pod

    def all_pods(self) -> list[Pod]:
        return [p for n in self.nodes for p in n.pods.values()] + ([self.client] if self.client else [])

    def close(self) -> None:
        for pod in self.all_pods():
            for p in pod.procs:
                if p.poll() is None:
                    p.kill()
        _kill_cgroup_tree(self.root_cgroup)
        for pod in self.all_pods():
            for p in pod.procs:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for name in reversed(self._netns):
            _ip("netns", "del", name, check=False)
        self._netns.clear()
        _rmdir(self.root_cgroup)


def nodewire_command() -> str:
    return str(Path(sys.executable).with_name("nodewire"))
