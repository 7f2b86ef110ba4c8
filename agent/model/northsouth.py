"""Service → the frontends traffic from outside the node reaches: NodePort on every node address,
spec.externalIPs, status.loadBalancer.ingress[].ip; and the same addresses for local sockets.

Pure: same input, same output. What kube-proxy does, and where this follows it:
- NodePort on every address of every node device (kube-proxy's default --nodeport-addresses: all
  local addresses), for each IP family the Service has (clusterIPs), within the node-port range;
- externalIPs on every Service type, load-balancer IPs on type LoadBalancer;
- externalTrafficPolicy: Local keeps only this node's endpoints and the client's address; a node
  with endpoints only elsewhere drops (KUBE-EXT-* → KUBE-MARK-DROP), a Service with no endpoint at
  all rejects;
- loadBalancerSourceRanges filter the load-balancer IPs only (KUBE-FW-* chains);
- traffic from this node's own sockets to these addresses is "short-circuited" to all the
  Service's endpoints whatever the policy (kube-proxy jumps local-origin traffic to KUBE-SVC-*).
Endpoints: kube-proxy's selection (selection.py: ready, else serving+terminating, topology hints).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from .frontends import SUPPORTED_PROTOCOLS, Backend, Frontend, slice_port, skip_reason
from .objects import EndpointSlice, ObjectKey, Service, ServicePort
from .selection import Place, categorize

DEFAULT_NODEPORT_RANGE = (30000, 32767)  # kube-apiserver's --service-node-port-range default


@dataclass(frozen=True)
class NodeInfo:
    name: str
    addresses: tuple[str, ...]  # every address of every selected device
    zone: str = ""              # for topology hints
    nodeport_range: tuple[int, int] = DEFAULT_NODEPORT_RANGE


class GroupKey(NamedTuple):
    """One Service port in one family: its external frontends share backends and a Maglev table."""
    service: ObjectKey
    port_name: str
    protocol: str
    family: int


class ExternalFrontend(NamedTuple):
    frontend: Frontend
    kind: str                          # NodePort | ExternalIP | LoadBalancer
    group: GroupKey
    drop_empty: bool = False           # no backend here, but the Service has some elsewhere: drop
    source_ranges: tuple[str, ...] | None = None  # None: everyone; else only these CIDRs


@dataclass(frozen=True)
class NorthSouth:
    external: tuple[ExternalFrontend, ...] = ()
    socket: tuple[Frontend, ...] = ()        # extra frontends for the socket path
    local_addresses: frozenset[str] = frozenset()  # external backends that are on this node
    health_check_node_port: int = 0
    local_endpoints: int = 0
    errors: tuple[str, ...] = ()


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


def _endpoints(svc: Service, sp: ServicePort, slices: list[EndpointSlice], family: int,
               node: NodeInfo) -> tuple[list[Backend], list[Backend], bool]:
    """(cluster, local, has_any) backends of this port: kube-proxy's selection (selection.py)."""
    atype = "IPv6" if family == 6 else "IPv4"
    endpoints, ports = [], []
    for sl in slices:
        if sl.address_type == atype and (port := slice_port(sp, sl)) is not None:
            endpoints.extend(sl.endpoints)
            ports.extend([port] * len(sl.endpoints))
    sel = categorize(endpoints, Place(node.name, node.zone), svc.traffic_distribution,
                     uses_cluster=True, uses_local=True)
    pick = lambda idx: sorted({Backend(endpoints[i].addresses[0], ports[i], sp.protocol) for i in idx})  # noqa: E731
    return pick(sel.cluster), pick(sel.local), sel.has_any


def _node_endpoints(slices: list[EndpointSlice], node_name: str) -> set[str]:
    return {ep.addresses[0] for sl in slices for ep in sl.endpoints if ep.node_name == node_name}


def _ranges(svc: Service, family: int) -> tuple[str, ...] | None:
    if not svc.load_balancer_source_ranges:
        return None
    return tuple(c for c in svc.load_balancer_source_ranges if _family(c) == family)


def service_northsouth(svc: Service, slices: Iterable[EndpointSlice], node: NodeInfo) -> NorthSouth:
    if skip_reason(svc):
        return NorthSouth()
    slices = list(slices)
    families = sorted({_family(ip) for ip in svc.cluster_ips})
    local_only = svc.external_traffic_policy == "Local"
    affinity = svc.session_affinity_timeout if svc.session_affinity == "ClientIP" else 0
    lo, hi = node.nodeport_range
    external, sock, errors = [], [], []
    local_addrs: set[str] = set()
    local_eps: set[str] = set()
    for sp in svc.ports:
        if sp.protocol not in SUPPORTED_PROTOCOLS:
            continue
        node_port = sp.node_port if svc.type in ("NodePort", "LoadBalancer") else 0
        if node_port and not lo <= node_port <= hi:
            errors.append(f"Service {svc.key}: spec.ports[{sp.name or sp.port}].nodePort: {node_port} "
                          f"outside the node-port range {lo}-{hi}; no NodePort")
            node_port = 0
        for fam in families:
            cluster, here, has_any = _endpoints(svc, sp, slices, fam, node)
            everyone, here = tuple(cluster), tuple(here)
            local_eps.update(b.ip for b in here)
            backends = here if local_only else everyone
            local_addrs.update(b.ip for b in here)
            if not local_only:  # the cluster list may hold this node's endpoints too: no SNAT to them
                local_addrs.update(b.ip for b in everyone if b.ip in _node_endpoints(slices, node.name))
            drop_empty = local_only and not here and has_any
            group = GroupKey(svc.key, sp.name, sp.protocol, fam)
            addrs: list[tuple[str, int, str]] = []
            if node_port:
                addrs += [(a, node_port, "NodePort") for a in node.addresses if _family(a) == fam]
            addrs += [(a, sp.port, "ExternalIP") for a in svc.external_ips if _family(a) == fam]
            if svc.type == "LoadBalancer":
                addrs += [(a, sp.port, "LoadBalancer") for a in svc.load_balancer_ips if _family(a) == fam]
            for ip, port, kind in dict.fromkeys(addrs):
                fe = Frontend(ip, port, sp.protocol, svc.key, sp.name, backends, affinity)
                ranges = _ranges(svc, fam) if kind == "LoadBalancer" else None
                external.append(ExternalFrontend(fe, kind, group, drop_empty, ranges))
                sock.append(fe._replace(backends=everyone))
            if node_port and fam == 4:  # kube-proxy also answers 127.0.0.1:nodePort (route_localnet)
                sock.append(Frontend("127.0.0.1", node_port, sp.protocol, svc.key, sp.name, everyone, affinity))
    hc = svc.health_check_node_port if svc.type == "LoadBalancer" and local_only else 0
    return NorthSouth(tuple(external), tuple(dict.fromkeys(sock)), frozenset(local_addrs), hc,
                      len(local_eps), tuple(errors))


def in_ranges(ip: str, ranges: tuple[str, ...] | None) -> bool:
    """Whether a client address may use a frontend with these source ranges (for tests and status)."""
    if ranges is None:
        return True
    a = ipaddress.ip_address(ip)
    return any(a in ipaddress.ip_network(c) for c in ranges)
