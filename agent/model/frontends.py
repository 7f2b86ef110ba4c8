"""Services + EndpointSlices → frontends (VIP, port, proto) → backends (IP, port).

This is the kube-proxy "service port → endpoints" computation, done per Service so that one
changed Service is recomputed without touching the others.
"""
from __future__ import annotations

import bisect
import functools
import ipaddress
from typing import Iterable, NamedTuple

from .objects import PROXY_NAME_LABEL, SCTP, EndpointSlice, ObjectKey, Service, ServicePort
from .selection import Place, internal_endpoints

# Protocols the socket datapath handles (this kernel has no SCTP; see ENVIRONMENT.md).
SUPPORTED_PROTOCOLS = ("TCP", "UDP")


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


def _slice_port(svc_port: ServicePort, ep_slice: EndpointSlice) -> int | None:
    """The backend port of svc_port in this slice, or None when the slice does not carry it.

    Kubernetes' EndpointSlice controller publishes each Service port under the Service port's name,
    with targetPort (numeric or named) already resolved to a number; that is the first rule. Hand-made
    slices sometimes name the port after the named targetPort instead; that is the second. A numeric
    targetPort with a slice that lists no ports at all is the third.
    """
    for p in ep_slice.ports:
        if p.name == svc_port.name and p.protocol == svc_port.protocol:
            return p.port
    if isinstance(svc_port.target_port, str):
        for p in ep_slice.ports:
            if p.name == svc_port.target_port and p.protocol == svc_port.protocol:
                return p.port
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


@functools.lru_cache(maxsize=8)
def _place(node: str, zone: str) -> Place:
    return Place(node, zone)  # one per node, not one per Service (a frozen dataclass is slow to make)


def service_frontends(svc: Service, slices: Iterable[EndpointSlice], node_name: str | None = None,
                      zone: str = "") -> list[Frontend]:
    """All frontends of one Service; SCTP ports are left out.

    Backends are the endpoints kube-proxy would use for traffic to the ClusterIP from this node
    (selection.internal_endpoints: readiness, terminating fall-back, internalTrafficPolicy, topology).
    Without a node name (None) internalTrafficPolicy: Local cannot be honoured and counts as Cluster.
    """
    if skip_reason(svc):
        return []
    itp = svc.internal_traffic_policy if node_name is not None else "Cluster"
    place = _place(node_name or "", zone)
    slices = list(slices)
    affinity = svc.session_affinity_timeout if svc.session_affinity == "ClientIP" else 0
    out = []
    for vip in svc.cluster_ips:
        family = "IPv4" if ":" not in vip else "IPv6"
        for sp in svc.ports:
            if sp.protocol == SCTP:
                continue
            endpoints: list = []
            ends, ports = [], []  # per contributing slice: where its endpoints end, its backend port
            for sl in slices:
                if sl.address_type != family:
                    continue
                port = _slice_port(sp, sl)
                if port is not None:
                    endpoints.extend(sl.endpoints)
                    ends.append(len(endpoints))
                    ports.append(port)
            chosen = internal_endpoints(endpoints, place, itp, svc.traffic_distribution)
            # Kubernetes uses only the first address of an endpoint.
            if len(ports) == 1:
                backends = {Backend(endpoints[i].addresses[0], ports[0], sp.protocol) for i in chosen}
            else:
                backends = {Backend(endpoints[i].addresses[0], ports[bisect.bisect_right(ends, i)], sp.protocol)
                            for i in chosen}
            out.append(Frontend(vip, sp.port, sp.protocol, svc.key, sp.name, tuple(sorted(backends)), affinity))
    return out
