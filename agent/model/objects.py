"""Typed views of the Kubernetes objects nodewire consumes (only the fields it uses)."""
from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class Endpoint:
    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    zone: str = ""
    target: str = ""  # "namespace/pod" of the targetRef, when it is a Pod
    zone_hints: tuple[str, ...] = ()  # hints.forZones[].name
    node_hints: tuple[str, ...] = ()  # hints.forNodes[].name


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int
    protocol: str = TCP


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    key: ObjectKey
    service: str  # the owning Service's name (kubernetes.io/service-name label)
    address_type: str  # IPv4 | IPv6 | FQDN
    endpoints: tuple[Endpoint, ...]
    ports: tuple[EndpointPort, ...]
    trigger_time: float | None = None  # endpoints.kubernetes.io/last-change-trigger-time (Unix s)

    @property
    def service_key(self) -> ObjectKey:
        return ObjectKey(self.key.namespace, self.service)


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
    """A bag of parsed objects, as a source produces them."""

    services: dict[ObjectKey, Service] = field(default_factory=dict)
    slices: dict[ObjectKey, EndpointSlice] = field(default_factory=dict)
    pods: dict[ObjectKey, Pod] = field(default_factory=dict)
    nodes: dict[ObjectKey, Node] = field(default_factory=dict)
