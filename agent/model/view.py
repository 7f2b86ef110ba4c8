"""One Service → its ServiceView: everything the datapath needs of it, computed once per sync.

Pure: same input, same output (after kube-proxy's sync, which walks each service port once). Per
port and family the endpoints are categorized once (selection.categorize: readiness, terminating
fall-back, topology) and every frontend takes its backends from that: the ClusterIPs by
internalTrafficPolicy, the external frontends by externalTrafficPolicy, the node's own sockets
reaching NodePorts / externalIPs / LB IPs all of them (kube-proxy short-circuits local traffic).
A Service that cannot have external frontends (or with north-south off) takes the column path of
frontends.service_frontends, the same rules without an object per endpoint (100k Services at start).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

from .frontends import SUPPORTED_PROTOCOLS, Backend, Frontend, service_frontends, skip_reason, slice_port
from .northsouth import ExternalFrontend, NodeInfo, PortEndpoints, external_frontends, family, has_external, node_port
from .objects import EndpointSlice, ObjectKey, Service, ServicePort
from .selection import Place, categorize


class ServiceView(NamedTuple):
    """(A NamedTuple, not a frozen dataclass: 100k of them are built per full sync, ~10x cheaper.)"""
    service: ObjectKey
    socket: tuple[Frontend, ...] = ()              # what local sockets reach at connect() (sock_lb.c)
    external: tuple[ExternalFrontend, ...] = ()    # what tc serves on the node's devices (nodeport.c)
    local_addresses: frozenset[str] = frozenset()  # this node's endpoints among the external backends: no SNAT
    health_check_node_port: int = 0                # eTP=Local LoadBalancer: kube-proxy's health server port
    local_endpoints: int = 0                       # … and what it reports
    errors: tuple[str, ...] = ()                   # bad input found on the way (nodePort range, slice ports)


def service_view(svc: Service, slices: Iterable[EndpointSlice], node: NodeInfo, northsouth: bool = False) -> ServiceView:
    """The view of one Service from this node; north-south off: the socket frontends of its ClusterIPs only."""
    if type(slices) is not list:
        slices = list(slices)
    errors = ()
    for sl in slices:  # (a loop, not a generator: most Services have one slice and no error)
        if sl.errors:
            errors = tuple(f"EndpointSlice {s.key}: {field}: {msg}" for s in slices for field, msg in s.errors)
            break
    if northsouth and has_external(svc) and not skip_reason(svc):
        return _with_external(svc, slices, node, list(errors))
    return ServiceView(svc.key, tuple(service_frontends(svc, slices, node.name, node.zone)), (), _NONE, 0, 0, errors)


_NONE: frozenset[str] = frozenset()


def _with_external(svc: Service, slices: list[EndpointSlice], node: NodeInfo, errors: list[str]) -> ServiceView:
    affinity = svc.session_affinity_timeout if svc.session_affinity == "ClientIP" else 0
    internal_local = svc.internal_traffic_policy == "Local" and node.name is not None
    cluster_ips: list[tuple[int, int, Frontend]] = []
    external, sock, local_addrs, local_eps = [], [], set(), set()
    on_node = {ep.addresses[0] for sl in slices for ep in sl.endpoints if ep.node_name == node.name}
    for pi, sp in enumerate(svc.ports):
        if sp.protocol not in SUPPORTED_PROTOCOLS:
            continue
        nport = node_port(svc, sp, node, errors)
        for fam in sorted({family(ip) for ip in svc.cluster_ips}):
            eps = _categorize(svc, sp, slices, fam, node)
            for vi, vip in enumerate(svc.cluster_ips):
                if family(vip) == fam:
                    cluster_ips.append((vi, pi, Frontend(vip, sp.port, sp.protocol, svc.key, sp.name,
                                                         eps.local if internal_local else eps.cluster, affinity)))
            ext, s = external_frontends(svc, sp, fam, nport, eps, node, affinity)
            external += ext
            sock += s
            local_eps.update(b.ip for b in eps.local)
            local_addrs.update(b.ip for b in eps.local)
            if svc.external_traffic_policy != "Local":  # the cluster list may hold this node's endpoints too
                local_addrs.update(b.ip for b in eps.cluster if b.ip in on_node)
    socket = [fe for _, _, fe in sorted(cluster_ips, key=lambda t: t[:2])] + sock
    hc = svc.health_check_node_port if svc.type == "LoadBalancer" and svc.external_traffic_policy == "Local" else 0
    return ServiceView(svc.key, tuple(dict.fromkeys(socket)), tuple(external), frozenset(local_addrs), hc,
                       len(local_eps), tuple(errors))


def _categorize(svc: Service, sp: ServicePort, slices: list[EndpointSlice], fam: int, node: NodeInfo) -> PortEndpoints:
    """The endpoints of one port and family under each traffic policy, in one categorize()."""
    atype = "IPv6" if fam == 6 else "IPv4"
    endpoints, ports = [], []
    for sl in slices:
        if sl.address_type == atype and (port := slice_port(sp, sl)) is not None:
            views = sl.endpoints
            endpoints.extend(views)
            ports.extend([port] * len(views))
    sel = categorize(endpoints, Place(node.name or "", node.zone), svc.traffic_distribution,
                     uses_cluster=True, uses_local=True)
    # Kubernetes uses only the first address of an endpoint
    pick = lambda idx: tuple(sorted({Backend(endpoints[i].addresses[0], ports[i], sp.protocol) for i in idx}))  # noqa: E731
    return PortEndpoints(pick(sel.cluster), pick(sel.local), sel.has_any)
