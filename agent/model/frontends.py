"""Services + EndpointSlices → frontends (VIP, port, proto) → backends (IP, port).

This is the kube-proxy "service port → endpoints" computation, done per Service so that one
changed Service is recomputed without touching the others.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Iterable, NamedTuple

from .objects import PROXY_NAME_LABEL, READY, SCTP, SERVING, TERMINATING, EndpointSlice, ObjectKey, Service, ServicePort
from .selection import CLOSE_DISTRIBUTIONS, Place, internal_endpoints

# Protocols the socket datapath handles (this kernel has no SCTP; see ENVIRONMENT.md).
SUPPORTED_PROTOCOLS = ("TCP", "UDP")
_FAMILY = {"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6}


class Backend(NamedTuple):
    ip: str
    port: int
    protocol: str


class Frontend(NamedTuple):
    """One (VIP, port, protocol) of one Service, with the backends a new connection may go to."""

    ip: str
    port: int
    protocol: str
    service: ObjectKey
    port_name: str
    backends: tuple[Backend, ...]  # sorted; empty means "refuse" (kube-proxy REJECT)
    affinity_timeout: int = 0  # seconds of sessionAffinity: ClientIP; 0 = none

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.ip).version


def slice_port(svc_port: ServicePort, ep_slice: EndpointSlice) -> int | None:
    """The backend port of svc_port in this slice, or None when the slice does not carry it.

    Kubernetes' EndpointSlice controller publishes each Service port under the Service port's name,
    with targetPort (numeric or named) already resolved to a number; that is the first rule. Hand-made
    slices sometimes name the port after the named targetPort instead; that is the second. A numeric
    targetPort with a slice that lists no ports at all is the third.
    """
    for p in ep_slice.ports:
        if p.name == svc_port.name and p.protocol == svc_port.protocol:
            return p.port or None  # 0: the slice's port was invalid (parse.py): this port has no endpoint here
    if isinstance(svc_port.target_port, str):
        for p in ep_slice.ports:
            if p.name == svc_port.target_port and p.protocol == svc_port.protocol:
                return p.port or None
        return None
    if not ep_slice.ports:
        return svc_port.target_port
    return None


def skip_reason(svc: Service) -> str | None:
    """Why this Service gets no frontend at all, or None."""
    if svc.label(PROXY_NAME_LABEL):
        return f"owned by proxy {svc.label(PROXY_NAME_LABEL)!r}"
    if svc.type == "ExternalName":  # a DNS alias: nothing to balance (kube-proxy writes no rules)
        return "ExternalName"
    if svc.headless:
        return "headless"
    return None


def _addresses(sl: EndpointSlice, positions: list[int]) -> list[str]:
    family = _FAMILY[sl.address_type]
    width, addrs, ntop = (4 if family == socket.AF_INET else 16), sl.addresses, socket.inet_ntop
    return [ntop(family, addrs[i * width:(i + 1) * width]) for i in positions]


def _by_columns(sl: EndpointSlice, node: str | None) -> tuple[list[int], list[int]]:
    """(ready, serving-and-terminating) positions of a slice's endpoints, on `node` only when given,
    read from the condition and node columns without an object per endpoint."""
    if node is not None and not sl.node_names:
        return [], []
    nodes, ready, fallback = sl.node_names, [], []
    both = SERVING | TERMINATING
    for i, c in enumerate(sl.conditions):
        if node is not None and nodes[i] != node:
            continue
        if c & READY:
            ready.append(i)
        elif c & both == both:
            fallback.append(i)
    return ready, fallback


def _uses_topology(svc: Service, slices: list[EndpointSlice]) -> bool:
    return svc.traffic_distribution in CLOSE_DISTRIBUTIONS or any(sl.zone_hints or sl.node_hints for sl in slices)


def service_frontends(svc: Service, slices: Iterable[EndpointSlice], node_name: str | None = None,
                      zone: str = "") -> list[Frontend]:
    """All frontends of one Service; SCTP ports are left out.

    Backends are the endpoints kube-proxy would use for traffic to the ClusterIP from this node
    (selection.internal_endpoints: readiness, terminating fall-back, internalTrafficPolicy, topology).
    Without a node name (None) internalTrafficPolicy: Local cannot be honoured and counts as Cluster.
    Slices without topology hints (and Services without trafficDistribution) are read straight from
    their columns: the same rules, restricted to what is left without topology (tested equal).
    """
    if skip_reason(svc):
        return []
    itp = svc.internal_traffic_policy if node_name is not None else "Cluster"
    slices = list(slices)
    affinity = svc.session_affinity_timeout if svc.session_affinity == "ClientIP" else 0
    pick = _by_selection if _uses_topology(svc, slices) else _by_slice_columns
    out = []
    for vip in svc.cluster_ips:
        family = "IPv4" if ":" not in vip else "IPv6"
        for sp in svc.ports:
            if sp.protocol == SCTP:
                continue
            with_port = [(sl, port) for sl in slices if sl.address_type == family
                         for port in (slice_port(sp, sl),) if port is not None]
            backends = {Backend(ip, port, sp.protocol)
                        for ip, port in pick(with_port, svc, itp, node_name, zone)}
            out.append(Frontend(vip, sp.port, sp.protocol, svc.key, sp.name, tuple(sorted(backends)), affinity))
    return out


def _by_slice_columns(with_port, svc, itp, node_name, zone) -> list[tuple[str, int]]:
    """No topology: the ready endpoints (on this node for Local), else the serving-and-terminating ones."""
    node = node_name if itp == "Local" else None
    if node == "":
        return []
    picked = [(sl, port, *_by_columns(sl, node)) for sl, port in with_port]
    use_ready = any(ready for _, _, ready, _ in picked)
    return [(ip, port) for sl, port, ready, fallback in picked
            for ip in _addresses(sl, ready if use_ready else fallback)]


def _by_selection(with_port, svc, itp, node_name, zone) -> list[tuple[str, int]]:
    """Topology in play: transient endpoint views of this one Service, chosen by selection.py."""
    endpoints, ports = [], []
    for sl, port in with_port:
        views = sl.endpoints
        endpoints.extend(views)
        ports.extend([port] * len(views))
    chosen = internal_endpoints(endpoints, Place(node_name or "", zone), itp, svc.traffic_distribution)
    # Kubernetes uses only the first address of an endpoint.
    return [(endpoints[i].addresses[0], ports[i]) for i in chosen]
