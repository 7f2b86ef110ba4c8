"""Kernel log2 histograms for OTLP receivers that take exponential histograms, and the series cap.

A kernel histogram (bpf/lib/hist.h) is exported as an explicit-bucket histogram with bounds 2^s µs
(in seconds). Its slots are exactly the buckets of a base-2 exponential histogram of scale 0 in
microseconds: index i covers (2^i, 2^(i+1)] µs, slot s is index s-1 (agent/histogram.py).
In seconds no scale fits exactly (2^s µs is not a power of two of seconds), so the exponential form
keeps the kernel's unit, `us`, rather than re-bucket. It is sent when the OTLP side asks for it the
standard way (OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION=base2_exponential_bucket_histogram,
as the SDK's own OTLP exporter reads for its histogram instruments); Prometheus always gets the
explicit buckets.
"""
from __future__ import annotations

from dataclasses import replace

from opentelemetry.sdk.metrics._internal.point import Buckets
from opentelemetry.sdk.metrics.export import (ExponentialHistogram, ExponentialHistogramDataPoint, Histogram,
                                              Metric)

from ..histogram import Log2Histogram, bounds

LOG2_BOUNDS_S = bounds(1e-6)
EXPONENTIAL = "base2_exponential_bucket_histogram"
AGGREGATION_ENV = "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION"


def wants_exponential(env) -> bool:
    return env.get(AGGREGATION_ENV, "").strip().lower() == EXPONENTIAL


def is_log2(metric: Metric) -> bool:
    pts = metric.data.data_points if isinstance(metric.data, Histogram) else ()
    return bool(pts) and all(tuple(p.explicit_bounds) == LOG2_BOUNDS_S for p in pts)


def to_exponential(metric: Metric) -> Metric:
    """A log2 kernel histogram (seconds) as the scale-0 exponential histogram (µs) it exactly is."""
    if not is_log2(metric):
        return metric
    points = []
    for p in metric.data.data_points:
        offset, counts, zero = Log2Histogram(list(p.bucket_counts)).exponential()
        points.append(ExponentialHistogramDataPoint(
            attributes=p.attributes, start_time_unix_nano=p.start_time_unix_nano, time_unix_nano=p.time_unix_nano,
            count=p.count, sum=round(p.sum * 1e6), scale=0, zero_count=zero,
            positive=Buckets(offset, counts), negative=Buckets(0, []), flags=0, min=None, max=None))
    return replace(metric, unit="us", data=ExponentialHistogram(points, metric.data.aggregation_temporality))


def cap_points(metrics: list[Metric], budget: int) -> tuple[list[Metric], int]:
    """Keep at most `budget` data points (series), in order; returns (kept metrics, dropped points)."""
    out, dropped = [], 0
    for m in metrics:
        pts = list(m.data.data_points)
        keep, budget = pts[:max(budget, 0)], budget - len(pts)
        dropped += len(pts) - len(keep)
        if keep:
            out.append(m if len(keep) == len(pts) else replace(m, data=replace(m.data, data_points=keep)))
    return out, dropped
