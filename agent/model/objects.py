"""Typed views of the Kubernetes objects nodewire consumes (only the fields it uses)."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field

TCP = "TCP"
UDP = "UDP"
SCTP = "SCTP"

# service.kubernetes.io/service-proxy-name: a Service with this label belongs to another proxy.
PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
# endpointslice.kubernetes.io/managed-by / kubernetes.io/service-name tie a slice to its Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Set by the endpoints controller on EndpointSlices: when the change they carry was triggered.
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True, slots=True)
class ObjectKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    protocol: str
    port: int
    target_port: int | str  # a number, or the name of a container port
    node_port: int = 0


@dataclass(frozen=True, slots=True)
class Service:
    key: ObjectKey
    cluster_ips: tuple[str, ...]  # empty for headless Services
    ports: tuple[ServicePort, ...]
    type: str = "ClusterIP"
    labels: tuple[tuple[str, str], ...] = ()
    external_ips: tuple[str, ...] = ()
    session_affinity: str = "None"
    session_affinity_timeout: int = 10800
    internal_traffic_policy: str = "Cluster"
    external_traffic_policy: str = "Cluster"
    traffic_distribution: str = ""  # spec.trafficDistribution (PreferClose, PreferSameZone, PreferSameNode)
    load_balancer_ips: tuple[str, ...] = ()            # status.loadBalancer.ingress[].ip
    load_balancer_source_ranges: tuple[str, ...] = ()  # spec.loadBalancerSourceRanges (CIDRs)
    health_check_node_port: int = 0                    # spec.healthCheckNodePort (LoadBalancer, eTP=Local)

    @property
    def headless(self) -> bool:
        return not self.cluster_ips

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)


# Endpoint conditions, one byte per endpoint in EndpointSlice.conditions.
READY, SERVING, TERMINATING = 1, 2, 4


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a slice: a view made on demand from the slice's columns, never stored."""

    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    zone_hints: tuple[str, ...] = ()  # hints.forZones[].name
    node_hints: tuple[str, ...] = ()  # hints.forNodes[].name


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int
    protocol: str = TCP


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """An EndpointSlice as columns: a few objects per slice, whatever its number of endpoints.

    Only each endpoint's first address is kept: Kubernetes' consumers use that one only (the API
    documents the others as reserved); targetRef is not kept (nothing reads it). Identical port tuples and node/zone columns are shared between
    slices, and the strings in them are interned.
    """

    key: ObjectKey
    service: str  # the owning Service's name (kubernetes.io/service-name label)
    address_type: str  # IPv4 | IPv6 | FQDN
    addresses: bytes  # packed: 4 (IPv4) or 16 (IPv6) bytes per endpoint; FQDN: names joined by "\n"
    conditions: bytes  # per endpoint: READY | SERVING | TERMINATING
    ports: tuple[EndpointPort, ...]
    node_names: tuple[str, ...] = ()  # per endpoint; () when no endpoint names a node
    zones: tuple[str, ...] = ()       # per endpoint; () when no endpoint names a zone
    zone_hints: tuple[tuple[str, ...], ...] = ()  # per endpoint hints.forZones names; () when none has any
    node_hints: tuple[tuple[str, ...], ...] = ()  # per endpoint hints.forNodes names; () when none has any
    trigger_time: float | None = None  # endpoints.kubernetes.io/last-change-trigger-time (Unix s)
    errors: tuple[tuple[str, str], ...] = ()  # ports left out (no or a bad `port`): (field, message) each (parse.py)

    @property
    def service_key(self) -> ObjectKey:
        return ObjectKey(self.key.namespace, self.service)

    def __len__(self) -> int:
        return len(self.conditions)

    def address(self, i: int) -> str:
        if self.address_type == "IPv4":
            return socket.inet_ntop(socket.AF_INET, self.addresses[4 * i:4 * i + 4])
        if self.address_type == "IPv6":
            return socket.inet_ntop(socket.AF_INET6, self.addresses[16 * i:16 * i + 16])
        return self.addresses.decode().split("\n")[i]

    def node_name(self, i: int) -> str:
        return self.node_names[i] if self.node_names else ""

    def zone(self, i: int) -> str:
        return self.zones[i] if self.zones else ""

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Transient per-endpoint views (for tests and readers that want objects)."""
        c = self.conditions
        zh, nh = self.zone_hints, self.node_hints
        return tuple(Endpoint((self.address(i),), bool(c[i] & READY), bool(c[i] & SERVING),
                              bool(c[i] & TERMINATING), self.node_name(i), self.zone(i),
                              zh[i] if zh else (), nh[i] if nh else ()) for i in range(len(c)))


@dataclass(frozen=True, slots=True)
class Pod:
    key: ObjectKey
    ips: tuple[str, ...]
    node_name: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    uid: str = ""
    owners: tuple[tuple[str, str], ...] = ()  # (kind, name) of metadata.ownerReferences, controller first
    host_network: bool = False  # spec.hostNetwork: its IPs are the node's (telemetry names it by cgroup)


@dataclass(frozen=True, slots=True)
class Node:
    """A Node: cluster-scoped (its key's namespace is ""); the agent reads its own for its zone."""

    key: ObjectKey
    zone: str = ""  # the topology.kubernetes.io/zone label
    addresses: tuple[tuple[str, str], ...] = ()  # (type, address) from status.addresses


@dataclass(frozen=True, slots=True)
class ObjectError:
    """A rejected object: where it came from, what it is, and which field is wrong."""

    source: str  # file path, or "api"
    kind: str
    key: str  # namespace/name, or "?" when the object has no readable name
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.kind} {self.key}: {self.field}: {self.message}"


@dataclass
class Objects:
    """A bag of parsed objects (tests and one-shot loads hand it to ClusterState.replace)."""

    services: dict[ObjectKey, Service] = field(default_factory=dict)
    slices: dict[ObjectKey, EndpointSlice] = field(default_factory=dict)
    pods: dict[ObjectKey, Pod] = field(default_factory=dict)
    nodes: dict[ObjectKey, Node] = field(default_factory=dict)
