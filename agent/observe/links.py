"""Per-pod bytes and packets from the kernel's own interface counters, read at collection time.

Every veth already counts what crosses it (IFLA_STATS64 over netlink): reading those counters costs
nothing per packet, where a tc program would run on every frame. On the node-side veth of a pod,
rx is what the pod transmitted and tx what it received. Bytes are frames including the Ethernet
header (veth counts skb->len at xmit). A GSO super-packet counts as one packet here (the veth never
segments it); the opt-in tc program (bpf/pod_tc.c, `--pod-tc`) counts its segments instead.

Also finds the veth a routed CNI sends a pod's address to (the node's route to it).
"""
from __future__ import annotations

import threading

from pyroute2.netlink.exceptions import NetlinkError

from .linkdump import dump_veth_stats, open_socket


class LinkStats:
    """One netlink handle in the namespace holding the pods' node-side veths (None: this one)."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        self._lock = threading.Lock()
        if netns:
            from pyroute2 import NetNS
            self.ipr = NetNS(netns)
        else:
            from pyroute2 import IPRoute
            self.ipr = IPRoute()
        self._sock = open_socket(netns)  # the counters' dump, parsed without pyroute2 (linkdump.py)
        self._seq = 0

    def read(self) -> dict[str, dict[str, tuple[int, int]]]:
        """ifname → {"transmit"/"receive" (as the pod sees it): (packets, bytes)} of every veth,
        in one netlink dump."""
        with self._lock:
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            stats = dump_veth_stats(self._sock, self._seq)
        return {name: {"transmit": (rxp, rxb), "receive": (txp, txb)}
                for name, (rxp, txp, rxb, txb) in stats.items()}

    def ifindex(self, ifname: str) -> int | None:
        with self._lock:
            found = self.ipr.link_lookup(ifname=ifname)
        return found[0] if found else None

    def routed_veth(self, ip: str) -> str | None:
        """The veth a routed CNI (Calico, Cilium, the ptp plugin) sends this pod address to: the
        output device of the node's route to it, when that device is a veth. None for bridged
        pods (the route goes to the bridge) and unknown addresses."""
        with self._lock:
            try:
                routes = self.ipr.route("get", dst=ip)
            except NetlinkError:  # no route: not a pod of this node
                return None
            oif = routes[0].get_attr("RTA_OIF") if routes else None
            links = self.ipr.get_links(oif) if oif else []
        if not links:
            return None
        info = links[0].get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "veth":
            return None
        return links[0].get_attr("IFLA_IFNAME")

    def close(self) -> None:
        self._sock.close()
        self.ipr.close()
