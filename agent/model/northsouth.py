"""The frontends traffic from outside the node reaches, for one Service port in one family: NodePort on
every node address, spec.externalIPs, status.loadBalancer.ingress[].ip (view.py walks the ports).

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
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import NamedTuple

from .frontends import Backend, Frontend
from .objects import ObjectKey, Service, ServicePort

DEFAULT_NODEPORT_RANGE = (30000, 32767)  # kube-apiserver's --service-node-port-range default


@dataclass(frozen=True)
class NodeInfo:
    """This node as the model sees it: name and zone (traffic policies, topology hints) and, with
    north-south on, the addresses NodePorts answer on."""
    name: str | None
    addresses: tuple[str, ...] = ()  # every address of every selected device
    zone: str = ""
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


class PortEndpoints(NamedTuple):
    """The endpoints of one Service port in one family, categorized once (selection.categorize)."""
    cluster: tuple[Backend, ...]   # under a Cluster traffic policy
    local: tuple[Backend, ...]     # on this node, under a Local one
    has_any: bool                  # a usable endpoint exists somewhere (drop vs. reject)


def family(ip: str) -> int:
    return 6 if ":" in ip else 4


def has_external(svc: Service) -> bool:
    """Whether the Service can have external frontends (else view.py takes the fast socket-only path)."""
    return bool(svc.external_ips) or svc.type in ("NodePort", "LoadBalancer")


def node_port(svc: Service, sp: ServicePort, node: NodeInfo, errors: list[str]) -> int:
    """The port's nodePort when it has one that is in the node-port range (else 0, with an error)."""
    port = sp.node_port if svc.type in ("NodePort", "LoadBalancer") else 0
    lo, hi = node.nodeport_range
    if port and not lo <= port <= hi:
        errors.append(f"Service {svc.key}: spec.ports[{sp.name or sp.port}].nodePort: {port} "
                      f"outside the node-port range {lo}-{hi}; no NodePort")
        return 0
    return port


def _ranges(svc: Service, fam: int) -> tuple[str, ...] | None:
    if not svc.load_balancer_source_ranges:
        return None
    return tuple(c for c in svc.load_balancer_source_ranges if family(c) == fam)


def external_frontends(svc: Service, sp: ServicePort, fam: int, nport: int, eps: PortEndpoints,
                       node: NodeInfo, affinity: int) -> tuple[list[ExternalFrontend], list[Frontend]]:
    """The external frontends of one port and family, and the same addresses for local sockets."""
    local_only = svc.external_traffic_policy == "Local"
    backends = eps.local if local_only else eps.cluster
    group = GroupKey(svc.key, sp.name, sp.protocol, fam)
    drop_empty = local_only and not eps.local and eps.has_any
    addrs: list[tuple[str, int, str]] = []
    if nport:
        addrs += [(a, nport, "NodePort") for a in node.addresses if family(a) == fam]
    addrs += [(a, sp.port, "ExternalIP") for a in svc.external_ips if family(a) == fam]
    if svc.type == "LoadBalancer":
        addrs += [(a, sp.port, "LoadBalancer") for a in svc.load_balancer_ips if family(a) == fam]
    external, sock = [], []
    for ip, port, kind in dict.fromkeys(addrs):
        fe = Frontend(ip, port, sp.protocol, svc.key, sp.name, backends, affinity)
        ranges = _ranges(svc, fam) if kind == "LoadBalancer" else None
        external.append(ExternalFrontend(fe, kind, group, drop_empty, ranges))
        sock.append(fe._replace(backends=eps.cluster))
    if nport and fam == 4:  # kube-proxy also answers 127.0.0.1:nodePort (route_localnet)
        sock.append(Frontend("127.0.0.1", nport, sp.protocol, svc.key, sp.name, eps.cluster, affinity))
    return external, sock


def in_ranges(ip: str, ranges: tuple[str, ...] | None) -> bool:
    """Whether a client address may use a frontend with these source ranges (for tests and status)."""
    if ranges is None:
        return True
    a = ipaddress.ip_address(ip)
    return any(a in ipaddress.ip_network(c) for c in ranges)
