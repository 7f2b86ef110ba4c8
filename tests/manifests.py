"""Builders for Service / EndpointSlice manifests used by the tests."""
from __future__ import annotations

import ipaddress
import json
from pathlib import Path


def service(name: str, vips: list[str], port: int = 80, protocol: str = "TCP", target_port=8080,
            port_name: str = "", namespace: str = "default", labels: dict | None = None) -> dict:
    spec = {"clusterIP": vips[0] if vips else "None", "clusterIPs": vips or ["None"],
            "ports": [{"name": port_name, "port": port, "protocol": protocol, "targetPort": target_port}]}
    if not port_name:
        del spec["ports"][0]["name"]
    meta = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def endpoint_slice(service_name: str, addresses: list[str], port: int = 8080, protocol: str = "TCP",
                   port_name: str = "", ready: list[bool] | None = None, namespace: str = "default",
                   suffix: str = "") -> dict:
    family = "IPv6" if addresses and ipaddress.ip_address(addresses[0]).version == 6 else "IPv4"
    ready = ready or [True] * len(addresses)
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service_name}-{family.lower()}{suffix}", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": family,
        "ports": [{"name": port_name, "port": port, "protocol": protocol}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": r}} for a, r in zip(addresses, ready)],
    }


def write(path: Path, *objects: dict) -> Path:
    """Write objects as a `kind: List` JSON file (atomically, so the agent never reads half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))
    tmp.rename(path)
    return path
