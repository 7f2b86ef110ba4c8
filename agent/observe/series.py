"""Kernel readings → OTel metric data points, with the series cap and per-series start times.

Pure (no kernel, no SDK state): the observer hands in what it read and the identity snapshot, and
gets OTel `Metric` objects. Counters are cumulative sums with the time a series was first seen as
start time; a series that is no longer produced (deleted pod) is simply absent from the next
collection, which is how its Prometheus series disappear within one scrape/export interval.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint, Sum,
)

from ..histogram import HIST_SLOTS, Log2Histogram, bounds

US = 1e-6
LOG2_BOUNDS_S = bounds(US)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str
    description: str
    kind: str  # "counter" | "histogram"


SPECS = {
    "pod_bytes": MetricSpec("k8s.pod.network.io", "By",
                            "Bytes through the pod's veth (frames incl. Ethernet header), by direction", "counter"),
    "pod_packets": MetricSpec("nodewire.pod.network.packets", "{packet}",
                              "Packets through the pod's veth, by direction", "counter"),
    "connect": MetricSpec("nodewire.tcp.connect.duration", "s",
                          "TCP connect latency (SYN_SENT to ESTABLISHED), kernel log2 buckets", "histogram"),
    "srtt": MetricSpec("nodewire.tcp.srtt", "s",
                       "TCP smoothed RTT of each connection when it leaves ESTABLISHED, kernel log2 buckets",
                       "histogram"),
    "srtt_ack": MetricSpec("nodewire.tcp.srtt.acks", "s",
                           "TCP smoothed RTT at every ACK received (tcp_probe, opt-in), kernel log2 buckets",
                           "histogram"),
    "svc_connect": MetricSpec("nodewire.service.connect.duration", "s",
                              "TCP connect latency through a Service, per backend, kernel log2 buckets", "histogram"),
    "svc_srtt": MetricSpec("nodewire.service.srtt", "s",
                           "Smoothed RTT of connections through a Service when they leave ESTABLISHED, per backend",
                           "histogram"),
    "retrans": MetricSpec("nodewire.tcp.retransmits", "{segment}",
                          "TCP segments retransmitted, by local pod and remote peer", "counter"),
    "drops": MetricSpec("nodewire.skb.drops", "{packet}",
                        "Packets the kernel dropped on this node, by drop reason", "counter"),
    "svc_connects": MetricSpec("nodewire.service.connects", "{connection}",
                               "Connections the socket load balancer sent to a backend", "counter"),
    "svc_refusals": MetricSpec("nodewire.service.refusals", "{connection}",
                               "Connections refused by the socket load balancer (no usable backend)", "counter"),
}
# the order in which series are admitted under the cap: node-level and Service series first
CAP_ORDER = ("drops", "svc_connects", "svc_refusals", "svc_connect", "svc_srtt", "pod_bytes", "pod_packets",
             "connect", "srtt", "retrans", "srtt_ack")


@dataclass
class Reading:
    """One collection's worth of data, already labelled: metric key → {attributes: value}."""

    counters: dict[str, dict[tuple, int]] = field(default_factory=dict)
    histograms: dict[str, dict[tuple, Log2Histogram]] = field(default_factory=dict)

    def count(self, metric: str, attrs: dict, value: int) -> None:
        d = self.counters.setdefault(metric, {})
        k = tuple(sorted(attrs.items()))
        d[k] = d.get(k, 0) + value

    def hist(self, metric: str, attrs: dict) -> Log2Histogram:
        return self.histograms.setdefault(metric, {}).setdefault(tuple(sorted(attrs.items())), Log2Histogram())


class SeriesBook:
    """Remembers when each series was first seen and enforces the cap on exported series."""

    def __init__(self, max_series: int):
        self.max_series = max_series
        self.started: dict[tuple, int] = {}
        self.exported = 0
        self.dropped = 0

    def to_metrics(self, reading: Reading, now_ns: int | None = None) -> list[Metric]:
        now = now_ns or time.time_ns()
        budget = self.max_series
        seen: set[tuple] = set()
        points: dict[str, list] = {}
        dropped = 0
        for key in CAP_ORDER:
            spec = SPECS[key]
            series = reading.counters.get(key) if spec.kind == "counter" else reading.histograms.get(key)
            for attrs in sorted(series or ()):
                if budget <= 0:
                    dropped += 1
                    continue
                budget -= 1
                sk = (key, attrs)
                seen.add(sk)
                start = self.started.setdefault(sk, now)
                if spec.kind == "counter":
                    points.setdefault(key, []).append(
                        NumberDataPoint(attributes=dict(attrs), start_time_unix_nano=start,
                                        time_unix_nano=now, value=series[attrs]))
                else:
                    points.setdefault(key, []).append(_histogram_point(series[attrs], dict(attrs), start, now))
        for sk in [s for s in self.started if s not in seen]:
            del self.started[sk]
        self.exported = len(seen)
        self.dropped = dropped
        out = []
        for key, pts in points.items():
            spec = SPECS[key]
            if spec.kind == "counter":
                data = Sum(data_points=pts, aggregation_temporality=AggregationTemporality.CUMULATIVE,
                           is_monotonic=True)
            else:
                data = Histogram(data_points=pts, aggregation_temporality=AggregationTemporality.CUMULATIVE)
            out.append(Metric(name=spec.name, description=spec.description, unit=spec.unit, data=data))
        return out


def _histogram_point(h: Log2Histogram, attrs: dict, start: int, now: int) -> HistogramDataPoint:
    counts = list(h.counts)
    assert len(counts) == HIST_SLOTS == len(LOG2_BOUNDS_S) + 1
    # min/max are unknown below bucket precision: left unset (None → absent in OTLP), not guessed
    return HistogramDataPoint(attributes=attrs, start_time_unix_nano=start, time_unix_nano=now,
                              count=sum(counts), sum=h.total * US, bucket_counts=counts,
                              explicit_bounds=LOG2_BOUNDS_S, min=None, max=None)
