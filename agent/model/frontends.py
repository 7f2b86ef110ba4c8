"""Services + EndpointSlices → frontends (VIP, port, proto) → backends (IP, port).

This is the kube-proxy "service port → endpoints" computation, done per Service so that one
changed Service is recomputed without touching the others.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Iterable, NamedTuple

from .objects import PROXY_NAME_LABEL, READY, SCTP, EndpointSlice, ObjectKey, Service, ServicePort

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
    if svc.headless:
        return "headless"
    return None


def ready_addresses(sl: EndpointSlice, node_name: str | None = None) -> list[str]:
    """Addresses of the slice's ready endpoints (on node_name only, when given), read from its
    packed columns: no object per endpoint."""
    family = _FAMILY.get(sl.address_type)
    if family is None:
        return []
    width = 4 if family == socket.AF_INET else 16
    addrs, nodes, ntop = sl.addresses, sl.node_names, socket.inet_ntop
    if node_name is not None and not nodes:
        return []
    return [ntop(family, addrs[i * width:(i + 1) * width]) for i, c in enumerate(sl.conditions)
            if c & READY and (node_name is None or nodes[i] == node_name)]


def service_frontends(svc: Service, slices: Iterable[EndpointSlice], node_name: str | None = None) -> list[Frontend]:
    """All frontends of one Service. Only ready endpoints serve; SCTP ports are left out.

    internalTrafficPolicy: Local keeps only the endpoints on this node (node_name), as kube-proxy
    does; with none there, connects are refused.
    """
    if skip_reason(svc):
        return []
    local = node_name if svc.internal_traffic_policy == "Local" else None
    slices = list(slices)
    ready = {}  # slice index → its ready addresses, computed once for all of the Service's ports
    affinity = svc.session_affinity_timeout if svc.session_affinity == "ClientIP" else 0
    out = []
    for vip in svc.cluster_ips:
        family = "IPv6" if ":" in vip else "IPv4"
        for sp in svc.ports:
            if sp.protocol == SCTP:
                continue
            backends = set()
            for n, sl in enumerate(slices):
                if sl.address_type != family:
                    continue
                port = _slice_port(sp, sl)
                if port is None:
                    continue
                if n not in ready:
                    ready[n] = ready_addresses(sl, local)
                backends.update(Backend(ip, port, sp.protocol) for ip in ready[n])
            out.append(Frontend(vip, sp.port, sp.protocol, svc.key, sp.name, tuple(sorted(backends)), affinity))
    return out
