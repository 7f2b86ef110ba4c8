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


def write_manifests(directory: Path, n: int, endpoints: int, last_backends: list[str], files: int = 1) -> list[Path]:
    """N Services in `files` files of about N/files each (one file: services.json)."""
    directory.mkdir(parents=True, exist_ok=True)
    items = service_objects(n, endpoints, last_backends)  # Service, slice, Service, slice, ...
    per = -(-n // max(1, files)) * 2
    paths = []
    for k, start in enumerate(range(0, len(items), per) if items else [0]):
        path = directory / ("services.json" if files == 1 else f"services-{k:04d}.json")
        path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items[start:start + per]}))
        paths.append(path)
    return paths
