"""Which of the node's interfaces carry north-south traffic, and the node addresses on them.

--devices names them; "auto" picks every interface holding a global node address or a default
route (Cilium's auto-detection, minus the pod plumbing: bridges and veths carry pod networks, not
node addresses, unless the default route goes through them). Read over netlink in the agent's own
network namespace.
"""
from __future__ import annotations

import socket

POD_PLUMBING = ("bridge", "veth")


def _kind(link) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""


def detect_devices(ipr) -> list[str]:
    """Interface names, sorted, as --devices auto selects them."""
    names = {l["index"]: l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
    kinds = {l["index"]: _kind(l) for l in ipr.get_links()}
    loopback = {l["index"] for l in ipr.get_links() if l["flags"] & 0x8}  # IFF_LOOPBACK
    default = set()
    for fam in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=fam, table=254):
            if r["dst_len"] == 0 and r.get_attr("RTA_OIF"):
                default.add(r.get_attr("RTA_OIF"))
    with_addr = {a["index"] for a in ipr.get_addr() if a["scope"] == 0}  # RT_SCOPE_UNIVERSE
    out = []
    for idx in (with_addr | default) - loopback:
        if kinds.get(idx) in POD_PLUMBING and idx not in default:
            continue
        out.append(names[idx])
    return sorted(out)


def device_addresses(ipr, devices: list[str]) -> list[str]:
    """Global addresses (IPv4 and IPv6, no link-local) on these devices, in device order."""
    out = []
    for dev in devices:
        idx = ipr.link_lookup(ifname=dev)
        if not idx:
            raise LookupError(f"--devices: no interface {dev!r} in this network namespace")
        for a in ipr.get_addr(index=idx[0]):
            if a["scope"] == 0:
                out.append(a.get_attr("IFA_ADDRESS"))
    return list(dict.fromkeys(out))
