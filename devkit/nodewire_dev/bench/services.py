"""The one Service list every mode is generated from."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# Service VIPs come from 10.96.0.0/12, Kubernetes' default service-cluster-ip-range; 100k Services
# need only 10.96.0.0/15. Index i (0-based) gets 10.96.0.0 + i + 1.
VIP_BASE = int(ipaddress.IPv4Address("10.96.0.0"))
SERVICE_PORT = 80
TARGET_PORT = 8080


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class BenchService:
    namespace: str
    name: str
    cluster_ip: str
    port: int
    protocol: str  # "TCP" | "UDP"
    endpoints: tuple[Endpoint, ...]
    port_name: str = "http"

    @property
    def port_key(self) -> str:
        """kube-proxy's ServicePortName string: namespace/name:portname."""
        return f"{self.namespace}/{self.name}:{self.port_name}"


def vip(index: int) -> str:
    return str(ipaddress.IPv4Address(VIP_BASE + index + 1))


def make_services(n: int, backend_ips: list[str], endpoints_per_service: int,
                  namespace: str = "bench") -> list[BenchService]:
    """N Services svc-0 … svc-(n-1), each with `endpoints_per_service` endpoints drawn round-robin
    from the backend pods (so every backend is used and every Service reaches a live server)."""
    if not backend_ips:
        raise ValueError("make_services: at least one backend IP is needed")
    if endpoints_per_service < 1:
        raise ValueError(f"make_services: endpoints_per_service={endpoints_per_service}, expected >= 1")
    out = []
    nb = len(backend_ips)
    for i in range(n):
        eps = tuple(Endpoint(backend_ips[(i + j) % nb], TARGET_PORT) for j in range(endpoints_per_service))
        out.append(BenchService(namespace, f"svc-{i}", vip(i), SERVICE_PORT, "TCP", eps))
    return out


def with_endpoints(svc: BenchService, endpoints: tuple[Endpoint, ...]) -> BenchService:
    return BenchService(svc.namespace, svc.name, svc.cluster_ip, svc.port, svc.protocol, endpoints,
                        svc.port_name)
