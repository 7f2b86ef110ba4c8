"""One MeterProvider for the whole agent, with a Prometheus scrape endpoint and optional OTLP.

Instruments read current state when the exporter asks (observable callbacks), so there is no
background thread per metric. The Prometheus exporter turns OTel units into name suffixes
(`s` → `_seconds`, `By` → `_bytes`, counters → `_total`).

Kernel histograms cannot go through SDK instruments: a Histogram instrument only takes single
values, so pre-aggregated log2 buckets would have to be replayed value by value, and an asynchronous
instrument never forgets an attribute set, so a deleted pod's series would live on. SDK 1.29 has no
MetricProducer either. So the readers here accept *producers*: functions returning ready OTel
`Metric` objects (cumulative sums, explicit-bucket histograms with the kernel's own bucket counts)
that are merged into every collection before export — Prometheus and OTLP see the same data. An
OpenMetrics scrape (what Prometheus asks for) writes the producers' metrics itself (exposition.py,
the same text) instead of converting them to prometheus_client objects; it is the bulk of a scrape.

Producers share one series cap (the agent's --max-series), so no source of series (observer, RDMA
tracer) bypasses it. OTLP (HTTP/protobuf) is added when the standard OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_METRICS_ENDPOINT variable is set; the exporter reads the rest of the
OTEL_EXPORTER_OTLP_* variables itself, and OTEL_METRIC_EXPORT_INTERVAL sets the period;
OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION=base2_exponential_bucket_histogram sends
the kernel histograms as exponential histograms (export/histograms.py).
"""
from __future__ import annotations

import gzip
import logging
import os
import socket
import threading
from http.server import ThreadingHTTPServer
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable
from urllib.parse import parse_qs, urlparse

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Metric, MetricsData, PeriodicExportingMetricReader, ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from prometheus_client import REGISTRY
from prometheus_client.exposition import MetricsHandler, choose_encoder, gzip_accepted
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from . import kubeproxy
from .exposition import render as render_openmetrics
from .histograms import cap_points, to_exponential, wants_exponential

log = logging.getLogger("nodewire.export")

# gzip level of /metrics. Measured on a 1,000-pod scrape (8.8 MB of text, `nodewire bench scrape`):
# level 9 (prometheus_client's, gzip.compress's default) costs ≈ 7× the CPU of level 1 for ≈ 1.3×
# fewer bytes; a scrape crosses the node's own network once per interval, so CPU is what counts.
GZIP_LEVEL = 1

Producer = Callable[[], Iterable[Metric]]
PRODUCER_SCOPE = InstrumentationScope("nodewire.kernel", "1")


def parse_addr(addr: str, default_port: int = 9966) -> tuple[str, int]:
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


class Producers:
    """The shared list of producers every reader merges in, under one series cap: producers are
    asked in the order they were added (the observer first, then RDMA), and data points past
    max_series are left out of that collection (counted in `dropped`)."""

    def __init__(self, max_series: int | None = None) -> None:
        self._items: list[Producer] = []
        self._lock = threading.Lock()
        self.max_series = max_series
        self.dropped = 0

    def add(self, p: Producer) -> None:
        with self._lock:
            self._items.append(p)

    def remove(self, p: Producer) -> None:
        with self._lock:
            if p in self._items:
                self._items.remove(p)

    def collect(self, exponential: bool = False) -> list[Metric]:
        """Every producer's metrics under the cap (log2 kernel histograms in their exponential form
        when `exponential`)."""
        with self._lock:
            items = list(self._items)
        extra = []
        for p in items:
            try:
                extra.extend(p())
            except Exception as e:  # a failing producer must not take the others' metrics down
                log.error("metric producer failed producer=%s err=%s", getattr(p, "__qualname__", p), e)
        if self.max_series is not None:
            extra, self.dropped = cap_points(extra, self.max_series)
            if self.dropped:
                log.warning("series cap reached cap=%d dropped=%d", self.max_series, self.dropped)
        if exponential:
            extra = [to_exponential(m) for m in extra]
        return extra

    def merge(self, data: MetricsData, exponential: bool = False) -> MetricsData:
        """data with every producer's metrics added."""
        extra = self.collect(exponential)
        if not extra or not data.resource_metrics:
            return data
        first, *rest = data.resource_metrics
        first = replace(first, scope_metrics=[*first.scope_metrics, ScopeMetrics(PRODUCER_SCOPE, extra, "")])
        return MetricsData(resource_metrics=[first, *rest])


# The producers whose metrics this thread's scrape writes itself (exposition.py), so the Prometheus
# reader leaves them out of the collection it makes inside that scrape.
_written_directly = threading.local()


class _MergingPrometheusReader(PrometheusMetricReader):
    def __init__(self, producers: Producers):
        super().__init__()
        self._producers = producers

    def _receive_metrics(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> None:
        if getattr(_written_directly, "producers", None) is not self._producers and metrics_data is not None:
            metrics_data = self._producers.merge(metrics_data)
        super()._receive_metrics(metrics_data, timeout_millis, **kwargs)


class _MergingPeriodicReader(PeriodicExportingMetricReader):
    def __init__(self, exporter, producers: Producers, exponential: bool = False, **kw):
        self._producers, self._exponential = producers, exponential
        super().__init__(exporter, **kw)

    def _receive_metrics(self, metrics_data, timeout_millis: float = 10_000, **kwargs) -> None:
        super()._receive_metrics(self._producers.merge(metrics_data, self._exponential), timeout_millis, **kwargs)


@dataclass
class Telemetry:
    provider: MeterProvider
    server: object | None = None
    port: int = 0
    producers: Producers = field(default_factory=Producers)
    otlp_endpoint: str | None = None
    # path ("/healthz", "/readyz") -> () -> (ok, detail); registered by the agent
    checks: dict[str, Callable[[], tuple[bool, str]]] = field(default_factory=dict)

    def add_check(self, path: str, check: Callable[[], tuple[bool, str]]) -> None:
        self.checks[path] = check

    def meter(self, name: str = "nodewire"):
        return self.provider.get_meter(name)

    def add_producer(self, p: Producer) -> None:
        """p() is called at every collection (scrape or export) and returns OTel Metric objects.
        The SDK skips a collection with no instrument data at all, so a producer's owner should
        also register at least one observable instrument (the observer does)."""
        self.producers.add(p)

    def remove_producer(self, p: Producer) -> None:
        self.producers.remove(p)

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self.provider.shutdown()


def _serve(host: str, port: int, tel: "Telemetry") -> ThreadingHTTPServer:
    """/metrics (Prometheus exposition of the registry) plus the agent's health checks, which a
    kubelet probes on the same port (see deploy/daemonset)."""

    class Handler(MetricsHandler):
        registry = REGISTRY

        def do_GET(self) -> None:
            url = urlparse(self.path)
            check = tel.checks.get(url.path)
            if check is None:
                return self._metrics(parse_qs(url.query))
            try:
                ok, detail = check()
            except Exception as e:  # a failing check is an unhealthy answer, not a crashed server
                ok, detail = False, f"check failed: {e}"
            body = (("ok" if ok else "not ok") + (f": {detail}" if detail else "") + "\n").encode()
            self.send_response(200 if ok else 503)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _metrics(self, params: dict) -> None:
            """prometheus_client's MetricsHandler.do_GET, compressing at GZIP_LEVEL instead of 9, and
            in OpenMetrics (what Prometheus asks for) writing the producers' metrics directly."""
            registry = self.registry.restricted_registry(params["name[]"]) if "name[]" in params else self.registry
            encoder, content_type = choose_encoder(self.headers.get("Accept"))
            if encoder is openmetrics_latest and "name[]" not in params:
                body = _openmetrics(registry, tel.producers)
            else:
                body = encoder(registry)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            if gzip_accepted(self.headers.get("Accept-Encoding")):
                body = gzip.compress(body, GZIP_LEVEL)
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes and probes are not worth a log line
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def _openmetrics(registry, producers: Producers) -> bytes:
    """The registry's OpenMetrics text with the producers' metrics written by exposition.render
    before its `# EOF` (the same text the reader's merge would give, without its objects)."""
    _written_directly.producers = producers
    try:
        body = openmetrics_latest(registry)
    finally:
        _written_directly.producers = None
    eof = b"# EOF\n"
    return body if not body.endswith(eof) else \
        body[:-len(eof)] + render_openmetrics(producers.collect()).encode() + eof


def otlp_endpoint_from_env(env=os.environ) -> str | None:
    """The full metrics URL: the signal-specific variable as is, the base one + /v1/metrics (spec)."""
    if env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"]
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return base.rstrip("/") + "/v1/metrics" if base else None


def start_telemetry(metrics_addr: str | None, node_name: str | None = None, env=os.environ,
                    max_series: int | None = None) -> Telemetry:
    """MeterProvider with a Prometheus reader (and an OTLP one when configured by environment);
    serve /metrics on metrics_addr when given. max_series caps the producers' series together."""
    attrs = {"service.name": "nodewire", "k8s.node.name": node_name or socket.gethostname()}
    producers = Producers(max_series)
    readers = [_MergingPrometheusReader(producers)]
    endpoint = otlp_endpoint_from_env(env)
    if endpoint:
        proto = env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
        if proto != "http/protobuf":
            log.warning("OTLP protocol not supported, using http/protobuf protocol=%s", proto)
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        interval = env.get("OTEL_METRIC_EXPORT_INTERVAL")
        readers.append(_MergingPeriodicReader(OTLPMetricExporter(endpoint=endpoint), producers, wants_exponential(env),
                                              **({"export_interval_millis": float(interval)} if interval else {})))
        log.info("OTLP metrics export on endpoint=%s", endpoint)
    provider = MeterProvider(resource=Resource.create(attrs), metric_readers=readers, views=kubeproxy.views())
    tel = Telemetry(provider, producers=producers, otlp_endpoint=endpoint)
    if metrics_addr:
        host, port = parse_addr(metrics_addr)
        server = _serve(host, port, tel)
        tel.server, tel.port = server, server.server_port
        log.info("metrics endpoint listening addr=%s:%d", host, tel.port)
    return tel
