"""Hypothesis strategies shared by the fuzz tests: JSON values, and valid objects with one field made wrong."""
from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                    max_leaves=20)
# Values that look like a wrong type to a parser expecting anything in particular.
WRONG = JSON | st.sampled_from([-1, 0, 65536, 2 ** 63, "", "None", "10.96.0.1/33", "::1::", "a" * 300, "10.0.0.1\x00", "\udcff", [], {}, [None],
                                {"": None}, True, 1.5])


def valid_objects() -> list[dict]:
    """One of each kind, with as many fields as the parsers read (so that every field gets fuzzed)."""
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "fz", "namespace": "default", "labels": {"a": "b"},
                        "annotations": {"service.kubernetes.io/topology-mode": "Auto"}},
           "spec": {"type": "LoadBalancer", "clusterIP": "10.96.7.1", "clusterIPs": ["10.96.7.1", "fd00:10:96::7:1"],
                    "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080},
                              {"name": "dns", "port": 53, "targetPort": "dns", "protocol": "UDP"}],
                    "selector": {"app": "fz"}, "externalIPs": ["192.0.2.1"],
                    "sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                    "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Cluster",
                    "trafficDistribution": "PreferClose", "healthCheckNodePort": 31000},
           "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}}
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "fz-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "fz"}},
           "addressType": "IPv4",
           "endpoints": [{"addresses": ["10.244.0.5"], "conditions": {"ready": True, "serving": True, "terminating": False},
                          "nodeName": "n1", "zone": "z1", "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n1"}]},
                          "targetRef": {"kind": "Pod", "name": "p1", "namespace": "default"}}],
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "p1", "namespace": "default", "labels": {"app": "fz"},
                        "annotations": {"nodewire.io/observe": "false"}},
           "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
           "status": {"phase": "Running", "podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}]}}
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}}
    return [svc, eps, pod, node]


def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into obj (dict keys and list indexes), the root excluded."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(paths(v, prefix + (k,)))
    return out


def replace_at(obj: Any, path: tuple, value: Any) -> Any:
    out = copy.deepcopy(obj)
    cur = out
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return out


def dotted(path: tuple) -> str:
    """('spec', 'ports', 1, 'port') → 'spec.ports[1].port', the parsers' own notation."""
    s = ""
    for k in path:
        s += f"[{k}]" if isinstance(k, int) else f".{k}"
    return s.lstrip(".")


@st.composite
def one_wrong_field(draw) -> tuple[dict, tuple, str]:
    """A valid object with the value at one of its paths replaced by a value of any type, the path,
    and the object's kind (before the change: the path may be `kind` itself)."""
    obj = draw(st.sampled_from(valid_objects()))
    path = draw(st.sampled_from(paths(obj)))
    return replace_at(obj, path, draw(WRONG)), path, obj["kind"]
