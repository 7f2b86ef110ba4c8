"""A fast path for JSON manifests of Services and EndpointSlices: msgspec decodes the bytes straight
into typed structs (no dict per JSON object), and a short builder turns each into the same typed object
parse.py would make.

It only ever says yes or "don't know": any shape it does not handle exactly as parse.py does (another
kind, a null, a wrong type, a field it does not build, a value parse.py would reject) makes `documents`
return None, and the caller reads the file the general way, which names the field that is wrong. So
the objects and every error message are parse.py's by construction; tests/test_decode.py checks that
both paths build equal objects. Measured on 1,000 Services × 5 endpoints per file: msgspec typed
decode 8 ms, json.loads 24 ms, orjson 17 ms (dicts still to be parsed) — hence msgspec.
"""
from __future__ import annotations

import socket
from sys import intern

import msgspec
from msgspec import UNSET, Struct, UnsetType

from .objects import (READY, SERVICE_NAME_LABEL, SERVING, TERMINATING, EndpointPort, EndpointSlice, ObjectKey,
                      Service, ServicePort)
from .parse import _FAMILIES, _SHARED_MAX, PROTOCOLS, _column, _trigger_time, shared

# Every optional field is `T | UnsetType`: a JSON null is a validation error here (parse.py treats
# some nulls as absent and rejects others; the general path sorts that out).


class _Meta(Struct):
    name: str
    namespace: str | UnsetType = UNSET
    labels: dict[str, str] | UnsetType = UNSET
    annotations: dict | UnsetType = UNSET


class _SvcPort(Struct):
    port: int
    name: str = ""
    protocol: str = "TCP"
    targetPort: int | str | UnsetType = UNSET
    nodePort: int = 0


class _Spec(Struct):
    type: str = "ClusterIP"
    clusterIP: str = ""
    clusterIPs: list[str] | UnsetType = UNSET
    ports: list[_SvcPort] = []
    externalIPs: list[str] = []
    sessionAffinity: str = "None"
    internalTrafficPolicy: str = "Cluster"
    externalTrafficPolicy: str = "Cluster"
    trafficDistribution: str = ""
    healthCheckNodePort: int = 0
    sessionAffinityConfig: dict | UnsetType = UNSET        # not built here: the general path
    loadBalancerSourceRanges: list | UnsetType = UNSET     # not built here: the general path


class _LB(Struct):
    ingress: list | UnsetType = UNSET  # not built here: the general path


class _Status(Struct):
    loadBalancer: _LB | UnsetType = UNSET


class _Service(Struct, tag="Service", tag_field="kind"):
    metadata: _Meta
    spec: _Spec
    status: _Status | UnsetType = UNSET


class _Cond(Struct):
    ready: bool = True
    serving: bool = True
    terminating: bool = False


class _Name(Struct):
    name: str


class _Hints(Struct):
    forZones: list[_Name] = []
    forNodes: list[_Name] = []


class _Endpoint(Struct):
    addresses: list[str]
    conditions: _Cond | UnsetType = UNSET
    nodeName: str = ""
    zone: str = ""
    hints: _Hints | UnsetType = UNSET


class _EpPort(Struct):
    port: int
    name: str = ""
    protocol: str = "TCP"


class _Slice(Struct, tag="EndpointSlice", tag_field="kind"):
    metadata: _Meta
    addressType: str
    endpoints: list[_Endpoint] = []
    ports: list[_EpPort] = []


class _List(Struct, tag="List", tag_field="kind"):
    items: list[_Service | _Slice] = []


_DECODER = msgspec.json.Decoder(_List | _Service | _Slice)


_SERVICE_PORTS: dict[tuple, tuple[ServicePort, ...]] = {}  # raw spec.ports values → the shared tuple
_SLICE_PORTS: dict[tuple, tuple[EndpointPort, ...]] = {}


class _Unsure(Exception):
    """The fast path does not build this shape: the general path reads the file."""


def documents(data: bytes | str) -> list | None:
    """The file's Services and EndpointSlices, built as parse.py builds them; None when the general
    path must read it (see the module's docstring)."""
    try:
        doc = _DECODER.decode(data)
    except Exception:  # noqa: BLE001 - not ours to judge: the general path names what is wrong
        return None
    items = doc.items if isinstance(doc, _List) else [doc]
    try:
        return [_service(i) if type(i) is _Service else _slice(i) for i in items]
    except Exception:  # noqa: BLE001 - _Unsure, a bad address (OSError/ValueError): the general path
        return None


def _key(meta: _Meta) -> ObjectKey:
    ns = "default" if meta.namespace is UNSET else meta.namespace
    if not meta.name or not ns:
        raise _Unsure
    return ObjectKey(intern(ns), intern(meta.name))


def _labels(meta: _Meta) -> tuple[tuple[str, str], ...]:
    labels = meta.labels
    return shared(tuple(sorted((intern(k), v) for k, v in labels.items()))) if labels else ()


def _ip(value: str) -> str:
    family = socket.AF_INET6 if ":" in value else socket.AF_INET
    return socket.inet_ntop(family, socket.inet_pton(family, value))  # OSError/ValueError: unsure


def _service(s: _Service) -> Service:
    spec = s.spec
    if (spec.sessionAffinityConfig is not UNSET or spec.loadBalancerSourceRanges is not UNSET
            or s.status is not UNSET and s.status.loadBalancer is not UNSET and s.status.loadBalancer.ingress is not UNSET
            or spec.type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
            or spec.sessionAffinity not in ("None", "ClientIP")
            or spec.internalTrafficPolicy not in ("Cluster", "Local")
            or spec.externalTrafficPolicy not in ("Cluster", "Local")
            or not 0 <= spec.healthCheckNodePort <= 65535):
        raise _Unsure
    key = _key(s.metadata)
    cluster_ips = list(spec.clusterIPs) if spec.clusterIPs is not UNSET else []
    if spec.clusterIP and not cluster_ips:
        cluster_ips = [spec.clusterIP]
    if spec.clusterIP and cluster_ips[0] != spec.clusterIP:
        raise _Unsure
    if cluster_ips == ["None"] or spec.type == "ExternalName":
        ips: tuple[str, ...] = ()
    else:
        ips = tuple(_ip(v) for v in cluster_ips)
        if len({":" in a for a in ips}) != len(ips):
            raise _Unsure
    return Service(
        key=key, cluster_ips=ips, ports=_service_ports(spec.ports), type=spec.type,
        labels=_labels(s.metadata), external_ips=tuple(_ip(v) for v in spec.externalIPs),
        session_affinity=spec.sessionAffinity, internal_traffic_policy=spec.internalTrafficPolicy,
        external_traffic_policy=spec.externalTrafficPolicy, traffic_distribution=intern(spec.trafficDistribution),
        health_check_node_port=spec.healthCheckNodePort,
    )


def _service_ports(raw_ports: list[_SvcPort]) -> tuple[ServicePort, ...]:
    """spec.ports as parse.py builds them, one shared tuple per distinct list (see _slice_ports)."""
    raw = tuple((p.name, p.protocol, p.port, p.targetPort, p.nodePort) for p in raw_ports)
    ports = _SERVICE_PORTS.get(raw)
    if ports is not None:
        return ports
    out = []
    seen_names: set[str] = set()
    seen_ports: set[tuple[int, str]] = set()
    for name, proto, port, tp, node_port in raw:
        name = intern(name)
        if (not name and len(raw) > 1 or name in seen_names or proto not in PROTOCOLS or not 1 <= port <= 65535
                or (port, proto) in seen_ports or not 0 <= node_port <= 65535):
            raise _Unsure
        seen_names.add(name)
        seen_ports.add((port, proto))
        tp = port if tp is UNSET else tp
        if isinstance(tp, str) and tp.isdigit():
            tp = int(tp)
        if isinstance(tp, int) and not 1 <= tp <= 65535:
            raise _Unsure
        out.append(ServicePort(name, intern(proto), port, tp or port, node_port))
    if len(_SERVICE_PORTS) >= _SHARED_MAX:
        _SERVICE_PORTS.clear()
    return _SERVICE_PORTS.setdefault(raw, shared(tuple(out)))


def _slice(s: _Slice) -> EndpointSlice:
    key = _key(s.metadata)
    service = None if s.metadata.labels is UNSET else s.metadata.labels.get(SERVICE_NAME_LABEL)
    family = _FAMILIES.get(s.addressType, -1)
    if not service or family is None or family == -1:  # FQDN slices: the general path
        raise _Unsure
    pton = socket.inet_pton
    addrs, conds, nodes, zones, hinted = [], bytearray(), [], [], []
    for e in s.endpoints:
        a = e.addresses
        if not a:
            raise _Unsure
        addrs.append(pton(family, a[0]))
        for other in a[1:]:  # each is checked, the first is kept (see EndpointSlice)
            pton(family, other)
        c = e.conditions
        conds.append(READY | SERVING if c is UNSET
                     else c.ready * READY | c.serving * SERVING | c.terminating * TERMINATING)
        nodes.append(e.nodeName)
        zones.append(e.zone)
        hinted.append(e.hints)
    nodes_col = _column([intern(n) for n in nodes]) if any(nodes) else ()
    zones_col = _column([intern(z) for z in zones]) if any(zones) else ()
    zone_hints = node_hints = ()
    if any(h is not UNSET for h in hinted):
        zone_hints = _column([() if h is UNSET else shared(_hint_names(h.forZones)) for h in hinted])
        node_hints = _column([() if h is UNSET else shared(_hint_names(h.forNodes)) for h in hinted])
    raw_ports = tuple((p.name, p.port, p.protocol) for p in s.ports)
    ports = _SLICE_PORTS.get(raw_ports)
    if ports is None:
        ports = _slice_ports(raw_ports)
    meta = s.metadata
    return EndpointSlice(key, intern(service), intern(s.addressType), b"".join(addrs), bytes(conds),
                         ports, nodes_col, zones_col, zone_hints, node_hints,
                         _trigger_time(None if meta.annotations is UNSET else meta.annotations), ())


def _slice_ports(raw: tuple) -> tuple[EndpointPort, ...]:
    """The slice's ports, one shared tuple per distinct list (cached by the raw values: hashing those is
    C work, hashing the dataclasses is not)."""
    ports, seen = [], set()
    for name, port, protocol in raw:
        name = intern(name)
        if name in seen or protocol not in PROTOCOLS or not 1 <= port <= 65535:
            raise _Unsure  # a duplicate, an unknown protocol, a port parse.py drops with an error
        seen.add(name)
        ports.append(EndpointPort(name, port, intern(protocol)))
    if len(_SLICE_PORTS) >= _SHARED_MAX:
        _SLICE_PORTS.clear()
    return _SLICE_PORTS.setdefault(raw, shared(tuple(ports)))


def _hint_names(names: list[_Name]) -> tuple[str, ...]:
    if not all(n.name for n in names):
        raise _Unsure
    return tuple(intern(n.name) for n in names)
