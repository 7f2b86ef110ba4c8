"""Kubernetes JSON/YAML dicts → typed objects, with errors that name the object and the field.

Validation covers what the datapath depends on (types, ranges, protocols, IP syntax, duplicate ports);
it is deliberately stricter than "schema-valid", because an API server or a hand-written manifest can
still carry semantic errors (port 0, duplicate port names) that would corrupt a map entry.
"""
from __future__ import annotations

import ipaddress
import socket
import sys
from datetime import datetime
from sys import intern
from typing import Any

from .objects import (
    READY, SCTP, SERVICE_NAME_LABEL, SERVING, TCP, TERMINATING, TRIGGER_TIME_ANNOTATION, UDP, ZONE_LABEL,
    EndpointPort, EndpointSlice, Node, ObjectError,
    ObjectKey, Pod, Service, ServicePort,
)

PROTOCOLS = (TCP, UDP, SCTP)
_FAMILIES = {"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6, "FQDN": None}
_SHARED: dict[tuple, tuple] = {}
_SHARED_MAX = 1 << 16


def shared(value: tuple) -> tuple:
    """One copy of equal tuples (the ports of 100k Services are usually one tuple; so are the
    node-name columns of the slices on one node). Bounded: a cache that grows past its size starts over."""
    if len(_SHARED) >= _SHARED_MAX:
        _SHARED.clear()
    return _SHARED.setdefault(value, value)


class InvalidObject(Exception):
    def __init__(self, kind: str, key: str, field: str, message: str):
        super().__init__(f"{kind} {key}: {field}: {message}")
        self.kind, self.key, self.field, self.message = kind, key, field, message

    def as_error(self, source: str) -> ObjectError:
        return ObjectError(source, self.kind, self.key, self.field, self.message)


class _Reader:
    """Typed field access that raises InvalidObject with the field's path."""

    def __init__(self, kind: str, obj: Any):
        self.kind = kind
        self.key = "?"
        if not isinstance(obj, dict):
            raise InvalidObject(kind, "?", "", f"expected an object, got {type(obj).__name__}")
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            raise InvalidObject(kind, "?", "metadata", "missing or not an object")
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidObject(kind, "?", "metadata.name", "missing or not a string")
        ns = meta.get("namespace", "default")
        if not isinstance(ns, str) or not ns:
            raise InvalidObject(kind, name, "metadata.namespace", "not a string")
        self.object_key = ObjectKey(sys.intern(ns), sys.intern(name))
        self.key = str(self.object_key)

    def fail(self, field: str, message: str) -> InvalidObject:
        return InvalidObject(self.kind, self.key, field, message)

    def get(self, d: dict, name: str, path: str, typ, default=None, required=False):
        if not isinstance(d, dict):
            raise self.fail(path.rsplit(".", 1)[0], "not an object")
        v = d.get(name)
        if v is None:
            if required:
                raise self.fail(path, "required")
            return default
        if type(v) is typ:
            return v
        if typ is int and isinstance(v, bool) or not isinstance(v, typ):
            want = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise self.fail(path, f"expected {want}, got {type(v).__name__} {v!r}")
        return v

    def word(self, d: dict, name: str, path: str, default: str = "") -> str:
        """A string that repeats across objects (names of ports, nodes, zones): one shared copy.
        The JSON decoder makes a new string per occurrence; at 100k Services that adds up."""
        return sys.intern(self.get(d, name, path, str, default=default))

    def port(self, d: dict, name: str, path: str, required=True, allow_zero=False) -> int:
        v = self.get(d, name, path, int, required=required, default=0)
        lo = 0 if allow_zero else 1
        if not lo <= v <= 65535 and (v or required):
            raise self.fail(path, f"{v} out of range (1-65535)")
        return v

    def protocol(self, d: dict, path: str) -> str:
        p = self.get(d, "protocol", path, str, default=TCP)
        if p not in PROTOCOLS:
            raise self.fail(path, f"unknown protocol {p!r} (expected TCP, UDP or SCTP)")
        return sys.intern(p)

    def ip(self, value: Any, path: str) -> str:
        """The address in canonical text form (inet_pton/ntop: the C parser, ~20x faster than ipaddress)."""
        if not isinstance(value, str):
            raise self.fail(path, f"expected an IP address string, got {value!r}")
        family = socket.AF_INET6 if ":" in value else socket.AF_INET
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, value))
        except (OSError, ValueError):  # ValueError: a NUL or a lone surrogate (both valid JSON escapes)
            raise self.fail(path, f"{value!r} is not a valid IP address") from None

    def packed_ip(self, value: Any, family: int | None, atype: str, path: str) -> bytes | str:
        """An endpoint address as bytes of the slice's family (a str for FQDN slices)."""
        if not isinstance(value, str):
            raise self.fail(path, f"expected an address string, got {value!r}")
        if family is None:
            return value
        try:
            return socket.inet_pton(family, value)
        except (OSError, ValueError):  # ValueError: a NUL or a lone surrogate (both valid JSON escapes)
            other = socket.AF_INET6 if family == socket.AF_INET else socket.AF_INET
            try:
                socket.inet_pton(other, value)
            except (OSError, ValueError):
                raise self.fail(path, f"{value!r} is not a valid IP address") from None
            raise self.fail(path, f"{value} is not an {atype} address") from None

    def labels(self, meta: dict, name: str = "labels") -> tuple[tuple[str, str], ...]:
        labels = self.get(meta, name, f"metadata.{name}", dict, default={})
        return shared(tuple(sorted((sys.intern(str(k)), str(v)) for k, v in labels.items()))) if labels else ()


def _kind_check(r: _Reader, obj: dict, kind: str) -> None:
    if obj.get("kind", kind) != kind:
        raise r.fail("kind", f"expected {kind}, got {obj.get('kind')!r}")


def parse_service(obj: Any) -> Service:
    r = _Reader("Service", obj)
    _kind_check(r, obj, "Service")
    meta = obj["metadata"]
    spec = r.get(obj, "spec", "spec", dict, required=True)
    svc_type = r.get(spec, "type", "spec.type", str, default="ClusterIP")
    if svc_type not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise r.fail("spec.type", f"unknown type {svc_type!r}")

    cluster_ip = r.get(spec, "clusterIP", "spec.clusterIP", str, default="")
    cluster_ips = list(r.get(spec, "clusterIPs", "spec.clusterIPs", list, default=[]))
    if cluster_ip and not cluster_ips:
        cluster_ips = [cluster_ip]
    if cluster_ip and cluster_ips and cluster_ips[0] != cluster_ip:
        raise r.fail("spec.clusterIPs[0]", f"{cluster_ips[0]!r} must equal spec.clusterIP {cluster_ip!r}")
    if cluster_ips == ["None"] or svc_type == "ExternalName":
        ips: tuple[str, ...] = ()
    else:
        ips = tuple(r.ip(v, f"spec.clusterIPs[{i}]") for i, v in enumerate(cluster_ips))
        if len({":" in a for a in ips}) != len(ips):
            raise r.fail("spec.clusterIPs", "at most one address per IP family")

    ports = _service_ports(r, spec)
    external_ips = tuple(
        r.ip(v, f"spec.externalIPs[{i}]")
        for i, v in enumerate(r.get(spec, "externalIPs", "spec.externalIPs", list, default=[]))
    )
    affinity = r.get(spec, "sessionAffinity", "spec.sessionAffinity", str, default="None")
    if affinity not in ("None", "ClientIP"):
        raise r.fail("spec.sessionAffinity", f"unknown value {affinity!r}")
    timeout = 10800
    cfg = spec.get("sessionAffinityConfig")
    if isinstance(cfg, dict) and isinstance(cfg.get("clientIP"), dict):
        timeout = r.get(cfg["clientIP"], "timeoutSeconds", "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        int, default=10800)
        if not 1 <= timeout <= 86400:
            raise r.fail("spec.sessionAffinityConfig.clientIP.timeoutSeconds", f"{timeout} out of range (1-86400)")
    itp = r.get(spec, "internalTrafficPolicy", "spec.internalTrafficPolicy", str, default="Cluster")
    etp = r.get(spec, "externalTrafficPolicy", "spec.externalTrafficPolicy", str, default="Cluster")
    for val, path in ((itp, "spec.internalTrafficPolicy"), (etp, "spec.externalTrafficPolicy")):
        if val not in ("Cluster", "Local"):
            raise r.fail(path, f"unknown value {val!r} (expected Cluster or Local)")
    # Any value is kept: kube-proxy never reads the field (it follows the hints the controller writes),
    # and a value newer than this agent must not take the Service down; selection acts on known ones.
    distribution = r.word(spec, "trafficDistribution", "spec.trafficDistribution")
    lb_ips, ranges, hc_port = _load_balancer(r, obj, spec)
    return Service(
        key=r.object_key, cluster_ips=ips, ports=shared(tuple(ports)), type=svc_type, labels=r.labels(meta),
        external_ips=external_ips, session_affinity=affinity, session_affinity_timeout=timeout,
        internal_traffic_policy=itp, external_traffic_policy=etp, traffic_distribution=distribution,
        load_balancer_ips=lb_ips, load_balancer_source_ranges=ranges, health_check_node_port=hc_port,
    )


def _service_ports(r: _Reader, spec: dict) -> list[ServicePort]:
    """spec.ports: names unique (required with several), (port, protocol) unique, targetPort a number or a name."""
    ports = []
    seen_names: set[str] = set()
    seen_ports: set[tuple[int, str]] = set()
    raw_ports = r.get(spec, "ports", "spec.ports", list, default=[])
    for i, p in enumerate(raw_ports):
        path = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            raise r.fail(path, "not an object")
        name = r.word(p, "name", f"{path}.name")
        if not name and len(raw_ports) > 1:
            raise r.fail(f"{path}.name", "required when a Service has more than one port")
        if name in seen_names:
            raise r.fail(f"{path}.name", f"duplicate port name {name!r}")
        seen_names.add(name)
        proto = r.protocol(p, f"{path}.protocol")
        port = r.port(p, "port", f"{path}.port")
        if (port, proto) in seen_ports:
            raise r.fail(f"{path}.port", f"duplicate port {port}/{proto}")
        seen_ports.add((port, proto))
        tp = p.get("targetPort", port)
        if isinstance(tp, bool) or not isinstance(tp, (int, str)):
            raise r.fail(f"{path}.targetPort", f"expected a number or a port name, got {tp!r}")
        if isinstance(tp, str) and tp.isdigit():
            tp = int(tp)
        if isinstance(tp, int) and not 1 <= tp <= 65535:
            raise r.fail(f"{path}.targetPort", f"{tp} out of range (1-65535)")
        if isinstance(tp, str) and not tp:
            tp = port
        node_port = r.port(p, "nodePort", f"{path}.nodePort", required=False, allow_zero=True)
        ports.append(ServicePort(name, proto, port, tp, node_port))
    return ports


def _load_balancer(r: _Reader, obj: dict, spec: dict) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """status.loadBalancer.ingress[].ip (hostname-only entries carry no address: skipped),
    spec.loadBalancerSourceRanges as canonical CIDRs, spec.healthCheckNodePort."""
    status = r.get(obj, "status", "status", dict, default={})
    lb = r.get(status, "loadBalancer", "status.loadBalancer", dict, default={})
    ips = []
    for i, ing in enumerate(r.get(lb, "ingress", "status.loadBalancer.ingress", list, default=[])):
        path = f"status.loadBalancer.ingress[{i}]"
        if not isinstance(ing, dict):
            raise r.fail(path, "not an object")
        if ing.get("ip") is not None:
            ips.append(r.ip(ing["ip"], f"{path}.ip"))
    ranges = []
    for i, c in enumerate(r.get(spec, "loadBalancerSourceRanges", "spec.loadBalancerSourceRanges", list, default=[])):
        try:
            ranges.append(str(ipaddress.ip_network(str(c).strip(), strict=False)))
        except ValueError:
            raise r.fail(f"spec.loadBalancerSourceRanges[{i}]", f"{c!r} is not a CIDR") from None
    hc = r.port(spec, "healthCheckNodePort", "spec.healthCheckNodePort", required=False, allow_zero=True)
    return tuple(ips), tuple(ranges), hc


def parse_endpoint_slice(obj: Any) -> EndpointSlice:
    r = _Reader("EndpointSlice", obj)
    _kind_check(r, obj, "EndpointSlice")
    meta = obj["metadata"]
    labels = dict(r.labels(meta))
    service = labels.get(SERVICE_NAME_LABEL)
    if not service:
        raise r.fail(f"metadata.labels[{SERVICE_NAME_LABEL}]", "required: names the owning Service")
    atype = sys.intern(r.get(obj, "addressType", "addressType", str, required=True))
    family = _FAMILIES.get(atype, -1)
    if family == -1:
        raise r.fail("addressType", f"unknown address type {atype!r} (expected IPv4, IPv6 or FQDN)")

    addrs: list = []
    conds = bytearray()
    nodes: list[str] = []
    zones: list[str] = []
    zone_hints: list[tuple[str, ...]] = []
    node_hints: list[tuple[str, ...]] = []
    pton = socket.inet_pton
    for i, e in enumerate(r.get(obj, "endpoints", "endpoints", list, default=[])):
        # The common shapes are checked inline (this loop runs 500k times for 100k Services × 5);
        # anything else takes the general path, which names the field that is wrong.
        if type(e) is not dict:
            raise r.fail(f"endpoints[{i}]", "not an object")
        raw = e.get("addresses")
        if type(raw) is not list or not raw:
            r.get(e, "addresses", f"endpoints[{i}].addresses", list, required=True)
            raise r.fail(f"endpoints[{i}].addresses", "must hold at least one address")
        try:
            first = pton(family, raw[0]) if family is not None and len(raw) == 1 else None
        except (OSError, TypeError, ValueError):
            first = None
        if first is None:  # every address is checked; only the first is kept (see EndpointSlice)
            first = [r.packed_ip(a, family, atype, f"endpoints[{i}].addresses[{j}]") for j, a in enumerate(raw)][0]
        addrs.append(first)
        cond = e.get("conditions")
        if cond is None:
            conds.append(READY | SERVING)
        else:
            conds.append(_conditions(r, cond, f"endpoints[{i}].conditions"))
        node, zone = e.get("nodeName"), e.get("zone")
        nodes.append("" if node is None else intern(node) if type(node) is str
                     else r.word(e, "nodeName", f"endpoints[{i}].nodeName"))
        zones.append("" if zone is None else intern(zone) if type(zone) is str
                     else r.word(e, "zone", f"endpoints[{i}].zone"))
        hints = e.get("hints")
        if hints is None:
            zone_hints.append(())
            node_hints.append(())
        else:
            zone_hints.append(shared(_hint_names(r, e, "forZones", f"endpoints[{i}]")))
            node_hints.append(shared(_hint_names(r, e, "forNodes", f"endpoints[{i}]")))

    ports, dropped = _slice_ports(r, obj)
    packed_addrs = "\n".join(addrs).encode() if family is None else b"".join(addrs)
    return EndpointSlice(r.object_key, sys.intern(service), atype, packed_addrs, bytes(conds), shared(tuple(ports)),
                         _column(nodes), _column(zones), _column(zone_hints), _column(node_hints),
                         _trigger_time(meta.get("annotations")), dropped)


def _slice_ports(r: _Reader, obj: dict) -> tuple[list[EndpointPort], tuple[tuple[str, str], ...]]:
    """The slice's ports, and an error per port left out. A port without `port` (or with one out of
    range) is kept with port 0, which no Service port matches (frontends.slice_port): only that port of
    the slice is dropped and its error goes to the source, which names it as an object error; the
    slice's other ports stay, as kube-proxy ignores an invalid endpoint port
    (pkg/proxy/endpointslicecache.go) instead of the whole slice."""
    ports, dropped = [], []
    seen: set[str] = set()
    for i, p in enumerate(r.get(obj, "ports", "ports", list, default=[]) or []):
        path = f"ports[{i}]"
        if not isinstance(p, dict):
            raise r.fail(path, "not an object")
        name = r.word(p, "name", f"{path}.name")
        if name in seen:
            raise r.fail(f"{path}.name", f"duplicate port name {name!r}")
        seen.add(name)
        protocol = r.protocol(p, f"{path}.protocol")
        try:
            port = r.port(p, "port", f"{path}.port")
        except InvalidObject as e:
            dropped.append((e.field, f"{e.message}; this port of the slice is ignored"))
            port = 0
        ports.append(EndpointPort(name, port, protocol))
    return ports, tuple(dropped)


def _conditions(r: _Reader, cond: Any, path: str) -> int:
    """The READY | SERVING | TERMINATING bits of one endpoint's conditions. A nil "ready" or "serving"
    means true, a nil "terminating" false (kube-proxy's pkg/proxy/endpointslicecache.go reads them so)."""
    if type(cond) is not dict:
        raise r.fail(path, f"expected dict, got {type(cond).__name__} {cond!r}")
    ready, serving, terminating = cond.get("ready", True), cond.get("serving", True), cond.get("terminating", False)
    if type(ready) is bool and type(serving) is bool and type(terminating) is bool:
        return ready * READY | serving * SERVING | terminating * TERMINATING
    ready = r.get(cond, "ready", f"{path}.ready", bool, default=True)
    serving = r.get(cond, "serving", f"{path}.serving", bool, default=True)
    terminating = r.get(cond, "terminating", f"{path}.terminating", bool, default=False)
    return ready * READY | serving * SERVING | terminating * TERMINATING


def _column(values: list) -> tuple:
    """A per-endpoint column: () when every value is empty, else one shared tuple."""
    return shared(tuple(values)) if any(values) else ()


def _trigger_time(annotations: Any) -> float | None:
    """The trigger-time annotation's RFC 3339 time as Unix seconds. Telemetry only (programming
    latency): an unreadable value is ignored rather than costing the slice its place in the datapath."""
    value = annotations.get(TRIGGER_TIME_ANNOTATION) if type(annotations) is dict else None
    if not value or type(value) is not str:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _hint_names(r: _Reader, endpoint: dict, which: str, path: str) -> tuple[str, ...]:
    """hints.forZones[].name or hints.forNodes[].name of one endpoint (topology-aware routing)."""
    hints = r.get(endpoint, "hints", f"{path}.hints", dict, default={})
    names = []
    for i, h in enumerate(r.get(hints, which, f"{path}.hints.{which}", list, default=[])):
        name = r.word(h, "name", f"{path}.hints.{which}[{i}].name")
        if not name:
            raise r.fail(f"{path}.hints.{which}[{i}].name", "required")
        names.append(name)
    return tuple(names)


def parse_pod(obj: Any) -> Pod:
    r = _Reader("Pod", obj)
    _kind_check(r, obj, "Pod")
    meta = obj["metadata"]
    spec = r.get(obj, "spec", "spec", dict, default={})
    status = r.get(obj, "status", "status", dict, default={})
    ips = [p.get("ip") for p in r.get(status, "podIPs", "status.podIPs", list, default=[]) if isinstance(p, dict)]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    return Pod(
        key=r.object_key,
        ips=tuple(r.ip(a, f"status.podIPs[{i}].ip") for i, a in enumerate(ips)),
        node_name=r.get(spec, "nodeName", "spec.nodeName", str, default=""),
        labels=r.labels(meta), annotations=r.labels(meta, "annotations"),
        uid=str(meta.get("uid", "")),
        owners=_owners(meta),
        host_network=r.get(spec, "hostNetwork", "spec.hostNetwork", bool, default=False),
    )


def _owners(meta: dict) -> tuple[tuple[str, str], ...]:
    """(kind, name) of each ownerReference, the controller first (workload identity, agent/observe)."""
    refs = [o for o in meta.get("ownerReferences") or () if isinstance(o, dict) and o.get("kind") and o.get("name")]
    refs.sort(key=lambda o: not o.get("controller"))
    return tuple((str(o["kind"]), str(o["name"])) for o in refs)


def parse_node(obj: Any) -> Node:
    r = _Reader("Node", obj)
    _kind_check(r, obj, "Node")
    labels = dict(r.labels(obj["metadata"]))
    status = r.get(obj, "status", "status", dict, default={})
    addrs = []
    for i, a in enumerate(r.get(status, "addresses", "status.addresses", list, default=[])):
        path = f"status.addresses[{i}]"
        addrs.append((r.word(a, "type", f"{path}.type"), r.get(a, "address", f"{path}.address", str, default="")))
    return Node(ObjectKey("", r.object_key.name), sys.intern(labels.get(ZONE_LABEL, "")), tuple(addrs))


PARSERS = {"Service": parse_service, "EndpointSlice": parse_endpoint_slice, "Pod": parse_pod, "Node": parse_node}
