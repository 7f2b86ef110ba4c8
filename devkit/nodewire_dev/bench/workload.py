"""Synthetic Service sets for benchmarks: N Services × E endpoints, written as manifests."""
from __future__ import annotations

import ipaddress
import json
from pathlib import Path

VIP_BASE = ipaddress.ip_address("10.96.0.0")        # 10.96.0.0/12 holds ~1M ClusterIPs
ENDPOINT_BASE = ipaddress.ip_address("10.128.0.0")  # 10.128.0.0/9: synthetic, never dialled


def vip(i: int) -> str:
    return str(VIP_BASE + 1 + i)


def service_objects(n: int, endpoints: int, last_backends: list[str], port: int = 80, target_port: int = 8080):
    """N Services with E endpoints each; the last Service's endpoints are the real backend pods."""
    items = []
    for i in range(n):
        name = f"svc-{i}"
        if i == n - 1:
            addrs = last_backends
        else:
            addrs = [str(ENDPOINT_BASE + i * endpoints + j) for j in range(endpoints)]
        items.append({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": name, "namespace": "bench"},
                      "spec": {"clusterIP": vip(i), "ports": [{"name": "http", "port": port, "targetPort": target_port}]}})
        items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      "metadata": {"name": f"{name}-abc", "namespace": "bench",
                                   "labels": {"kubernetes.io/service-name": name}},
                      "addressType": "IPv4", "ports": [{"name": "http", "port": target_port, "protocol": "TCP"}],
                      "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addrs]})
    return items


def write_manifests(directory: Path, n: int, endpoints: int, last_backends: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "services.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                "items": service_objects(n, endpoints, last_backends)}))
    return path
