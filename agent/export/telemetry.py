"""One MeterProvider for the whole agent, with a Prometheus scrape endpoint.

Instruments read current state when the exporter asks (observable callbacks), so there is no
background thread per metric. The Prometheus exporter turns OTel units into name suffixes
(`s` → `_seconds`, `By` → `_bytes`, counters → `_total`).
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import REGISTRY, start_http_server

log = logging.getLogger("nodewire.export")


def parse_addr(addr: str, default_port: int = 9965) -> tuple[str, int]:
    """"HOST:PORT", ":PORT" or "[v6]:PORT" → (host, port). Empty host means all addresses."""
    host, _, port = addr.rpartition(":")
    if not _:
        host, port = addr, str(default_port)
    host = host.strip("[]") or "0.0.0.0"
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"--metrics-addr {addr!r}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"--metrics-addr {addr!r}: port {p} out of range")
    return host, p


@dataclass
class Telemetry:
    provider: MeterProvider
    server: object | None = None
    port: int = 0

    def meter(self, name: str = "nodewire"):
        return self.provider.get_meter(name)

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        self.provider.shutdown()


def start_telemetry(metrics_addr: str | None, node_name: str | None = None) -> Telemetry:
    """MeterProvider with a Prometheus reader; serve /metrics on metrics_addr when given."""
    attrs = {"service.name": "nodewire", "k8s.node.name": node_name or socket.gethostname()}
    readers = [PrometheusMetricReader()]
    provider = MeterProvider(resource=Resource.create(attrs), metric_readers=readers)
    tel = Telemetry(provider)
    if metrics_addr:
        host, port = parse_addr(metrics_addr)
        server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
        tel.server, tel.port = server, server.server_port
        log.info("metrics endpoint listening addr=%s:%d", host, tel.port)
    return tel
