"""What the verbs tracer read, as records (one per QP and direction, one per QP and error status) and
as OTel metrics for a Telemetry producer: the kernel's log2 histograms bucket for bucket, completion
and error counters per QP. attrs(pid, comm, device, qp) names a series; series_start keeps each
series' start time and forgets those whose process is gone."""
from __future__ import annotations

from dataclasses import dataclass

from ..histogram import bounds

LATENCY_BOUNDS_S = bounds(1e-6)


@dataclass(frozen=True)
class QpLatency:
    pid: int
    comm: str
    device: str
    qp_num: int
    direction: str                 # "send" or "recv"
    slots: tuple[int, ...]         # HIST_SLOTS counts
    sum_us: int

    @property
    def count(self) -> int:
        return sum(self.slots)


@dataclass(frozen=True)
class QpErrors:
    pid: int
    comm: str
    device: str
    qp_num: int
    status: str
    count: int


@dataclass
class Snapshot:
    latency: list[QpLatency]
    errors: list[QpErrors]
    stats: dict[str, int]
    traced: dict[int, str]         # pid → comm


def latency_metrics(snap: Snapshot, attrs, series_start: dict, now: int) -> list:
    """The kernel histograms as one OTel histogram metric, bucket for bucket: slot s is the
    bucket with upper bound 2^s µs (upper-inclusive, like OTel's explicit bounds), the last slot
    is +Inf. For a Telemetry producer (a callable returning Metric objects)."""
    from opentelemetry.sdk.metrics.export import (AggregationTemporality, Histogram,
                                                  HistogramDataPoint, Metric)

    points, seen = [], set()
    for h in snap.latency:
        key = (h.pid, h.qp_num, h.direction)
        seen.add(key)
        start = series_start.setdefault(key, now)
        points.append(HistogramDataPoint(
            attributes={**attrs(h.pid, h.comm, h.device, h.qp_num), "rdma.direction": h.direction},
            start_time_unix_nano=start, time_unix_nano=now, count=h.count, sum=h.sum_us * 1e-6,
            bucket_counts=list(h.slots), explicit_bounds=LATENCY_BOUNDS_S, min=None, max=None))
    for key in [k for k in series_start if len(k) == 3 and k not in seen]:  # (3: not error series)
        del series_start[key]
    if not points:
        return []
    return [Metric(name="nodewire.rdma.wr.latency", unit="s",
                   description="Verbs work request latency, post to completion polled (kernel log2 buckets)",
                   data=Histogram(data_points=points,
                                  aggregation_temporality=AggregationTemporality.CUMULATIVE))]

def counter_metrics(snap: Snapshot, attrs, series_start: dict, now: int) -> list:
    """Completion and error counters per (process, device, qp) as OTel cumulative sums, for a
    Telemetry producer: like the histograms, under the telemetry's one series cap (an
    observable counter would bypass it) and gone with their process."""
    from opentelemetry.sdk.metrics.export import AggregationTemporality, Metric, NumberDataPoint, Sum


    def point(key, attrs, value):
        return NumberDataPoint(attributes=attrs, start_time_unix_nano=series_start.setdefault(key, now),
                               time_unix_nano=now, value=value)

    done = [point((q.pid, q.qp_num, q.direction), {**attrs(q.pid, q.comm, q.device, q.qp_num),
                                                   "rdma.direction": q.direction}, q.count) for q in snap.latency]
    errs = [point(("err", e.pid, e.qp_num, e.status), {**attrs(e.pid, e.comm, e.device, e.qp_num),
                                                "rdma.wc.status": e.status}, e.count) for e in snap.errors]
    live = {("err", e.pid, e.qp_num, e.status) for e in snap.errors}
    for key in [k for k in series_start if len(k) == 4 and k not in live]:
        del series_start[key]
    out = []
    for name, desc, pts in (("nodewire.rdma.wr.completions", "Timed work-request completions per QP", done),
                            ("nodewire.rdma.wc.errors", "Completions with an error status, per QP and status", errs)):
        if pts:
            out.append(Metric(name=name, unit="{completion}", description=desc, data=Sum(
                data_points=pts, aggregation_temporality=AggregationTemporality.CUMULATIVE, is_monotonic=True)))
    return out
