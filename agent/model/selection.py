"""Which endpoints of one Service port (one IP family) a new connection may use: kube-proxy's rules.

Rules, as kube-proxy applies them (kubernetes pkg/proxy/topology.go: CategorizeEndpoints,
topologyModeFromHints, availableForTopology; condition defaults from pkg/proxy/endpointslicecache.go):
  - Cluster policy: the ready endpoints allowed by the topology mode; if there are none, every
    serving-and-terminating endpoint (KEP-1669), topology no longer applied.
  - Local policy: the ready endpoints on this node; if none, the serving-and-terminating ones on this
    node. Chosen independently of the Cluster list.
  - Topology mode, from the hints of the *ready* endpoints: PreferSameNode when every ready endpoint has
    a node hint and one is for this node; else PreferSameZone when every ready endpoint has a zone hint
    and one is for this node's zone; else none (all endpoints). One endpoint without a hint, or no hint
    for this node/zone, means the hints are ignored.
kube-proxy reads only hints; the EndpointSlice controller turns `trafficDistribution` into hints. A
hand-written slice (the manifest source, no controller) carries none, so when no endpoint of the
Service port has a hint, the hints the controller would write are implied from `trafficDistribution`
(staging/src/k8s.io/endpointslice/trafficdist/trafficdist.go: every ready endpoint gets its own zone,
and for PreferSameNode its own node).

Pure: no I/O. Results are positions in the sequence given, so callers keep their own per-endpoint data
(the backend port comes from the slice, not the endpoint).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

PREFER_CLOSE = "PreferClose"          # the older name of PreferSameZone
PREFER_SAME_ZONE = "PreferSameZone"
PREFER_SAME_NODE = "PreferSameNode"
CLOSE_DISTRIBUTIONS = (PREFER_CLOSE, PREFER_SAME_ZONE, PREFER_SAME_NODE)


class Endpoint(Protocol):
    ready: bool
    serving: bool
    terminating: bool
    node_name: str
    zone: str
    zone_hints: tuple[str, ...]
    node_hints: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Place:
    """Where this node is: its name (for Local policies and node hints) and zone (for zone hints)."""
    node: str = ""
    zone: str = ""


@dataclass(frozen=True, slots=True)
class Selection:
    cluster: tuple[int, ...]  # usable under a Cluster traffic policy
    local: tuple[int, ...]    # usable under a Local traffic policy
    has_any: bool             # a usable endpoint exists somewhere (refuse vs. none-here)


class _Hints:
    """The hints of an endpoint: its own, or those implied by trafficDistribution."""

    def __init__(self, endpoints: Sequence[Endpoint], traffic_distribution: str):
        self.implied = traffic_distribution in CLOSE_DISTRIBUTIONS and not any(
            ep.zone_hints or ep.node_hints for ep in endpoints)
        self.implied_nodes = traffic_distribution == PREFER_SAME_NODE

    def zones(self, ep: Endpoint) -> tuple[str, ...]:
        if not self.implied:
            return ep.zone_hints
        return (ep.zone,) if ep.ready and ep.zone else ()

    def nodes(self, ep: Endpoint) -> tuple[str, ...]:
        if not self.implied:
            return ep.node_hints
        return (ep.node_name,) if self.implied_nodes and ep.ready and ep.node_name else ()


def topology_mode(ready: Sequence[Endpoint], place: Place, hints: _Hints) -> str:
    """"" (no topology), PREFER_SAME_NODE or PREFER_SAME_ZONE for these ready endpoints, with
    kube-proxy's fall-backs."""
    if not ready:
        return ""
    # all() stops at the first endpoint without a hint: Services without hints cost one look each.
    if all(hints.nodes(ep) for ep in ready) and any(place.node in hints.nodes(ep) for ep in ready):
        return PREFER_SAME_NODE
    if all(hints.zones(ep) for ep in ready) and any(place.zone in hints.zones(ep) for ep in ready):
        return PREFER_SAME_ZONE
    return ""


def categorize(endpoints: Sequence[Endpoint], place: Place, traffic_distribution: str = "",
               uses_cluster: bool = True, uses_local: bool = False) -> Selection:
    """The endpoints usable under each traffic policy the caller needs (kube-proxy's CategorizeEndpoints)."""
    cluster: tuple[int, ...] = ()
    local: tuple[int, ...] = ()
    has_any = False
    if uses_cluster:
        ready = tuple([i for i, ep in enumerate(endpoints) if ep.ready])
        first = endpoints[ready[0]] if ready else None
        # Topology needs a hint on every ready endpoint: without one on the first (the common case,
        # and the cheap one at 100k Services) the mode is "" unless trafficDistribution implies hints.
        topology = first is not None and (traffic_distribution in CLOSE_DISTRIBUTIONS
                                          or first.zone_hints or first.node_hints)
        hints = _Hints(endpoints, traffic_distribution) if topology else None
        mode = topology_mode([endpoints[i] for i in ready], place, hints) if topology else ""
        if mode == PREFER_SAME_NODE:
            cluster = tuple(i for i in ready if place.node in hints.nodes(endpoints[i]))
        elif mode == PREFER_SAME_ZONE:
            cluster = tuple(i for i in ready if place.zone in hints.zones(endpoints[i]))
        else:
            cluster = ready
        if not cluster:  # no ready endpoint anywhere (topology never empties a list that had some)
            cluster = tuple(i for i, ep in enumerate(endpoints) if ep.serving and ep.terminating)
        has_any = bool(cluster)
    if uses_local:
        here = [i for i, ep in enumerate(endpoints) if place.node and ep.node_name == place.node]
        local = tuple(i for i in here if endpoints[i].ready) or tuple(
            i for i in here if endpoints[i].serving and endpoints[i].terminating)
        has_any = has_any or any(ep.ready or (ep.serving and ep.terminating) for ep in endpoints)
    return Selection(cluster, local, has_any)


def internal_endpoints(endpoints: Sequence[Endpoint], place: Place, internal_traffic_policy: str,
                       traffic_distribution: str = "") -> tuple[int, ...]:
    """Endpoints for traffic to a ClusterIP from this node (the socket path)."""
    local = internal_traffic_policy == "Local"
    if not local and traffic_distribution not in CLOSE_DISTRIBUTIONS:
        # The common case, cheaply (100k Services are computed at start-up): with no hint on the first
        # ready endpoint no topology mode applies, and the ready endpoints are the answer.
        ready = [i for i, ep in enumerate(endpoints) if ep.ready]
        if ready and not (endpoints[ready[0]].zone_hints or endpoints[ready[0]].node_hints):
            return tuple(ready)
    sel = categorize(endpoints, place, traffic_distribution, uses_cluster=not local, uses_local=local)
    return sel.local if local else sel.cluster


def external_endpoints(endpoints: Sequence[Endpoint], place: Place, external_traffic_policy: str,
                       traffic_distribution: str = "") -> tuple[int, ...]:
    """Endpoints for traffic arriving from outside the node (NodePort, ExternalIPs, LoadBalancer IPs)."""
    local = external_traffic_policy == "Local"
    sel = categorize(endpoints, place, traffic_distribution, uses_cluster=not local, uses_local=local)
    return sel.local if local else sel.cluster
