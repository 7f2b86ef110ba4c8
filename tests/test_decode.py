"""The fast JSON path (agent/model/decode.py) builds exactly the objects parse.py builds, and hands
every shape it does not build the same way to the general path (None), so errors stay parse.py's."""
import copy
import json
from pathlib import Path

import pytest

from agent.model import decode
from agent.sources.manifests import _documents, _expand, parse_file

SVC = {"apiVersion": "v1", "kind": "Service",
       "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web", "tier": "front"}},
       "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::a"],
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                          {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "5353"},
                          {"name": "alt", "port": 81, "targetPort": ""}],
                "externalIPs": ["192.0.2.7"], "sessionAffinity": "ClientIP", "internalTrafficPolicy": "Local",
                "externalTrafficPolicy": "Local", "trafficDistribution": "PreferClose", "healthCheckNodePort": 31000},
       "status": {"loadBalancer": {}}}
SLICE = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"},
                      "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-02T03:04:05Z"}},
         "addressType": "IPv4",
         "ports": [{"name": "http", "port": 8080}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
         "endpoints": [
             {"addresses": ["10.1.0.1"], "conditions": {"ready": True}, "nodeName": "n1", "zone": "z1",
              "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "n1"}]}},
             {"addresses": ["10.1.0.2", "10.1.0.3"], "conditions": {"ready": False, "serving": True, "terminating": True}},
             {"addresses": ["10.1.0.4"], "nodeName": "n2"}]}
SLICE6 = {"kind": "EndpointSlice", "metadata": {"name": "v6", "labels": {"kubernetes.io/service-name": "web"}},
          "addressType": "IPv6", "ports": [{"port": 80}], "endpoints": [{"addresses": ["FD00::0001"]}]}
HEADLESS = {"kind": "Service", "metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}}


def _general(text: str) -> list:
    return [i for d in _documents(Path("x.json"), text) for i in _expand(d)]


@pytest.mark.parametrize("doc", [
    {"kind": "List", "items": [SVC, SLICE, SLICE6, HEADLESS]}, SVC, SLICE,
    {"kind": "List", "items": []}, {"kind": "Service", "metadata": {"name": "e"}, "spec": {"type": "ExternalName"}},
])
def test_fast_path_builds_what_the_general_path_builds(doc):
    text = json.dumps(doc)
    fast = decode.documents(text)
    assert fast is not None
    assert fast == _general(text)


def _with(base: dict, path: str, value) -> dict:
    doc = copy.deepcopy(base)
    *parents, last = path.split(".")
    d = doc
    for p in parents:
        d = d[int(p)] if isinstance(d, list) else d[p]
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value
    return doc


@pytest.mark.parametrize("doc", [
    _with(SVC, "metadata.namespace", None), _with(SVC, "metadata.namespace", ""), _with(SVC, "metadata.name", ""),
    _with(SVC, "spec.ports.0.port", 0), _with(SVC, "spec.ports.0.port", "80"), _with(SVC, "spec.ports.0.port", True),
    _with(SVC, "spec.ports.1.name", "http"), _with(SVC, "spec.ports.1.name", ""), _with(SVC, "spec.ports.2.port", 80),
    _with(SVC, "spec.ports.1.protocol", "ICMP"), _with(SVC, "spec.ports.0.targetPort", 70000),
    _with(SVC, "spec.ports.0.targetPort", False), _with(SVC, "spec.ports.0.nodePort", 70000),
    _with(SVC, "spec.clusterIPs", ["10.96.0.11"]), _with(SVC, "spec.clusterIPs", ["10.96.0.10", "10.96.0.12"]),
    _with(SVC, "spec.clusterIP", "10.96.0.300"), _with(SVC, "spec.externalIPs", ["x"]), _with(SVC, "spec.type", "Weird"),
    _with(SVC, "spec.sessionAffinityConfig", {"clientIP": {"timeoutSeconds": 5}}), _with(SVC, "spec", None),
    _with(SVC, "status.loadBalancer", {"ingress": [{"ip": "192.0.2.1"}]}), _with(SVC, "metadata.labels", {"a": 1}),
    _with(SLICE, "addressType", "FQDN"), _with(SLICE, "metadata.labels", {}), _with(SLICE, "ports.0.port", 0),
    _with(SLICE, "ports.1.name", "http"), _with(SLICE, "endpoints.0.addresses", []),
    _with(SLICE, "endpoints.1.addresses", ["10.1.0.2", "fd00::1"]), _with(SLICE, "endpoints.0.conditions.ready", None),
    _with(SLICE, "endpoints.0.hints.forZones", [{"name": ""}]), _with(SLICE6, "endpoints.0.addresses", ["10.0.0.1"]),
    {"kind": "List", "items": [SVC, {"kind": "Deployment", "metadata": {"name": "d"}}]},
    {"kind": "ServiceList", "items": [SVC]}, {"kind": "List", "items": [{"kind": "List", "items": [SVC]}]},
])
def test_shapes_it_does_not_build_go_the_general_way(doc, tmp_path):
    text = json.dumps(doc)
    assert decode.documents(text) is None
    path = tmp_path / "m.json"  # and the file as a whole still reads: the general path's objects and errors
    parsed = parse_file(path, text)
    assert parsed.objects or parsed.errors or doc.get("kind", "").endswith("List")


def test_not_json_and_json_it_cannot_type_go_the_general_way():
    assert decode.documents("{") is None
    assert decode.documents('{"kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 1e400}]}}') is None
    assert decode.documents('[1, 2]') is None
