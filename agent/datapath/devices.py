"""Which of the node's interfaces carry north-south traffic, and the node addresses on them.

--devices names them; "auto" picks every interface holding a global node address or a default
route (Cilium's auto-detection, minus the pod plumbing: bridges and veths carry pod networks, not
node addresses, unless the default route goes through them). Read over netlink in the agent's own
network namespace, in one snapshot (links, addresses, default routes: three dumps), so the watcher
(addresses.py) can re-read it cheaply whenever the kernel says something relevant changed.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

POD_PLUMBING = ("bridge", "veth")
AUTO = ("auto",)
RT_SCOPE_UNIVERSE, RT_TABLE_MAIN, IFF_LOOPBACK = 0, 254, 0x8  # include/uapi/linux/rtnetlink.h, if.h


@dataclass(frozen=True)
class NodeDevices:
    """The selected devices (name → ifindex) and their global addresses: devices in name order (auto)
    or as --devices lists them, each device's addresses in the kernel's order (primary first)."""
    devices: tuple[tuple[str, int], ...] = ()
    addresses: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.devices]


def _kind(link) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""


def default_route_oifs(ipr) -> set[int]:
    """Interfaces a default route (main table, IPv4 or IPv6) leaves through."""
    out = set()
    for fam in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=fam, table=RT_TABLE_MAIN):
            if r["dst_len"] == 0 and r.get_attr("RTA_OIF"):
                out.add(r.get_attr("RTA_OIF"))
    return out


def read_node_devices(ipr, spec: tuple[str, ...] | list[str], strict: bool = False) -> NodeDevices:
    """The devices `spec` selects now ("auto", or names) and their global addresses. strict: a named
    device that does not exist is an error (at start-up); otherwise it is left out until it appears."""
    links = {l["index"]: l for l in ipr.get_links()}
    names = {i: l.get_attr("IFLA_IFNAME") for i, l in links.items()}
    addrs: dict[int, list[str]] = {}
    for a in ipr.get_addr():
        if a["scope"] == RT_SCOPE_UNIVERSE:  # no link-local, no host-scope
            addrs.setdefault(a["index"], []).append(a.get_attr("IFA_ADDRESS"))
    if tuple(spec) == AUTO:
        default = default_route_oifs(ipr)
        chosen = sorted((i for i in (set(addrs) | default) & set(links)
                         if not links[i]["flags"] & IFF_LOOPBACK
                         and (_kind(links[i]) not in POD_PLUMBING or i in default)), key=names.get)
    else:
        by_name = {n: i for i, n in names.items()}
        missing = [n for n in spec if n not in by_name]
        if missing and strict:
            raise LookupError(f"--devices: no interface {missing[0]!r} in this network namespace")
        chosen = [by_name[n] for n in spec if n in by_name]
    devices = tuple((names[i], i) for i in chosen)
    addresses = [ip for _, i in devices for ip in addrs.get(i, ())]
    return NodeDevices(devices, tuple(dict.fromkeys(addresses)))

