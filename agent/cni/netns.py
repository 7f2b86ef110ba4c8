"""Reading pods' network namespaces: which node-side veth is a pod interface's peer, and which
addresses a netns holds. Done with `ip -j` (iproute2) in the namespace rather than a pyroute2 NetNS:
NetNS forks a helper that would inherit the agent's BPF file descriptors (see observe/kernel.py).
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess


def _ip(netns: str | None, *args: str) -> list[dict]:
    if netns is None:
        cmd = ["ip", "-j", *args]
    elif "/" in netns:  # a path (CNI_NETNS, /proc/PID/ns/net)
        cmd = ["nsenter", f"--net={netns}", "ip", "-j", *args]
    else:  # a name under /var/run/netns
        cmd = ["ip", "-n", netns, "-j", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return json.loads(out.stdout or "[]")


def veths(netns: str | None) -> dict[int, str]:
    """ifindex → name of every veth in netns (None: the agent's own)."""
    return {link["ifindex"]: link["ifname"] for link in _ip(netns, "-d", "link", "show", "type", "veth")}


def peer_index(pod_netns: str, ifname: str) -> int | None:
    """The ifindex, in its peer's namespace, of the other end of the pod's veth `ifname`."""
    links = _ip(pod_netns, "link", "show", "dev", ifname)
    return links[0].get("link_index") if links else None


def host_veth(pod_netns: str, ifname: str, veth_netns: str | None, candidates: tuple[str, ...] = ()) -> str | None:
    """Name of the node-side veth of a pod interface: its peer's index among the veths of the veth
    netns; else the first of `candidates` (prevResult's interfaces outside the sandbox) that is a veth."""
    node_veths = veths(veth_netns)
    idx = peer_index(pod_netns, ifname) if os.path.exists(pod_netns) else None
    if idx in node_veths:
        return node_veths[idx]
    names = set(node_veths.values())
    return next((c for c in candidates if c in names), None)


def addresses(pod_netns: str) -> list[tuple[str, int | None, tuple[str, ...]]]:
    """(ifname, peer ifindex, addresses) of each non-loopback interface with an address."""
    out = []
    for link in _ip(pod_netns, "addr", "show"):
        ips = tuple(str(ipaddress.ip_address(a["local"])) for a in link.get("addr_info", ())
                    if a.get("scope") == "global")
        if ips and link.get("ifname") != "lo":
            out.append((link["ifname"], link.get("link_index"), ips))
    return out
